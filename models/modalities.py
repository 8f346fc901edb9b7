"""4M's seven modalities (the paper's CC12M set), each defined once.

Each entry: its name (its folder, its tokenizer's folder; 4M sees it as tok_<name>@224 or by its own name), how
it is stored and labelled, its tokenizer's settings at the paper's size (Table 3: codebook, decoder, loss), how
it is cropped and drawn, and how 4M's predictions of it are evaluated. `core/registry.py` says what the fields
mean; `models/modality_kinds.py` holds the behaviour of each family.
"""
from __future__ import annotations

from functools import partial

from core.registry import Labeling, register
from models import detectron2_det, labelers, metrics, random_weights
from models.coco import COCO_PANOPTIC
from models.modality_kinds import (
    BoxesModality,
    ClassMapModality,
    DenseModality,
    FeatureMapModality,
    NormalMapModality,
    PhotoModality,
    SequenceModality,
)

OMNIDATA_HINT = ("convert Omnidata's omnidata_dpt_{task}_v2.ckpt with `python -m pipeline convert-omnidata --task "
                 "{task} --checkpoint omnidata_dpt_{task}_v2.ckpt --out {{path}}`")


def _labeling(load, weights: str, random_model, options=lambda cfg: {}, hint: str | None = None,
              **more) -> Labeling:
    return Labeling(load=load, weights=weights, random_model=random_model, options=options,
                    **({"weights_hint": hint} if hint else {}), **more)


class Rgb(PhotoModality):
    name, label_order = "rgb", 0
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_rgb_16k_224-448"
    tokenizer = dict(in_channels=3, codebook_size=16384, decoder="diffusion", loss="mse")


class Caption(SequenceModality):
    name, label_order, downloaded = "caption", 5, True


class Depth(DenseModality):
    """Omnidata DPT-Hybrid relative depth in [0, 1], stored as 16-bit PNG."""

    name, label_order, scale = "depth", 1, 65535.0
    standardised, published_tokenizer = True, "EPFL-VILAB/4M_tokenizers_depth_8k_224-448"
    baseline_name = "mean-depth map"
    labeler = _labeling(labelers.DepthLabeler, "models/omnidata/depth", partial(random_weights.dpt, channels=1),
                        hint=OMNIDATA_HINT.format(task="depth"))
    tokenizer = dict(in_channels=1, codebook_size=8192, decoder="diffusion", loss="smooth_l1")
    evaluation = metrics.DepthEvaluation


class Normal(NormalMapModality):
    """Omnidata DPT-Hybrid surface normals, components in [0, 1], stored as 8-bit RGB PNG."""

    name, label_order = "normal", 2
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_normal_8k_224-448"
    labeler = _labeling(labelers.NormalLabeler, "models/omnidata/normal", partial(random_weights.dpt, channels=3),
                        hint=OMNIDATA_HINT.format(task="normal"))
    tokenizer = dict(in_channels=3, codebook_size=8192, decoder="diffusion", loss="mse")
    evaluation = metrics.NormalEvaluation


class Semseg(ClassMapModality):
    """Mask2Former semantic classes (COCO panoptic, 0..132), stored as 8-bit PNG."""

    name, label_order = "semseg", 3
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_semseg_4k_224-448"
    class_names = COCO_PANOPTIC
    labeler = _labeling(labelers.SemsegLabeler, "facebook/mask2former-swin-base-coco-panoptic",
                        random_weights.mask2former, lambda cfg: {"short_side": cfg.semseg_short_side})
    tokenizer = dict(in_channels=133, codebook_size=4096, decoder="vit", loss="ce", dtype="bfloat16")
    evaluation = metrics.SegmentationEvaluation


class Det(BoxesModality):
    """Boxes from a DETR-family detector (D-FINE), or ViTDet through detectron2 (`label.det_backend`)."""

    name, label_order = "det", 6
    labeler = _labeling(detectron2_det.load_detector, "ustc-community/dfine-xlarge-obj2coco", random_weights.dfine,
                        detectron2_det.detector_options, check=detectron2_det.check_detector,
                        weights_used=lambda cfg: cfg.resolved_det_backend() != "detectron2")


class Clip(FeatureMapModality):
    """CLIP ViT-B/16 patch features (512-d after the projection), one per 16x16 patch at shortest side 224."""

    name, label_order = "clip", 4
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_CLIP-B16_8k_224-448"
    # transformers' classes by default; `label.options.clip.library: open_clip` reads an open_clip model instead
    labeler = _labeling(
        labelers.load_clip_labeler, "openai/clip-vit-base-patch16", random_weights.clip,
        lambda cfg: {"short_side": cfg.clip_short_side},
        check=lambda cfg: labelers.check_clip_library("clip", cfg.options_of("clip"), cfg.models.get("clip", "")),
        weights_used=lambda cfg: cfg.options_of("clip").get("library", "transformers") == "transformers")
    tokenizer = dict(in_channels=512, codebook_size=8192, decoder="vit", loss="smooth_l1", patch_size=1,
                     crop_scale=(0.2, 1.0), dtype="bfloat16")
    # The published tokenizer's training normalised each crop with ImageNet's mean and std before CLIP
    # (`imagenet_default_mean_and_std: True` in its config), not CLIP's own: tokenize does the same for it
    per_crop_options = {"short_side": 224, "normalisation": "imagenet"}


for _modality in (Rgb(), Caption(), Depth(), Normal(), Semseg(), Det(), Clip()):
    register(_modality)
