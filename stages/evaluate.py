"""Out-of-the-box evaluation of a 4M model on the dataset's own held-out shards: RGB in, depth, normals and
segmentation out, scored against the pseudo labels (the paper's zero-shot transfers, Table 31, on our data).

Consumes  <root>/rgb/, crop_settings/ and the pseudo labels depth/, normal/, semseg/ of the validation shards
          (the last `pretrain.val_shards`, never trained on); <root>/tokenizers/<modality>/ to decode
          --model DIR   a 4M model (a pretraining run's folder or a convert-4m output)
Produces  <model>/evaluation/
              results.json      per modality its scores, beside what predicting each sample's mean (or majority
                                class) scores; the masked validation loss per modality
              predictions.png   RGB, each pseudo label and its prediction from RGB alone, a row per sample

Each sample is cut at its stored center crop (crop index 0, as validation reads it); the model predicts every
token of each target from RGB alone in one pass (`FourM.predict_from_rgb`), the dataset's tokenizer decodes it,
and the pseudo label is cut at the same crop. Depth is relative (the labeler's), so it is scored after
standardising both maps per sample (standardised L1) and, for delta1, after a least-squares scale and shift of
the prediction onto the label; normals by their mean angle; segmentation by mIoU over the dataset.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from stages.transfer import confusion, segmentation_scores

TARGETS = {"tok_depth@224": "depth", "tok_normal@224": "normal", "tok_semseg@224": "semseg"}


class EvaluateInputError(ValueError):
    """A model or dataset that cannot be evaluated: names what is missing."""


# -- metrics --------------------------------------------------------------------------------------------------------
def _standardise(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp(min=1e-6)


def depth_figures(prediction: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample, on relative depth in [0, 1] (B, 1, H, W): standardised L1, and delta1 (the share of pixels
    within 1.25x) after a least-squares scale and shift of the prediction onto the label."""
    p, t = prediction.flatten(1).double(), label.flatten(1).double()
    l1 = (_standardise(p) - _standardise(t)).abs().mean(1)
    design = torch.stack([p, torch.ones_like(p)], -1)  # (B, N, 2): scale and shift
    solution = torch.linalg.lstsq(design, t[..., None]).solution
    aligned = (design @ solution)[..., 0].clamp(min=1e-3)
    valid = t > 1e-3
    ratio = torch.maximum(aligned / t.clamp(min=1e-3), t.clamp(min=1e-3) / aligned)
    delta1 = ((ratio < 1.25) & valid).sum(1) / valid.sum(1).clamp(min=1)
    return {"standardised_l1": l1.float(), "delta1": (delta1 * 100).float()}


def normal_angles(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per sample mean angle (degrees) between predicted and labelled normals, (B, 3, H, W) in [-1, 1]."""
    cos = torch.nn.functional.cosine_similarity(prediction.double(), label.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).flatten(1).mean(1).float()


def baseline_of(modality: str, label: torch.Tensor) -> torch.Tensor:
    """What predicting each sample's mean depth or normal, or its majority class, would be."""
    if modality == "semseg":
        return torch.stack([t.flatten().bincount().argmax().expand_as(t) for t in label])
    return label.mean((-2, -1), keepdim=True).expand_as(label)


def decode(tokenizer, ids: torch.Tensor, first: int = 0, seeds: list[int] | None = None) -> torch.Tensor:
    """Token ids -> maps. A diffusion decoder starts each sample from its own seeded noise (seed: `seeds`, or the
    sample's index in the evaluation from `first` on), so a result does not depend on how samples were batched."""
    if tokenizer.cfg.decoder != "diffusion":
        return tokenizer.detokenize(ids).float()
    shape = (tokenizer.cfg.in_channels, tokenizer.cfg.image_size, tokenizer.cfg.image_size)
    seeds = list(range(first, first + len(ids))) if seeds is None else seeds
    start = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return tokenizer.detokenize(ids, start=start.to(ids.device)).float()


# -- reading the validation samples with their pseudo labels --------------------------------------------------------
def _labels_following(root, modality: str, shard: str):
    """A cursor over a label shard: `take(key)` skips labels of samples that did not reach the token shards."""
    from stages.shards import DatasetLayout
    from stages.tokenizer_data import shard_samples

    stream = shard_samples(DatasetLayout(root), modality, shard)

    def take(key: str):
        for label_key, label, size in stream:
            if label_key == key:
                return label, size
        raise EvaluateInputError(f"{modality}/{shard}: no pseudo label for sample {key} (relabel the shard)")
    return take


def validation_samples(root, modalities: list[str], val_shards: list[str], count: int):
    """Up to `count` (key, pixels (3, 224, 224), {modality: label at the same crop}) from the validation shards."""
    from stages.fourm_data import crop_pixels, shard_samples
    from stages.tokenizer_data import crop_to_tensor

    produced = 0
    for shard in val_shards:
        cursors = {m: _labels_following(root, m, shard) for m in modalities}
        for raw in shard_samples(root, shard, ["crop_settings", "rgb"]):
            crop = np.load(io.BytesIO(raw["crop_settings"]))[0]
            labels = {}
            for m in modalities:
                label, size = cursors[m](raw["__key__"])
                labels[m] = crop_to_tensor(m, label, crop, size)
            yield raw["__key__"], crop_pixels(raw["rgb"], crop), labels
            produced += 1
            if produced == count:
                return


# -- the evaluation -------------------------------------------------------------------------------------------------
def evaluation_dir(model_dir) -> Path:
    return Path(model_dir) / "evaluation"


@torch.no_grad()
def run_evaluate(root, config, model_dir, samples: int = 200, batch_size: int = 16, pictures: int = 4) -> dict:
    """Score the model's predictions from RGB alone against the pseudo labels; returns the results."""
    from models.fourm import FourM
    from models.vqvae import load_tokenizer
    from stages.fourm_data import split_shards

    root = Path(root)
    model = FourM.from_pretrained(model_dir).eval()
    if "rgb@224" not in model.cfg.domains_in:
        raise EvaluateInputError(f"{model_dir}: the model has no RGB pixel embedding to predict from")
    targets = {m: name for m, name in TARGETS.items()
               if m in model.cfg.domains_out and (root / "tokenizers" / name / "model.safetensors").is_file()
               and (root / name).is_dir()}
    if not targets:
        raise EvaluateInputError(f"{model_dir}: predicts none of {list(TARGETS)} with a tokenizer under "
                                 f"{root / 'tokenizers'} and pseudo labels under {root}")
    _, val_shards = split_shards(root, config.pretrain.modalities, config.pretrain.val_shards)
    if not val_shards:
        raise EvaluateInputError(f"{root}: no held-out validation shards (pretrain.val_shards is 0)")
    tokenizers = {m: load_tokenizer(root / "tokenizers" / name).eval() for m, name in targets.items()}
    sums, matrices, count = {name: {} for name in targets.values()}, {}, 0
    stream = validation_samples(root, list(targets.values()), val_shards, samples)
    while chunk := [sample for _, sample in zip(range(batch_size), stream)]:
        pixels = torch.stack([p for _, p, _ in chunk])
        predicted = model.predict_from_rgb(pixels, list(targets))
        for m, name in targets.items():
            label = torch.stack([labels[name] for _, _, labels in chunk])
            decoded = decode(tokenizers[m], predicted[m], count)
            _accumulate(name, decoded, label, tokenizers[m].cfg.in_channels, sums[name], matrices)
        count += len(chunk)
    if count == 0:
        raise EvaluateInputError(f"{root}: the validation shards {val_shards} hold no samples")
    results = {"model": str(model_dir), "samples": count, "val_shards": val_shards,
               "scores": {name: _finish(name, sums[name], matrices, count) for name in targets.values()}}
    results["val_loss"] = _validation_loss(root, config, model)
    folder = evaluation_dir(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    results["picture"] = str(draw(folder / "predictions.png", root, model, tokenizers, targets, val_shards,
                                  pictures, results["scores"]))
    tmp = folder / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(folder / "results.json")
    return results


def _accumulate(name: str, decoded, label, classes: int, sums: dict, matrices: dict) -> None:
    def add(key, values):
        sums[key] = sums.get(key, 0.0) + float(values.sum())

    baseline = baseline_of(name, label)
    if name == "depth":
        for key, values in depth_figures((decoded + 1) / 2, (label + 1) / 2).items():
            add(key, values)
        for key, values in depth_figures((baseline + 1) / 2, (label + 1) / 2).items():
            add(f"{key}_baseline", values)
    elif name == "normal":
        add("mean_angle_deg", normal_angles(decoded, label))
        add("mean_angle_deg_baseline", normal_angles(baseline, label))
    else:
        keep = label < classes
        truth = label.masked_fill(~keep, 255)
        matrices["semseg"] = matrices.get("semseg", 0) + confusion(decoded.argmax(1), truth, classes)
        matrices["semseg_baseline"] = matrices.get("semseg_baseline", 0) + confusion(baseline, truth, classes)


def _finish(name: str, sums: dict, matrices: dict, count: int) -> dict:
    if name == "semseg":
        return {"miou": segmentation_scores(matrices["semseg"])["miou"],
                "miou_baseline": segmentation_scores(matrices["semseg_baseline"])["miou"]}
    return {k: v / count for k, v in sums.items()}


def _validation_loss(root, config, model) -> dict:
    from stages.fourm_data import is_sequence, make_loader, text_tokenizer_of
    from stages.pretrain import validate

    cfg = config.pretrain
    tokenizer = text_tokenizer_of(root) if any(is_sequence(m) for m in cfg.modalities) else None
    loader = make_loader(root, config, tokenizer, split="val", batch_size=min(cfg.batch_size, 16), workers=0)
    return validate(model, loader, cfg.input_tokens, cfg.target_tokens, cfg.val_batches, torch.device("cpu"))


@torch.no_grad()
def draw(path: Path, root, model, tokenizers: dict, targets: dict, val_shards: list[str], rows: int,
         scores: dict) -> Path:
    """RGB, then per modality the pseudo label and the prediction from RGB alone; a row per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.fourm_data import pixels_picture
    from stages.train_tokenizer import to_picture

    chunk = list(validation_samples(root, list(targets.values()), val_shards, rows))
    pixels = torch.stack([p for _, p, _ in chunk])
    predicted = model.predict_from_rgb(pixels, list(targets))
    decoded = {name: decode(tokenizers[m], predicted[m], 0) for m, name in targets.items()}
    names = list(targets.values())
    columns = 1 + 2 * len(names)
    fig, axes = plt.subplots(len(chunk), columns, figsize=(1.9 * columns, 2.0 * len(chunk) + 0.8), squeeze=False)
    for r, (key, pixel, labels) in enumerate(chunk):
        axes[r][0].imshow(pixels_picture(pixel))
        for c, name in enumerate(names):
            for offset, (kind, image) in enumerate((("pseudo label", labels[name]), ("from rgb", decoded[name][r]))):
                axes[r][1 + 2 * c + offset].imshow(to_picture(name, image.float()), interpolation="nearest")
                if r == 0:
                    figure = ", ".join(f"{k} {v:.3g}" for k, v in scores[name].items() if not k.endswith("baseline"))
                    axes[0][1 + 2 * c + offset].set_title(f"{name} {kind}" + (f"\n{figure}" if offset else ""),
                                                          fontsize=7)
        axes[r][0].set_title(key if r else f"rgb\n{key}", fontsize=7)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle("4M from RGB alone\nbeside the pseudo labels", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    tmp.replace(path)
    return path
