"""`python -m pipeline show`: one sample's image, caption and every label it has, in one picture."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from stages.download import STAGE as DOWNLOAD_STAGE
from stages.shards import DatasetLayout, producing_stage

PANELS = ["rgb", "depth", "normal", "semseg", "det", "clip"]


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
        with tarfile.open(path) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if stem == key:
                    found[folder.name] = (ext, tar.extractfile(member).read())
                    break
    if "rgb" not in found:
        raise ValueError(f"key {key!r} is not in {layout.tar('rgb', shard)} (see the download status for its fate)")
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


def clip_pca(features: np.ndarray) -> np.ndarray:
    """First three principal components of a (h, w, D) feature map, scaled to [0, 1] for display."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float32)
    flat -= flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[:3].T
    proj = (proj - proj.min(0)) / np.maximum(proj.max(0) - proj.min(0), 1e-6)
    return proj.reshape(*features.shape[:2], 3)


def draw_sample(layout: DatasetLayout, key: str, out: str | Path) -> Path:
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from models.coco import COCO_PANOPTIC

    sample = read_sample(layout, key)
    random_panels = random_weight_panels(layout, find_shard(layout, key), list(sample))
    decode = lambda data, flags=cv2.IMREAD_UNCHANGED: cv2.imdecode(np.frombuffer(data, np.uint8), flags)  # noqa: E731
    rgb = decode(sample["rgb"][1], cv2.IMREAD_COLOR)
    if rgb is None:
        raise ValueError(f"key {key!r}: its rgb image cannot be decoded")
    rgb = rgb[..., ::-1]
    caption = sample.get("caption", ("txt", b""))[1].decode("utf-8", errors="replace")
    panels = [p for p in PANELS if p in sample]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), squeeze=False)
    warning = f"RANDOM WEIGHTS made {', '.join(random_panels)}: these labels mean nothing" if random_panels else ""
    fig.suptitle(f"{key}: {caption}"[:160] + (f"\n{warning}" if warning else ""), fontsize=11)
    for ax, name in zip(axes[0], panels):
        ax.set_axis_off()
        ax.set_title(name + (" (random weights)" if name in random_panels else ""),
                     color="red" if name in random_panels else "black")
        ext, data = sample[name]
        if name == "rgb":
            ax.imshow(rgb)
        elif name == "depth":
            depth = decode(data) / 65535.0
            low, high = np.percentile(depth, [2, 98])  # relative depth: stretch each image's own range
            ax.imshow(depth, cmap="turbo", vmin=low, vmax=max(high, low + 1e-6))
        elif name == "normal":
            ax.imshow(decode(data)[..., ::-1])
        elif name == "semseg":
            seg = decode(data)
            palette = plt.get_cmap("tab20", 20)
            ax.imshow(seg % 20, cmap=palette, vmin=0, vmax=19, interpolation="nearest")
            present = [c for c, n in zip(*np.unique(seg, return_counts=True)) if n > 0][:12]
            handles = [patches.Patch(color=palette(int(c) % 20), label=COCO_PANOPTIC[c] if c < 133 else str(c))
                       for c in present]
            ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
        elif name == "det":
            ax.imshow(rgb)
            height, width = rgb.shape[:2]
            for inst in json.loads(data)["instances"][:15]:
                x0, y0, x1, y1 = inst["boxes"]
                ax.add_patch(patches.Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height,
                                               fill=False, color="lime", linewidth=1.5))
                ax.text(x0 * width, y0 * height, f"{inst['class_name']} {inst['score']:.2f}", color="black",
                        fontsize=7, bbox={"facecolor": "lime", "pad": 1, "linewidth": 0})
        elif name == "clip":
            features = np.load(io.BytesIO(data))
            ax.imshow(clip_pca(features), interpolation="nearest")
            ax.set_title(f"clip {features.shape[0]}x{features.shape[1]}x{features.shape[2]} (PCA)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=80, metadata={"Title": f"4M sample {key}", "Description": warning or "labels from the "
                                                                                     "recorded models"})
    plt.close(fig)
    return out


def draw_masked_sample(sample: dict, tokenizer, out: str | Path) -> Path:
    """One masked sample: per image modality its 14x14 grid (visible inputs, targets, neither), per sequence
    the encoder's input and the decoder's target with their sentinels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    images = [m for m in sample if sample[m]["input_mask"].numel() == 196]
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
        ax.imshow(grid.reshape(14, 14).numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def draw_predictions(root: str | Path, model, batch: dict, out: str | Path, title: str = "") -> Path:
    """RGB, then per image-token modality the tokens' own decoding (the pseudo label as the model sees it) and
    the model's prediction from RGB alone, both decoded by the dataset's tokenizers; one row per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from models.vqvae import load_tokenizer
    from stages.fourm_data import pixels_picture
    from stages.tokenizer_data import tokenizer_name
    from stages.train_tokenizer import to_picture

    targets = [m for m in batch if m.startswith("tok_") and (Path(root) / "tokenizers" / m.split("@")[0].removeprefix(
        "tok_") / "model.safetensors").is_file()]
    if not targets:
        raise FileNotFoundError(f"no trained image tokenizer under {Path(root) / 'tokenizers'} to decode predictions")
    pixels = batch["rgb@224"]["tensor"]
    model.eval()
    predicted = model.predict_from_rgb(pixels, targets)
    columns = [("rgb", None, None)] + [(m, "tokens", batch[m]["tensor"]) for m in targets] + \
        [(m, "predicted from rgb", predicted[m]) for m in targets]
    decoded = {}
    for m in targets:
        name = tokenizer_name(m)
        tokenizer = load_tokenizer(Path(root) / "tokenizers" / name)
        generator = torch.Generator().manual_seed(0)
        decoded[(m, "tokens")] = tokenizer.detokenize(batch[m]["tensor"].long(), generator=generator)
        decoded[(m, "predicted from rgb")] = tokenizer.detokenize(predicted[m], generator=generator)
    rows = len(pixels)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 2.0 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, (m, kind, _) in enumerate(columns):
            ax = axes[r][c]
            if kind is None:
                image = pixels_picture(pixels[r])
            else:
                image = to_picture(tokenizer_name(m), decoded[(m, kind)][r].float())
            ax.imshow(image, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title("rgb" if kind is None else f"{m.split('@')[0]}\n{kind}", fontsize=7)
    fig.suptitle(title or "4M: each modality's tokens decoded, and predicted from RGB alone", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    tmp.replace(out)
    return out


def draw_loss_curves(metrics: str | Path, out: str | Path) -> Path:
    """Training loss per modality (and validation losses as points) against steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
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

    lines = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
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


def save_figure(fig, out: str | Path, dpi: int) -> Path:
    """Laid out, written aside and renamed into place (a reader never sees half a PNG), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out
