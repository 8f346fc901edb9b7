"""Boxes from the paper's detector, ViTDet-H Cascade Mask R-CNN, through detectron2 (optional).

detectron2 is not on PyPI; it builds from source against the installed torch (README, "Boxes with ViTDet").
Its ViTDet configs are LazyConfig files in the source tree (`projects/ViTDet/configs/COCO/
cascade_mask_rcnn_vitdet_h_75ep.py`); the weights are a `model_final_*.pkl` path or URL. The model does its
own pixel normalization and padding; this class feeds it images resized as ViTDet's test loader does
(longest side 1024) and turns its instances into the same records as the transformers detector.

Not exercised by `make test`: CI cannot install detectron2. The record format, threshold and class names are
shared with `DetLabeler` (`detection_records`), which the tests cover.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from models.coco import COCO_THINGS
from models.labelers import DetLabeler, Labeler, detection_records, pick_device

INSTALL_HINT = ("detectron2 installs from source only: "
                "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
                "(needs a C++ compiler, and nvcc for CUDA ops)")


def detectron2_available() -> bool:
    return importlib.util.find_spec("detectron2") is not None


class Detectron2DetLabeler(Labeler):
    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, **options):
        if not detectron2_available():
            raise ImportError(f"label.det_backend is detectron2 but detectron2 is not importable; {INSTALL_HINT}")
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import LazyConfig, instantiate

        self.device = pick_device(device)
        self.batch_size, self.options = batch_size, options
        config = LazyConfig.load(path)
        for predictor in config.model.roi_heads.get("box_predictors", []):  # cascade: one per stage
            predictor.test_score_thresh = options.get("min_score", 0.6)  # drop weak boxes before NMS
        self.model = instantiate(config.model).to(self.device).eval()
        DetectionCheckpointer(self.model).load(options["weights"])
        from models.weights import model_record

        self.provenance = model_record(options["weights"], self.model)
        self.bgr = str(config.model.get("input_format", "BGR")).upper() == "BGR"

    def _autocast(self):
        # detectron2's ROI ops are not all bf16-safe; ViTDet's own inference runs in float32.
        return contextlib.nullcontext()

    def input_size(self, height, width):
        scale = self.options.get("input_size", 1024) / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def forward(self, x):
        pixels = x * 255.0  # detectron2 models take 0..255 pixels and normalize them themselves
        if self.bgr:
            pixels = pixels.flip(1)
        height, width = x.shape[-2:]
        outputs = self.model([{"image": p, "height": height, "width": width} for p in pixels])
        results = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            boxes = inst.pred_boxes.tensor.float() / torch.tensor([width, height, width, height])
            results.append((inst.scores.float(), inst.pred_classes, boxes.clamp_(0, 1)))
        return results

    def to_label(self, host):
        scores, labels, boxes = host
        return detection_records(scores, labels, boxes, COCO_THINGS, self.options.get("min_score", 0.6))


# -- the detector of the boxes modality: ViTDet through detectron2, or a transformers detector -------------------
def detector_options(cfg) -> dict:
    """The label section's detector settings; with detectron2 (`auto`: when it can run) its config and weights."""
    options = {"min_score": cfg.det_min_score}
    if cfg.resolved_det_backend() == "detectron2":
        options.update(backend="detectron2", config=cfg.det_detectron2_config, weights=cfg.det_detectron2_weights)
    return options


def check_detector(cfg) -> None:
    """Before any work: a detectron2 backend that cannot run is refused, with how to install it."""
    if cfg.resolved_det_backend() == "detectron2" and not detectron2_available():
        raise ImportError(f"label.det_backend is detectron2 but detectron2 is not importable; {INSTALL_HINT}")


def load_detector(path: str, device: str = "auto", batch_size: int = 8, backend: str = "transformers",
                  config: str | None = None, **options) -> Labeler:
    """The boxes labeler: `backend="detectron2"` takes its LazyConfig file as `config` (label.models' entry is
    not used then); otherwise a transformers detector from `path`."""
    if backend == "detectron2":
        return Detectron2DetLabeler(config, device, batch_size, **options)
    if backend != "transformers":
        raise ValueError(f"unknown detector backend {backend!r} (known: transformers, detectron2)")
    return DetLabeler(path, device, batch_size, **options)
