"""Pseudo labelers: one small class per network, each with one loading path and one batched call.

Every labeler loads with `from_pretrained(path)`, where path is a Hugging Face hub id (the `paper` profile)
or a local folder written by `save_pretrained` (the `demo` profile's tiny random-weight models, and Omnidata
checkpoints after conversion). A call takes a batch of same-sized uint8 RGB arrays (H, W, 3) and returns
one label per image at that image's resolution (CLIP: one feature map per image):

    depth   float32 (H, W) in [0, 1]       Omnidata DPT-Hybrid v2, relative depth
    normal  float32 (H, W, 3) in [0, 1]    Omnidata DPT-Hybrid v2, 3 output channels
    semseg  uint8 (H, W) class ids         Mask2Former, argmax over the semantic classes (COCO panoptic: 133)
    det     list of {boxes, class_name, score}, boxes normalized (xmin, ymin, xmax, ymax)
    clip    float32 (h, w, D)              CLIP ViT-B/16 patch tokens after the final layer norm and the
                                           projection; shortest side 224, so 14x14x512 for a square image

For the stage, a call is split in two so that the device need not idle between batches: `launch` queues one
batch (forward pass, resizing to each image's size, the copy back to pinned host memory) and returns at once;
`collect` waits for that batch and builds its labels. `run_overlapped` launches batch n+1 before collecting
batch n, and `SizeBuckets` fills batches with images of one model input size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from core import registry

hf_logging.disable_progress_bar()  # per-load bars would drown the stage's own progress

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Launched:
    """One batch queued on the device: its outputs (host copies that may still be in flight) and the event
    that marks the end of its work."""

    outputs: list
    event: Any = None

    def wait(self) -> float:
        """Block until the batch is done; returns the seconds spent waiting (0 on a CPU, or once done)."""
        if self.event is None:
            return 0.0
        start = time.perf_counter()
        self.event.synchronize()
        self.event = None  # done: `collect` after `run_overlapped`'s timed wait does not wait again
        return time.perf_counter() - start


def _to_host(value):
    if isinstance(value, torch.Tensor):
        return value.to("cpu", non_blocking=True)  # from a GPU: into pinned memory, without waiting
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


class Labeler:
    """Shared plumbing: loading, device, bf16 autocast on GPUs, and batching.

    A call takes images of any sizes; they are grouped by the model input size the labeler asks for
    (`input_size`), resized on the device, run `batch_size` at a time, and each output is handed to `finish`
    (on the device) with its own image's size, then to `to_label` (on the host).
    """

    mean: tuple | None = None
    std: tuple | None = None

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, **options):
        from models.weights import model_record

        self.device = pick_device(device)
        model = self.model_class().from_pretrained(path)
        self.provenance = model_record(path, model)  # what made the labels: recorded in every shard's stats
        self.model = model.to(self.device).eval()
        self.batch_size, self.options = batch_size, options

    def model_class(self):
        raise NotImplementedError

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list:
        """A normalized batch (B, 3, h, w) -> B raw outputs, left on the device."""
        raise NotImplementedError

    def finish(self, raw, height: int, width: int):
        """One raw output -> the label's tensors at the image's own size, still on the device (no waiting)."""
        return raw

    def to_label(self, host):
        """`finish`'s tensors, now on the host -> the label handed back."""
        return host.numpy()

    def _autocast(self):
        # bf16 on GPUs (the models bound the stage there); full precision on CPUs, where bf16 is slow.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            x = x.pin_memory()  # page-locked: the copy to the GPU runs asynchronously
        return x.to(self.device, non_blocking=True)

    def _batch(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        if len({im.shape for im in images}) == 1:  # the usual case: one transfer, one resize
            x = self._to_device(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = torch.cat([F.interpolate(self._to_device(im).permute(2, 0, 1)[None].float().div_(255.0), size=size,
                                         mode="bilinear", align_corners=False, antialias=True) for im in images])
        if self.mean is not None:
            mean, std = self._mean_std
            x = x.sub_(mean).div_(std)
        return x

    @cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once: building them per batch copied two small tensors to the GPU, and such a blocking copy
        # waits for everything queued before it, which would undo the overlap of batches.
        return (torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=self.device).view(1, 3, 1, 1))

    @torch.inference_mode()
    def launch(self, images: list[np.ndarray]) -> Launched:
        """Queue one batch of images that share a model input size; returns without waiting for the device."""
        with self._autocast():
            raws = self.forward(self._batch(images, self.input_size(*images[0].shape[:2])))
        return self._launched(_to_host([self.finish(raw, *im.shape[:2]) for raw, im in zip(raws, images)]))

    def _launched(self, outputs: list) -> Launched:
        """Outputs on their way to the host, with the event that says when they are there (on a GPU)."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return Launched(outputs, event)

    @torch.inference_mode()
    def collect(self, launched: Launched) -> list:
        launched.wait()
        return [self.to_label(out) for out in launched.outputs]

    def __call__(self, images: list[np.ndarray]) -> list:
        """Labels for images of any sizes, in order; raises if any batch fails."""
        buckets = SizeBuckets(self.input_size, self.batch_size, window=len(images))
        batches = [b for i, im in enumerate(images) for b in buckets.add(i, im)] + buckets.flush()
        results: list = [None] * len(images)
        for done in run_overlapped((self, [i for i, _ in b], [im for _, im in b]) for b in batches):
            if done.error is not None:
                raise done.error
            for i, label in zip(done.tag, done.labels):
                results[i] = label
        return results


class SizeBuckets:
    """Batches of images that share a model input size, filled across calls to `add`.

    A bucket goes out when it holds `batch_size` images; while more than `window` images wait, the bucket
    holding the oldest one goes out part-full, so no image waits behind more than `window` later ones (this
    bounds memory and how far the ordered writers lag); `flush` empties every bucket, oldest first.
    """

    def __init__(self, input_size, batch_size: int, window: int):
        self.input_size, self.batch_size, self.window = input_size, batch_size, window
        # Insertion order is the order of each bucket's oldest image: a bucket is created by its first image.
        self.buckets: dict[tuple[int, int], list] = {}
        self.waiting = 0

    def add(self, tag, image: np.ndarray) -> list[list[tuple[Any, np.ndarray]]]:
        size = self.input_size(*image.shape[:2])
        self.buckets.setdefault(size, []).append((tag, image))
        self.waiting += 1
        ready = [self._pop(size)] if len(self.buckets[size]) == self.batch_size else []
        while self.waiting > self.window:
            ready.append(self._pop(next(iter(self.buckets))))
        return ready

    def flush(self) -> list[list[tuple[Any, np.ndarray]]]:
        return [self._pop(size) for size in list(self.buckets)]

    def _pop(self, size) -> list[tuple[Any, np.ndarray]]:
        batch = self.buckets.pop(size)
        self.waiting -= len(batch)
        return batch


@dataclass
class BatchDone:
    """One batch's outcome: its labels, or the error that sank it; seconds spent on it on this thread (launch
    and collect) and, of those, seconds spent waiting for the device."""

    labeler: Labeler
    tag: Any
    images: list
    labels: list | None
    error: Exception | None
    seconds: float
    waited: float


def run_overlapped(jobs: Iterable[tuple[Labeler, Any, list[np.ndarray]]]) -> Iterator[BatchDone]:
    """(labeler, tag, images) batches -> their outcomes, in order, with one batch always queued ahead.

    Batch n+1 is launched before batch n is collected, so the device works on it while the host reads back
    and hands on batch n's labels and prepares the next batch; the device idles only when preparing and
    launching a batch takes longer than running one.
    """
    in_flight = None
    for labeler, tag, images in jobs:
        start = time.perf_counter()
        try:
            launched = labeler.launch(images)
        except Exception as err:  # noqa: BLE001 - the caller decides (retry alone, record)
            launched = err
        launch_seconds = time.perf_counter() - start
        if in_flight is not None:
            yield _collect(*in_flight)
        in_flight = (labeler, tag, images, launched, launch_seconds)
    if in_flight is not None:
        yield _collect(*in_flight)


def _collect(labeler, tag, images, launched, launch_seconds) -> BatchDone:
    if isinstance(launched, Exception):
        return BatchDone(labeler, tag, images, None, launched, launch_seconds, 0.0)
    start, waited = time.perf_counter(), 0.0
    try:
        waited = launched.wait()
        labels, error = labeler.collect(launched), None
    except Exception as err:  # noqa: BLE001
        labels, error = None, err
    return BatchDone(labeler, tag, images, labels, error, launch_seconds + time.perf_counter() - start, waited)


def _multiple(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def dpt_input_size(height: int, width: int, max_side: int = 768) -> tuple[int, int]:
    """The paper's DPT input: each side to the closest multiple of 32, the longest side at most max_side."""
    scale = min(1.0, max_side / max(height, width))
    return tuple(min(_multiple(s * scale, 32), max_side // 32 * 32) for s in (height, width))


def dpt_forward(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """DPT-Hybrid at any size that is a multiple of 32, square or not.

    transformers' own forward assumes the configured square size for hybrid models (it neither interpolates
    the position embeddings nor tells the neck the token grid); this runs its submodules with both.
    """
    cfg, dpt = model.config, model.dpt
    embedded = dpt.embeddings(pixel_values, interpolate_pos_encoding=True)
    hidden, layer_outputs = embedded.last_hidden_states, []
    for layer in dpt.encoder.layer:
        hidden = layer(hidden)
        layer_outputs.append(hidden)
    features = list(embedded.intermediate_activations)
    features += [h for i, h in enumerate(layer_outputs) if i in cfg.backbone_out_indices[2:]]
    height, width = pixel_values.shape[-2:]
    return model.head(model.neck(features, height // cfg.patch_size, width // cfg.patch_size))


class DepthLabeler(Labeler):
    """Omnidata DPT-Hybrid depth: relative depth clamped to [0, 1], as Omnidata's own inference does."""

    mean, std = (0.5,) * 3, (0.5,) * 3

    def model_class(self):
        from transformers import DPTForDepthEstimation

        return DPTForDepthEstimation

    def input_size(self, height, width):
        return dpt_input_size(height, width, self.options.get("max_side", 768))

    def forward(self, x):
        out = dpt_forward(self.model, x).float()
        return list(out if out.ndim == 4 else out.unsqueeze(1))

    def finish(self, raw, height, width):
        return F.interpolate(raw[None], size=(height, width), mode="bilinear", align_corners=False)[0].clamp_(0, 1)

    def to_label(self, host):
        out = host.numpy()
        return out[0] if out.shape[0] == 1 else out.transpose(1, 2, 0)


class NormalLabeler(DepthLabeler):
    """Omnidata DPT-Hybrid surface normals: 3 channels in [0, 1] (x, y, z mapped from [-1, 1]).

    Omnidata trained the normal network on pixels in [0, 1], unlike depth (normalized to [-1, 1]).
    """

    mean, std = None, None

    def model_class(self):
        from models.dpt_normals import DPTForSurfaceNormals

        return DPTForSurfaceNormals


class SemsegLabeler(Labeler):
    """Mask2Former: per-pixel argmax of sum_q p(class | q) * sigmoid(mask_q), the semantic inference."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def model_class(self):
        from transformers import Mask2FormerForUniversalSegmentation

        return Mask2FormerForUniversalSegmentation

    def input_size(self, height, width):
        scale = self.options.get("short_side", 384) / min(height, width)
        return _multiple(height * scale, 32), _multiple(width * scale, 32)

    def forward(self, x):
        out = self.model(pixel_values=x)
        classes = out.class_queries_logits.float().softmax(-1)[..., :-1]  # drop "no object"
        masks = out.masks_queries_logits.float().sigmoid()
        return list(torch.einsum("bqc,bqhw->bchw", classes, masks))

    def finish(self, raw, height, width):
        semantic = F.interpolate(raw[None], size=(height, width), mode="bilinear", align_corners=False)
        return semantic[0].argmax(0).to(torch.uint8)


class DetLabeler(Labeler):
    """A transformers DETR-family detector (D-FINE by default): instances scoring at least min_score."""

    def model_class(self):
        from transformers import AutoModelForObjectDetection

        return AutoModelForObjectDetection

    def input_size(self, height, width):
        side = self.options.get("input_size", 640)
        return side, side

    def forward(self, x):
        out = self.model(pixel_values=x)
        scores, labels = out.logits.float().sigmoid().max(-1)
        cx, cy, w, h = out.pred_boxes.float().clamp(0, 1).unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp_(0, 1)
        return list(zip(scores, labels, boxes))

    def to_label(self, host):
        scores, labels, boxes = host
        return detection_records(scores, labels, boxes, self.model.config.id2label,
                                 self.options.get("min_score", 0.6))


def detection_records(scores, labels, boxes, names, min_score: float) -> list[dict]:
    """Detections -> the det JSON's instances: score >= min_score, best first, normalized xyxy boxes."""
    keep = (scores >= min_score).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    return [{"boxes": [round(float(v), 5) for v in boxes[i]], "class_name": names[int(labels[i])],
             "score": round(float(scores[i]), 4)} for i in keep]


class PatchFeatureLabeler(Labeler):
    """A ViT's patch features: the image resized to `short_side` (224) on its shortest side, each side a
    multiple of the model's patch."""

    def input_size(self, height, width):
        patch = self.model.config.patch_size
        scale = self.options.get("short_side", 224) / min(height, width)
        return _multiple(height * scale, patch), _multiple(width * scale, patch)


class ClipLabeler(PatchFeatureLabeler):
    """CLIP ViT-B/16 dense features: projection(post_layernorm(patch tokens)), at shortest side 224."""

    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, **options):
        super().__init__(path, device, batch_size, **options)
        if options.get("normalisation") == "imagenet":  # what the reference's CLIP tokenizer training fed CLIP
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def model_class(self):
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection

    def forward(self, x):
        vision, patch = self.model.vision_model, self.model.config.patch_size
        tokens = vision(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        features = self.model.visual_projection(vision.post_layernorm(tokens)).float()
        grid = features.reshape(len(x), x.shape[-2] // patch, x.shape[-1] // patch, -1)
        return list(grid)


class OpenClipVision(torch.nn.Module):
    """open_clip's CLIP image tower, loaded by open_clip from an open_clip name with its pretrained tag
    (`ViT-B-16@openai`) or a folder in open_clip's layout, shaped as the CLIP labeler reads a model
    (`config.patch_size`); its patch features computed as transformers' CLIP computes them."""

    def __init__(self, visual):
        from types import SimpleNamespace

        super().__init__()
        self.visual = visual
        self.config = SimpleNamespace(patch_size=visual.patch_size[0])

    @classmethod
    def from_pretrained(cls, spec: str) -> "OpenClipVision":
        from models.quality import load_clip

        name, tag = (spec, None) if Path(spec).expanduser().is_dir() else (spec.partition("@")[0],
                                                                            spec.partition("@")[2] or None)
        return cls(load_clip(name, tag, "cpu")[0].visual)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post(patch tokens) @ proj, the position embeddings resized bicubically to the image's grid (as
        transformers' `interpolate_pos_encoding`)."""
        v = self.visual
        x = v.conv1(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = v.positional_embedding
        side = int((len(pos) - 1) ** 0.5)
        patches = pos[1:]
        if grid != (side, side):
            patches = torch.nn.functional.interpolate(
                patches.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                align_corners=False).permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])
        first = (v.class_embedding + pos[0]).to(x.dtype).expand(len(x), 1, -1)
        x = v.transformer(v.ln_pre(torch.cat([first, x + patches.to(x.dtype)], dim=1)))
        return v.ln_post(x[:, 1:]) @ v.proj


class OpenClipLabeler(ClipLabeler):
    """The CLIP labeler's features through open_clip's classes (`label.options.clip.library: open_clip`)."""

    def model_class(self):
        return OpenClipVision

    def forward(self, x):
        patch = self.model.config.patch_size
        features = self.model.patch_features(x).float()
        return list(features.reshape(len(x), x.shape[-2] // patch, x.shape[-1] // patch, -1))


CLIP_LIBRARIES = {"transformers": ClipLabeler, "open_clip": OpenClipLabeler}


def load_clip_labeler(path: str, device: str = "auto", batch_size: int = 8, library: str = "transformers",
                      **options) -> ClipLabeler:
    """The CLIP labeler through transformers (a hub id or a saved folder) or open_clip (`ViT-B-16@openai`, or a
    folder in open_clip's layout): the same features from the same weights."""
    return CLIP_LIBRARIES[library](path, device, batch_size, **options)


def check_clip_library(labeler: str, options: dict, spec: str) -> None:
    """Before any work: the library is one of ours, and an open_clip model is one open_clip knows."""
    library = options.get("library", "transformers")
    if library not in CLIP_LIBRARIES:
        raise ValueError(f"label.options.{labeler}.library = {library!r}: expected one of {sorted(CLIP_LIBRARIES)}")
    if library == "open_clip":
        import open_clip

        from models.quality import clip_name

        name = spec if Path(spec).expanduser().is_dir() else spec.partition("@")[0]
        if not clip_name(name).startswith("local-dir:") and name not in open_clip.list_models():
            raise ValueError(f"label.models.{labeler} = {spec!r}: with label.options.{labeler}.library = open_clip, an "
                             f"open_clip model name and tag (ViT-B-16@openai) or a folder in open_clip's layout")


class Dinov2Labeler(PatchFeatureLabeler):
    """DINOv2 ViT-B/14 dense features: the normalised patch tokens of the last layer (`x_norm_patchtokens`), one per
    14x14 patch at shortest side 224 (16x16 for a square crop)."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def model_class(self):
        from transformers import Dinov2Model

        return Dinov2Model

    def forward(self, x):
        patch = self.model.config.patch_size
        tokens = self.model(pixel_values=x).last_hidden_state[:, 1:].float()  # after the final LayerNorm
        return list(tokens.reshape(len(x), x.shape[-2] // patch, x.shape[-1] // patch, -1))


class Dinov2GlobalLabeler(Dinov2Labeler):
    """DINOv2's global vector: the normalised class token of the last layer (`x_norm_clstoken`), (768,)."""

    def forward(self, x):
        return list(self.model(pixel_values=x).last_hidden_state[:, 0].float())  # after the final LayerNorm


class SamLabeler(Labeler):
    """SAM's automatic masks (transformers' mask-generation pipeline over `SamModel`: a grid of point prompts,
    filtered by predicted IoU and stability, de-duplicated by NMS), each kept as its largest outer contour: a polygon
    in the image's pixels, with its predicted IoU, best first. One image at a time (the pipeline batches points)."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, points_per_side: int = 32,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 **options):
        from transformers import SamImageProcessor, pipeline

        super().__init__(path, device, batch_size, **options)
        self.pipe = pipeline("mask-generation", model=self.model, image_processor=SamImageProcessor.from_pretrained(
            path), device=self.device)
        self.settings = dict(points_per_crop=points_per_side, points_per_batch=points_per_batch,
                             pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh)

    def model_class(self):
        from transformers import SamModel

        return SamModel

    def input_size(self, height, width):
        return height, width

    @staticmethod
    def polygons(masks, scores) -> list[dict]:
        import cv2

        found = []
        for mask, score in zip(masks, scores):
            contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            if contours:
                outline = max(contours, key=cv2.contourArea)[:, 0]
                found.append({"polygon": outline.tolist(), "score": round(float(score), 4)})
        return sorted(found, key=lambda instance: -instance["score"])

    @torch.inference_mode()
    def launch(self, images):
        from PIL import Image

        outputs = []
        for image in images:
            result = self.pipe(Image.fromarray(np.ascontiguousarray(image[..., :3])), **self.settings)
            outputs.append({"instances": self.polygons([m.cpu().numpy() for m in result["masks"]],
                                                       result["scores"].tolist())})
        return Launched(outputs)

    def collect(self, launched):
        return launched.outputs


class TextEncoderLabeler(Labeler):
    """A text encoder's last hidden states for the sample's caption (T5's encoder): one vector per token, padding
    left out, at most `max_length` tokens. It reads the caption stored beside the image (`Labeling.reads`), not
    the image; a sample without a caption fails alone, by name."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, max_length: int = 77, **options):
        from transformers import AutoTokenizer

        super().__init__(path, device, batch_size, **options)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length

    def model_class(self):
        from transformers import T5EncoderModel

        return T5EncoderModel

    def input_size(self, height, width):
        return 0, 0  # one bucket: captions batch together whatever their images' sizes

    @staticmethod
    def _text(sample: dict) -> str:
        """The one label read beside the image (the entry's `Labeling.reads`: the caption)."""
        (name, text), = ((k, v) for k, v in sample.items() if k != "image")
        if not text:
            raise ValueError(f"the sample has no {name} to encode")
        return text

    @torch.inference_mode()
    def launch(self, samples: list[dict]) -> Launched:
        captions = [self._text(sample) for sample in samples]
        tokens = self.tokenizer(captions, max_length=self.max_length, truncation=True, padding=True,
                                return_tensors="pt").to(self.device)
        with self._autocast():
            hidden = self.model(**tokens).last_hidden_state.float()
        lengths = tokens["attention_mask"].sum(1).tolist()
        return self._launched(_to_host([h[:n] for h, n in zip(hidden, lengths)]))


HUB_HINT = ("fetch it where a network exists (`hf download {path}`) into the Hugging Face cache, or save it with "
            "save_pretrained to a folder")


class WeightsUnavailable(ValueError):
    """A labeler's weights cannot be reached: the message names the model and how to provide it."""


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything deeper, or rooted, is a folder on disk.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def check_weights(name: str, path: str) -> None:
    """Fail at once, before any work, when a labeler's weights are neither a local model folder nor reachable on
    the Hugging Face hub; the message says how to provide them. Never falls back to anything else."""
    import os

    setting = f"label.models.{name} = {path!r}"
    if _looks_local(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            hint = registry.get(name).labeler.weights_hint.format(path=path)
            raise WeightsUnavailable(f"{setting}: no such folder; {hint}, or point --set label.models.{name}=... at "
                                     f"a model folder")
        if not (folder / "config.json").is_file():
            raise WeightsUnavailable(f"{setting}: {folder} holds no config.json (not a saved model folder)")
        return
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return  # cached: the weights come from the cache when the labeler loads
    offline = is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise WeightsUnavailable(f"{setting}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                 + HUB_HINT.format(path=path))
    try:
        hf_hub_download(path, "config.json")  # a few kB; the weights follow when the labeler loads
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the finding
        raise WeightsUnavailable(f"{setting}: cannot reach it on the Hugging Face hub ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}); " + HUB_HINT.format(path=path)
                                 ) from None


def load_labeler(modality: str, path: str, device: str = "auto", batch_size: int = 8, **options) -> Labeler:
    """The labeler of a registered modality, loaded from `path` (a hub id or a local folder)."""
    labelled = {m.name: m.labeler for m in registry.loaded().labelled()}
    if modality not in labelled:
        raise ValueError(f"unknown labeler {modality!r} (known: {', '.join(labelled)})")
    return labelled[modality].load(path, device, batch_size, **options)


class ComputedLabeler(Labeler):
    """A labeler without a network: `compute(image)` on the CPU, one image at a time, at the image's own size.

    For labels a few lines of numpy or OpenCV make (edges, colour statistics); `path` is ignored."""

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 8, **options):
        self.device, self.batch_size, self.options = torch.device("cpu"), batch_size, options
        self.provenance = {"source": type(self).__module__ + "." + type(self).__qualname__, "weights_sha256": None,
                           "random_weights": False}

    def input_size(self, height, width):
        return height, width

    def compute(self, image: np.ndarray):
        raise NotImplementedError

    def launch(self, images):
        return Launched([self.compute(im) for im in images])

    def collect(self, launched):
        return launched.outputs
