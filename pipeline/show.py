"""`python -m pipeline show`: one sample's image, caption and every label it has, in one picture."""
from __future__ import annotations

import json
from pathlib import Path

from core import registry
from core.pictures import figure_backend, save_figure
from core.storage import data_path, open_tar
from stages.dataset.shards import DatasetLayout, producing_stage
from stages.download.download import STAGE as DOWNLOAD_STAGE


def find_shard(layout: DatasetLayout, key: str) -> str:
    """Shard i holds input rows [i * S, (i + 1) * S), S being the first shard's row count."""
    shards = layout.committed_shards(DOWNLOAD_STAGE)
    if not shards:
        raise ValueError(f"no committed shards under {layout.root}")
    if not key.isdigit():
        raise ValueError(f"key {key!r}: keys are input row numbers such as 000000012")
    rows_per_shard = layout.read_stats(DOWNLOAD_STAGE, shards[0])["rows"]
    shard = f"shard-{int(key) // max(rows_per_shard, 1):06d}"
    if shard not in shards:
        raise ValueError(f"key {key!r}: its shard {shard} is not committed under {layout.root}")
    return shard


def read_sample(layout: DatasetLayout, key: str) -> dict[str, tuple[str, bytes]]:
    """modality -> (extension, bytes) for every modality folder that holds the key."""
    shard = find_shard(layout, key)
    found = {}
    for folder in sorted(p for p in layout.root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        path = folder / f"{shard}.tar"
        if not path.is_file():
            continue
        with open_tar(path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if stem == key:
                    found[folder.name] = (ext, tar.extractfile(member).read())
                    break
    photo = registry.photo().folder
    if photo not in found:
        raise ValueError(f"key {key!r} is not in {layout.tar(photo, shard)} (see the download status for its fate)")
    return found


def random_weight_panels(layout: DatasetLayout, shard: str, folders: list[str]) -> list[str]:
    """The folders among `folders` whose shard was made by a random-weight model (its stats' provenance)."""
    found = []
    for folder in folders:
        stage = producing_stage(folder)
        if layout.is_committed(stage, shard):
            models = layout.read_stats(stage, shard).get("provenance", {}).get("models", {})
            if any(record.get("random_weights") for record in models.values()):
                found.append(folder)
    return found


def draw_sample(layout: DatasetLayout, key: str, out: str | Path) -> Path:
    """The photo, then every modality the sample has, in the registry's order, each drawn by its own entry."""
    import matplotlib.patches as patches

    plt = figure_backend()
    modalities = layout.modality_set()
    sample = read_sample(layout, key)
    random_panels = random_weight_panels(layout, find_shard(layout, key), list(sample))
    photo_spec = registry.photo()
    try:
        photo = photo_spec.decode(sample[photo_spec.folder][1])
    except ValueError:
        raise ValueError(f"key {key!r}: its {photo_spec.name} image cannot be decoded") from None
    captions = [m for m in modalities.sequences() if m.downloaded and m.folder in sample]
    caption = captions[0].decode(sample[captions[0].folder][1]) if captions else ""
    panels = [m for m in modalities.modalities() if m.folder in sample and
              (m is photo_spec or m.picture(m.decode(sample[m.folder][1]), photo) is not None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), squeeze=False)
    warning = f"RANDOM WEIGHTS made {', '.join(random_panels)}: these labels mean nothing" if random_panels else ""
    fig.suptitle(f"{key}: {caption}"[:160] + (f"\n{warning}" if warning else ""), fontsize=11)
    for ax, modality in zip(axes[0], panels):
        name = modality.name
        ax.set_axis_off()
        stored = modality.decode(sample[modality.folder][1])
        title = name + (f" {'x'.join(str(n) for n in stored.shape)}" if modality.extension == "npy" else "")
        ax.set_title(title + (" (random weights)" if name in random_panels else ""),
                     color="red" if name in random_panels else "black")
        ax.imshow(modality.picture(stored, photo), interpolation="nearest")
        legend = modality.legend(stored) if hasattr(modality, "legend") else []
        if legend:
            ax.legend(handles=[patches.Patch(color=colour, label=label) for colour, label in legend],
                      loc="upper right", fontsize=7, framealpha=0.8)
    return save_figure(fig, out, dpi=80, metadata={"Title": f"4M sample {key}",
                                                   "Description": warning or "labels from the recorded models"})


def draw_masked_sample(sample: dict, tokenizer, out: str | Path) -> Path:
    """One masked sample: per image modality its token grid (visible inputs, targets, neither; a row for vectors),
    per sequence the encoder's input and the decoder's target with their sentinels."""
    from matplotlib.colors import ListedColormap

    plt = figure_backend()
    images = [m for m in sample if registry.domain(m).kind != "sequence"]
    texts = [m for m in sample if m not in images]
    image_height, text_height = 2.8, 0.8 * len(texts)
    height = image_height + text_height
    fig = plt.figure(figsize=(max(2.4 * len(images), 7.5), height))
    colours = ListedColormap(["#dddddd", "#2b7bba", "#e8743b"])  # neither, input, target
    for i, m in enumerate(images):
        d = sample[m]
        grid = (~d["input_mask"]).long() + 2 * (~d["target_mask"]).long()
        ax = fig.add_axes([(i + 0.05) / len(images), (text_height + 0.15) / height, 0.9 / len(images),
                           1.9 / height])
        side = int(round(grid.numel() ** 0.5))
        shape = (side, side) if side * side == grid.numel() else (1, grid.numel())  # vectors (T5's): one row
        ax.imshow(grid.reshape(shape).numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest",
                  aspect="auto" if shape[0] == 1 else "equal")
        ax.set_title(f"{m}\n{int((~d['input_mask']).sum())} in, {int((~d['target_mask']).sum())} out", fontsize=8)
        ax.set_axis_off()
    for j, m in enumerate(texts):
        d = sample[m]
        shown = [tokenizer.decode(d["tensor"][~d[mask]].tolist(), skip_special_tokens=False) if tokenizer else ""
                 for mask in ("input_mask", "target_mask")]
        fig.text(0.01, (text_height - 0.8 * j - 0.4) / height,
                 f"{m} input:  {shown[0][:110]}\n{m} target: {shown[1][:110]}", fontsize=7, family="monospace",
                 va="center")
    fig.text(0.5, 1 - 0.12 / height, "blue: encoder inputs, orange: decoder targets, grey: neither", fontsize=9,
             ha="center", va="top")
    return save_figure(fig, out, dpi=90, tight=False)


def draw_loss_curves(metrics: str | Path, out: str | Path) -> Path:
    """Training loss per modality (and validation losses as points) against steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in data_path(metrics).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({k for line in lines for k in line if k == "loss" or k.startswith("loss.")})
    for i, name in enumerate(names):
        steps = [line["step"] for line in lines if name in line]
        ax.plot(steps, [line[name] for line in lines if name in line], label=name.removeprefix("loss.") + " (train)",
                color=f"C{i}", linewidth=2 if name == "loss" else 1)
        val = f"val_{name}"
        points = [(line["step"], line[val]) for line in lines if val in line]
        if points:
            ax.scatter(*zip(*points), color=f"C{i}", marker="o", s=18)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("4M losses (lines: training, dots: validation)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, out, dpi=80)


def draw_transfer_curves(metrics: str | Path, out: str | Path, title: str) -> Path:
    """A fine-tune's training loss against steps, and its validation scores (right axis), from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in data_path(metrics).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([line["step"] for line in lines if "loss" in line], [line["loss"] for line in lines if "loss" in line],
            color="C0", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    scores = ax.twinx()
    for i, name in enumerate(sorted({k for line in lines for k in line if k.startswith("val_")})):
        points = [(line["step"], line[name]) for line in lines if name in line]
        scores.plot(*zip(*points), marker="o", color=f"C{i + 1}", label=name.removeprefix("val_"))
    scores.set_ylabel("validation")
    handles = ax.get_legend_handles_labels()[0] + scores.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out, dpi=80)
