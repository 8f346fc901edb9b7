"""Metrics shared by evaluation and transfer, and the evaluations of 4M's predictions against pseudo labels.

An evaluation (one per evaluated modality, named by its registry entry) adds up a batch's figures for the
prediction and for the trivial baseline (each sample's mean map or majority class) and turns the sums into
scores; `stages/transfer/evaluate.py` runs them.
"""
from __future__ import annotations

import torch

IGNORE = 255  # segmentation pixels that count in no metric and no loss


def confusion(prediction: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts of (true, predicted), ignoring IGNORE pixels."""
    keep = target != IGNORE
    return torch.bincount(target[keep] * classes + prediction[keep], minlength=classes * classes) \
        .reshape(classes, classes).cpu()


def segmentation_scores(matrix: torch.Tensor) -> dict:
    """mIoU over the classes that occur (in the truth or the prediction) and pixel accuracy, in percent."""
    matrix = matrix.double()
    hit, truth, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    union = truth + predicted - hit
    present = union > 0
    return {"miou": float((hit[present] / union[present]).mean() * 100) if present.any() else 0.0,
            "pixel_accuracy": float(hit.sum() / matrix.sum().clamp(min=1) * 100)}


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


def crop_boxes(instances: list[dict], crop, image_size: tuple[int, int], min_score: float) -> list[dict]:
    """Boxes (normalised to the image) scoring at least min_score, moved into the crop, clipped, mirrored with
    it; boxes left without area are dropped."""
    top, left, h, w, flip = (float(v) for v in crop)
    height, width = image_size
    kept = []
    for inst in instances:
        if float(inst.get("score", 1.0)) < min_score:
            continue
        x0, y0, x1, y1 = inst["boxes"]
        x0, x1 = [min(max((x * width - left) / w, 0.0), 1.0) for x in (x0, x1)]
        y0, y1 = [min(max((y * height - top) / h, 0.0), 1.0) for y in (y0, y1)]
        if x1 <= x0 or y1 <= y0:
            continue
        if flip:
            x0, x1 = 1.0 - x1, 1.0 - x0
        kept.append({"boxes": [x0, y0, x1, y1], "class_name": inst["class_name"]})
    return kept


# -- evaluations: predictions (decoded, in the tokenizer's input form) against pseudo labels ------------------------
class Evaluation:
    """Sums over batches; `scores(count)` at the end. `classes`: the tokenizer's class count, if it has one."""

    def __init__(self, classes: int | None = None):
        self.classes, self.sums = classes, {}

    def _add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())

    def add(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        raise NotImplementedError

    def scores(self, count: int) -> dict:
        return {k: v / count for k, v in self.sums.items()}


def _mean_map(label: torch.Tensor) -> torch.Tensor:
    return label.mean((-2, -1), keepdim=True).expand_as(label)


class DepthEvaluation(Evaluation):
    """Standardised L1 and delta1 after scale and shift, beside each sample's mean depth."""

    def add(self, prediction, label):
        for key, values in depth_figures((prediction + 1) / 2, (label + 1) / 2).items():
            self._add(key, values)
        for key, values in depth_figures((_mean_map(label) + 1) / 2, (label + 1) / 2).items():
            self._add(f"{key}_baseline", values)


class NormalEvaluation(Evaluation):
    """Mean angle, beside each sample's mean normal."""

    def add(self, prediction, label):
        self._add("mean_angle_deg", normal_angles(prediction, label))
        self._add("mean_angle_deg_baseline", normal_angles(_mean_map(label), label))


class SegmentationEvaluation(Evaluation):
    """mIoU over the confusion of all samples, beside each sample's majority class."""

    def __init__(self, classes=None):
        super().__init__(classes)
        self.matrices = {}

    def add(self, prediction, label):
        classes = self.classes
        keep = label < classes
        truth = label.masked_fill(~keep, IGNORE)
        majority = torch.stack([t.flatten().bincount().argmax().expand_as(t) for t in label])
        for key, predicted in (("miou", prediction.argmax(1)), ("miou_baseline", majority)):
            self.matrices[key] = self.matrices.get(key, 0) + confusion(predicted, truth, classes)

    def scores(self, count):
        return {key: segmentation_scores(matrix)["miou"] for key, matrix in self.matrices.items()}
