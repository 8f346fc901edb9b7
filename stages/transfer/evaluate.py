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
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.files import write_json
from core.pictures import figure_backend, save_figure
from core.storage import MODEL_FILES, DataPath, data_path, local_copy
from models.fourm import FourM
from models.metrics import depth_figures, normal_angles  # noqa: F401 - the metrics evaluate reports, tested here
from stages.dataset.shards import CROPS, DatasetLayout
from stages.fourm.datasets import make_loader
from stages.fourm.fourm_data import (
    crop_pixels,
    is_sequence,
    pixels_picture,
    split_shards,
    text_tokenizer_of,
)
from stages.fourm.fourm_data import shard_samples as loader_samples
from stages.fourm.pretrain import validate
from stages.tokenizers import dataset_tokenizers as tokenizers
from stages.tokenizers.tokenizer_data import crop_to_tensor, shard_samples


class EvaluateInputError(ValueError):
    """A model or dataset that cannot be evaluated: names what is missing."""


# -- reading the validation samples with their pseudo labels --------------------------------------------------------
def _labels_following(root, modality: str, shard: str):
    """A cursor over a label shard: `take(key)` skips labels of samples that did not reach the token shards."""
    stream = shard_samples(DatasetLayout(root), modality, shard)

    def take(key: str):
        for label_key, label, size in stream:
            if label_key == key:
                return label, size
        raise EvaluateInputError(f"{modality}/{shard}: no pseudo label for sample {key} (relabel the shard)")
    return take


def validation_samples(root, modalities: list[str], val_shards: list[str], count: int):
    """Up to `count` (key, pixels (3, 224, 224), {modality: label at the same crop}) from the validation shards."""
    photo = registry.photo().folder
    produced = 0
    for shard in val_shards:
        cursors = {m: _labels_following(root, m, shard) for m in modalities}
        for raw in loader_samples(root, shard, [CROPS, photo]):
            crop = np.load(io.BytesIO(raw[CROPS]))[0]
            labels = {}
            for m in modalities:
                label, size = cursors[m](raw["__key__"])
                labels[m] = crop_to_tensor(m, label, crop, size)
            yield raw["__key__"], crop_pixels(raw[photo], crop), labels
            produced += 1
            if produced == count:
                return


# -- the evaluation -------------------------------------------------------------------------------------------------
def evaluation_dir(model_dir) -> DataPath:
    return data_path(model_dir) / "evaluation"


@torch.no_grad()
def run_evaluate(root, config, model_dir, samples: int = 200, batch_size: int = 16, pictures: int = 4) -> dict:
    """Score the model's predictions from RGB alone against the pseudo labels; returns the results."""
    layout = DatasetLayout(root)
    root = layout.root
    model = FourM.from_pretrained(local_copy(data_path(model_dir), MODEL_FILES)).eval()
    if model.cfg.pixels_input is None:
        raise EvaluateInputError(f"{model_dir}: the model has no RGB pixel embedding to predict from")
    evaluated = {d.name: d.modality.name for d in model.cfg.modality_set.domains()
                 if d.kind == "tokens" and getattr(d.modality, "evaluation", None) is not None}
    targets = {m: name for m, name in evaluated.items()
               if m in model.cfg.domains_out and tokenizers.has_model(root, name) and layout.folder(name).is_dir()}
    if not targets:
        raise EvaluateInputError(f"{model_dir}: predicts none of {list(evaluated)} with a tokenizer under "
                                 f"{layout.tokenizers_dir} and pseudo labels under {root}")
    _, val_shards = split_shards(root, config.pretrain.modalities, config.pretrain.val_shards)
    if not val_shards:
        raise EvaluateInputError(f"{root}: no held-out validation shards (pretrain.val_shards is 0)")
    loaded = {m: tokenizers.load(root, name) for m, name in targets.items()}
    scorers = {name: registry.get(name).evaluation(loaded[m].classes) for m, name in targets.items()}
    count = 0
    stream = validation_samples(root, list(targets.values()), val_shards, samples)
    while chunk := [sample for _, sample in zip(range(batch_size), stream)]:
        pixels = torch.stack([p for _, p, _ in chunk])
        predicted = model.predict_from_rgb(pixels, list(targets))
        for m, name in targets.items():
            label = torch.stack([labels[name] for _, _, labels in chunk])
            scorers[name].add(loaded[m].decode(predicted[m], count), label)
        count += len(chunk)
    if count == 0:
        raise EvaluateInputError(f"{root}: the validation shards {val_shards} hold no samples")
    results = {"model": str(model_dir), "samples": count, "val_shards": val_shards,
               "scores": {name: scorer.scores(count) for name, scorer in scorers.items()}}
    results["val_loss"] = _validation_loss(root, config, model)
    folder = evaluation_dir(model_dir)
    results["picture"] = str(draw(folder / "predictions.png", root, model, loaded, targets, val_shards,
                                  pictures, results["scores"]))
    write_json(folder / "results.json", results)
    return results


def _validation_loss(root, config, model) -> dict:
    cfg = config.pretrain
    tokenizer = text_tokenizer_of(root) if any(is_sequence(m) for m in cfg.modalities) else None
    loader = make_loader(root, config, tokenizer, split="val", batch_size=min(cfg.batch_size, 16), workers=0)
    return validate(model, loader, cfg.input_tokens, cfg.target_tokens, cfg.val_batches, torch.device("cpu"))


@torch.no_grad()
def draw(path: Path, root, model, loaded: dict, targets: dict, val_shards: list[str], rows: int,
         scores: dict) -> Path:
    """RGB, then per modality the pseudo label and the prediction from RGB alone; a row per sample."""
    plt = figure_backend()
    chunk = list(validation_samples(root, list(targets.values()), val_shards, rows))
    pixels = torch.stack([p for _, p, _ in chunk])
    predicted = model.predict_from_rgb(pixels, list(targets))
    decoded = {name: loaded[m].decode(predicted[m]) for m, name in targets.items()}
    names = list(targets.values())
    columns = 1 + 2 * len(names)
    fig, axes = plt.subplots(len(chunk), columns, figsize=(1.9 * columns, 2.0 * len(chunk) + 0.8), squeeze=False)
    for r, (key, pixel, labels) in enumerate(chunk):
        axes[r][0].imshow(pixels_picture(pixel))
        for c, name in enumerate(names):
            for offset, (kind, image) in enumerate((("pseudo label", labels[name]), ("from rgb", decoded[name][r]))):
                axes[r][1 + 2 * c + offset].imshow(tokenizers.picture(name, image.float()), interpolation="nearest")
                if r == 0:
                    figure = ", ".join(f"{k} {v:.3g}" for k, v in scores[name].items() if not k.endswith("baseline"))
                    axes[0][1 + 2 * c + offset].set_title(f"{name} {kind}" + (f"\n{figure}" if offset else ""),
                                                          fontsize=7)
        axes[r][0].set_title(key if r else f"{registry.photo().name}\n{key}", fontsize=7)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle("4M from RGB alone\nbeside the pseudo labels", fontsize=9)
    return save_figure(fig, path, dpi=70)
