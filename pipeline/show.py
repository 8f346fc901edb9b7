"""`python -m pipeline show`: one sample's image, caption and every label it has, in one picture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core import registry
from core.pictures import figure_backend, save_figure
from core.storage import data_path, open_tar, read_parquet
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


def throughput(made: list[dict], bins: int = 60) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images/s over a run's time, from the stats of the shards it made (each shard's images spread evenly over its
    own start to finish): the bins' start in seconds from the first start, and the rate per worker in each."""
    spans = [(s["started_at"], s["finished_at"], s["ok"], f"{s.get('node') or '?'} pid {s.get('worker', '?')}")
             for s in made if s.get("started_at") and s.get("finished_at")]
    if not spans:
        return np.zeros(0), {}
    start, end = min(a for a, *_ in spans), max(b for _, b, *_ in spans)
    edges = np.linspace(start, max(end, start + 1e-3), bins + 1)
    width = edges[1] - edges[0]
    rates: dict[str, np.ndarray] = {}
    for began, finished, images, worker in spans:
        overlap = np.clip(np.minimum(edges[1:], finished) - np.maximum(edges[:-1], began), 0, None)
        rates.setdefault(worker, np.zeros(bins))
        rates[worker] += images * overlap / max(finished - began, 1e-3) / width
    return edges[:-1] - start, rates


def draw_throughput(made: list[dict], out: str | Path, title: str) -> Path | None:
    """The run's images/s against time, in all and per worker process (up to 8 drawn), or None for no shards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds, rates = throughput(made)
    if not rates:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    scale, unit = (60.0, "min") if seconds[-1] > 300 else (1.0, "s")
    ax.step(seconds / scale, sum(rates.values()), where="post", color="C0", linewidth=2, label="all workers")
    if 1 < len(rates) <= 8:
        for i, (worker, rate) in enumerate(sorted(rates.items())):
            ax.step(seconds / scale, rate, where="post", color=f"C{i + 1}", linewidth=1, label=worker)
    ax.set_xlabel(f"{unit} since the first shard started")
    ax.set_ylabel("images/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
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


QUALITY_RANGES = {"clip_score": (-0.2, 0.6), "aesthetic": (0.0, 10.0), "watermark": (0.0, 1.0), "cosine": (0.8, 1.0)}
QUALITY_THRESHOLDS = {"clip_score": "min_clip_score", "aesthetic": "min_aesthetic", "watermark": "max_watermark",
                      "cosine": "dedup"}


def quality_histograms(layout: DatasetLayout, bins: int = 40) -> dict[str, np.ndarray]:
    """Each score's counts in fixed bins over QUALITY_RANGES (values outside go to the end bins), read a shard at a
    time, so any number of samples costs the same memory; `cosine`: each near-duplicate's to its earlier one."""
    from stages.quality.dedup import table_path
    from stages.quality.quality import FOLDER, STAGE

    counts = {name: np.zeros(bins, np.int64) for name in QUALITY_RANGES}

    def add(name, values):
        values = np.asarray([v for v in values if v is not None], np.float64)
        low, high = QUALITY_RANGES[name]
        counts[name] += np.histogram(np.clip(values, low, high), bins, (low, high))[0]

    for shard in layout.committed_shards(STAGE):
        table = read_parquet(layout.table(FOLDER, shard), ["clip_score", "aesthetic", "watermark"]).to_pydict()
        for name, values in table.items():
            add(name, values)
    if table_path(layout).is_file():
        add("cosine", read_parquet(table_path(layout), ["cosine"])["cosine"].to_pylist())
    return counts


def draw_quality(layout: DatasetLayout, cfg, out: str | Path, examples: int = 4) -> Path:
    """The quality scores' histograms with each threshold drawn where it is set, and a row of kept and a row of
    dropped photos (the first shards' samples) with their scores and why."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    counts = quality_histograms(layout)
    kept, dropped = quality_examples(layout, cfg, examples)
    columns = max(len(QUALITY_RANGES), examples)
    fig, axes = plt.subplots(3, columns, figsize=(2.6 * columns, 7.5), squeeze=False)
    for ax, (name, count) in zip(axes[0], counts.items()):
        low, high = QUALITY_RANGES[name]
        edges = np.linspace(low, high, len(count) + 1)
        ax.bar(edges[:-1], count, width=edges[1] - edges[0], align="edge", color="C0")
        bound = getattr(cfg, QUALITY_THRESHOLDS[name])
        title = "near-duplicates' cosine" if name == "cosine" else name
        if bound is not None:
            ax.axvline(bound, color="C3", linewidth=2)
        ax.set_title(f"{title} ({'no threshold' if bound is None else f'threshold {bound:.3g}'})"
                     + ("" if count.sum() else ": no scores"), fontsize=8)
        ax.tick_params(labelsize=6)
    for row, (label, picked) in enumerate((("kept", kept), ("dropped", dropped)), start=1):
        for i, ax in enumerate(axes[row]):
            ax.axis("off")
            if i < len(picked):
                key, data, scores, why = picked[i]
                ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
                numbers = ", ".join(f"{n} {scores[n]:.2f}" for n in ("clip_score", "aesthetic", "watermark")
                                    if scores[n] is not None)
                ax.set_title(f"{label} {key}\n{why or numbers}"[:90], fontsize=6)
        if not picked:
            axes[row][0].text(0, 0.5, f"nothing {label}", fontsize=9)
    for ax in axes[0][len(counts):]:
        ax.axis("off")
    return save_figure(fig, out, dpi=80)


def quality_examples(layout: DatasetLayout, cfg, examples: int) -> tuple[list, list]:
    """Up to `examples` kept and dropped samples of the first shards under `cfg`'s thresholds, each (key, JPEG
    bytes, scores, why dropped or None); none dropped where the thresholds cannot be applied yet."""
    from stages.quality.filters import rejected
    from stages.quality.quality import FOLDER, STAGE

    kept, dropped = [], []
    ready = _thresholds_ready(layout, cfg)
    for shard in layout.committed_shards(STAGE):
        reasons = rejected(layout, shard, cfg) if ready else {}
        scores = {r["key"]: r for r in read_parquet(layout.table(FOLDER, shard),
                                                    ["key", "clip_score", "aesthetic", "watermark"]).to_pylist()}
        photos = dict(_photos(layout, shard, set(scores)))
        for key, row in scores.items():
            which = dropped if key in reasons else kept
            if len(which) < examples and key in photos:
                which.append((key, photos[key], row, reasons[key][1] if key in reasons else None))
        if len(kept) >= examples and len(dropped) >= examples:
            break
    return kept, dropped


def _thresholds_ready(layout: DatasetLayout, cfg) -> bool:
    from stages.quality.filters import QualityFilterError, check_scored
    from stages.quality.quality import STAGE

    try:
        check_scored(layout, layout.committed_shards(STAGE), cfg)
        return True
    except QualityFilterError:
        return False


def _photos(layout: DatasetLayout, shard: str, keys: set[str]):
    """(key, JPEG bytes) of a shard's photos among `keys`."""
    with open_tar(layout.tar(registry.photo().folder, shard)) as tar:
        for member in tar:
            key = member.name.rsplit(".", 1)[0]
            if member.isfile() and key in keys:
                yield key, tar.extractfile(member).read()
