"""The families of modalities: what a dense map or a sequence does, given a few settings.

A modality definition (`models/modalities.py`, or a module of a user's own) is an instance of one of these,
with its name, storage and settings; the stages call the methods below and never ask a modality's name.

    DenseModality     a map aligned with the photo (the photo itself, depth, normals, ...): stored as an image
                      file or a .npy, cropped like the photo, tokenized into 14x14 tokens by a VQ-VAE
    ClassMapModality  class ids per pixel (semantic segmentation): nearest-neighbour crops, a palette, mIoU
    FeatureMapModality  one vector per patch (CLIP): .npy, crops cut with roi_align, drawn by PCA
    SequenceModality  text per sample (a caption, boxes as text): tokenized by the text tokenizer when loaded
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F

from core import pictures
from core.registry import RESOLUTION, Domain, Modality
from models import metrics
from models.text_tokenizer import BoxTextError, boxes_to_text, text_to_boxes

TEXT_VOCABULARY = 30000  # the sequences' vocabulary in 4M's layout (the text tokenizer's size)


class DenseModality(Modality):
    """A map at the photo's resolution, values in [0, 1] stored as integers (`scale` per unit).

    Tokenizer input: float (C, 224, 224) in [-1, 1], the crop resized bilinearly (antialiased)."""

    extension = "png"
    channels = 1
    scale = 255.0                 # stored integer per unit: 255 (8-bit) or 65535 (16-bit)
    flip_negates_x = False        # a mirrored crop mirrors the x component too (surface normals)
    colour_map = "turbo"          # one-channel maps are drawn through it; three-channel ones as RGB
    metric_name = "l1"            # the tokenizer's reconstruction figure (see `metric`)
    baseline_name = "mean map"    # what a tokenizer that learned nothing would score: each sample's mean
    channels_from_data = False    # the tokenizer's in_channels read off the stored maps (feature maps)
    condition_from_image = True   # generation may take it as an image file
    standardised = False          # tokenizers in the reference's architecture read it standardised per crop (depth)
    published_tokenizer = ""      # the hub id of apple/ml-4m's published tokenizer for it, if there is one

    # -- storage --------------------------------------------------------------------------------------------------
    def encode(self, label: np.ndarray) -> bytes:
        import cv2

        dtype = np.uint16 if self.scale > 255 else np.uint8
        array = np.round(np.asarray(label, np.float32) * self.scale).astype(dtype)
        if array.ndim == 3:
            array = np.ascontiguousarray(array[..., ::-1])  # RGB -> OpenCV's BGR
        # zlib level 1: several times faster than OpenCV's default on 768-pixel labels, for slightly larger files
        ok, data = cv2.imencode(f".{self.extension}", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise ValueError(f"{self.name}: {self.extension} encoding failed")
        return data.tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        """Stored bytes -> the map at its stored size (H, W) or (H, W, 3) RGB, its stored integer type."""
        import cv2

        flags = cv2.IMREAD_COLOR if self.channels == 3 else cv2.IMREAD_UNCHANGED
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if array is None:
            raise ValueError(f"{self.name}: not a decodable {self.extension}")
        return np.ascontiguousarray(array[..., ::-1]) if array.ndim == 3 else array

    def from_image_file(self, image: np.ndarray) -> np.ndarray:
        """An image file as OpenCV reads it unchanged -> the stored form (for conditions given as files)."""
        if self.channels == 3:
            return np.ascontiguousarray(image[..., ::-1] if image.ndim == 3 else np.repeat(image[..., None], 3, -1))
        return image

    # -- crops --------------------------------------------------------------------------------------------------
    def _region(self, array: np.ndarray, crop, image_size) -> torch.Tensor:
        top, left, h, w, _ = (int(v) for v in crop)
        if array.shape[:2] != tuple(image_size):
            raise ValueError(f"{self.name}: stored at {array.shape[:2]}, the image is {tuple(image_size)}")
        return torch.from_numpy(np.ascontiguousarray(array[top:top + h, left:left + w]))

    def to_tensor(self, array: np.ndarray, crop, image_size) -> torch.Tensor:
        """One sample's stored map and a crop [top, left, h, w, flip] in photo pixels -> the tokenizer's input."""
        x = self._region(array, crop, image_size).float().div_(self.scale)
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=True)[0]
        if int(crop[4]):
            x = x.flip(-1)
            if self.flip_negates_x:
                x[0] = 1 - x[0]  # mirrored surfaces face the other way along x
        return x.clamp_(0, 1).mul_(2).sub_(1)

    # -- pre-tokenization: a sample's crops in, its token member out ---------------------------------------------
    def crops_input(self, label, crops, image_size) -> tuple[torch.Tensor, object]:
        """One sample's stored label and its crops -> (the tokenizer's inputs, one per crop; what `token_member`
        needs besides their ids: nothing here)."""
        return torch.stack([self.to_tensor(label, crop, image_size) for crop in crops]), None

    def token_member(self, ids: np.ndarray, layout) -> tuple[str, bytes]:
        """The ids of a sample's inputs (n_crops, tokens) -> its member in the token folder: int16 .npy."""
        from core.files import npy_bytes

        return "npy", npy_bytes(ids.astype(np.int16))

    # -- the tokenizers (models/vqvae.py: the reference's architecture and preprocessing) ------------------------------------------------
    def reference_input(self, x: torch.Tensor) -> torch.Tensor:
        """Our tokenizer input (B, C, H, W) in [-1, 1] -> what the reference's tokenizer reads: the same, or (depth)
        the relative depth in [0, 1] standardised per crop without its top and bottom 10% (`DepthTransform`)."""
        if not self.standardised:
            return x
        flat = ((x.float() + 1) / 2).flatten(1)
        mean, spread = self._standardisation(flat)
        return ((flat - mean) / spread).reshape(x.shape)

    @staticmethod
    def _standardisation(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = flat.sort(dim=1).values[:, int(0.1 * flat.shape[1]):int(0.9 * flat.shape[1])]
        return kept.mean(1, keepdim=True), torch.sqrt(kept.var(1, keepdim=True) + 1e-6)

    def on_input_scale(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A reconstruction `y` of tokenizer inputs `x` (ours, in [-1, 1]) on the inputs' own scale, to draw the two
        on one scale: standardised depth is taken back with each input's statistics, not stretched by its own."""
        if not self.standardised:
            return self.from_reference_output(y)
        mean, spread = self._standardisation(((x.float() + 1) / 2).flatten(1))
        return ((y.float().flatten(1) * spread + mean) * 2 - 1).reshape(y.shape)

    def reference_tokenizer_problems(self, cfg) -> list[str]:
        """Why a tokenizer in the reference's architecture (its settings `cfg`) cannot be this modality's."""
        if cfg.n_labels or cfg.n_channels != self.channels or not cfg.patch_proj:
            return [f"{self.name} is {self.channels}-channel images: the tokenizer reads n_channels={cfg.n_channels}"
                    f", n_labels={cfg.n_labels}, patch_proj={cfg.patch_proj}"]
        return []

    def from_reference_output(self, y: torch.Tensor) -> torch.Tensor:
        """The reference tokenizer's decoded output -> our form (standardised depth: each map stretched to [-1, 1],
        as relative depth has no scale of its own)."""
        if not self.standardised:
            return y
        flat = y.float().flatten(1)
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        return ((flat - low) / (high - low).clamp(min=1e-6) * 2 - 1).reshape(y.shape)

    # -- pictures -----------------------------------------------------------------------------------------------
    def tensor_picture(self, x: torch.Tensor) -> np.ndarray:
        """A tokenizer input or reconstruction (C, H, W) -> an RGB picture in [0, 1]."""
        values = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        if values.shape[0] == 3:
            return values.permute(1, 2, 0).numpy()
        return pictures.colormap_picture(values[0].numpy(), self.colour_map)

    def picture(self, stored: np.ndarray, photo: np.ndarray) -> np.ndarray:
        values = np.asarray(stored, np.float32) / self.scale
        if values.ndim == 3:
            return values
        return pictures.colormap_picture(values, self.colour_map, stretch=True)  # each map's own range

    def legend(self, stored) -> list[tuple[tuple, str]]:
        return []

    # -- quality ------------------------------------------------------------------------------------------------
    def metric(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[str, float]:
        return self.metric_name, float(((reconstruction - target).abs() / 2).mean())

    def baseline(self, target: torch.Tensor, classes: int | None = None) -> torch.Tensor:
        """The trivial reconstruction of each sample of a batch, in the form the decoder outputs."""
        return target.float().mean((2, 3), keepdim=True).expand_as(target)

    def baseline_metric(self, target: torch.Tensor, classes: int | None = None) -> float:
        return self.metric(self.baseline(target, classes), target)[1]

    # -- evaluation of 4M's predictions against the pseudo labels (None: not evaluated) ---------------------------
    evaluation: type | None = None


class PhotoModality(DenseModality):
    """The downloaded photo: a JPEG; 4M sees it as pixels (an input only) and as tokens."""

    extension = "jpg"
    channels = 3
    downloaded = True
    metric_name = "psnr_db"
    baseline_name = "mean-colour image"

    def domains(self) -> list[Domain]:
        return [Domain(f"{self.name}@{RESOLUTION}", self, "pixels", self.folder, channels=3), *super().domains()]

    def metric(self, reconstruction, target):  # PSNR over [0, 1] pixels
        mse = F.mse_loss((reconstruction.clamp(-1, 1) + 1) / 2, (target + 1) / 2)
        return self.metric_name, float(10 * torch.log10(1 / mse.clamp(min=1e-10)))


class NormalMapModality(DenseModality):
    """Surface normals: three components in [0, 1] stored as RGB; the mean angle between vectors."""

    channels = 3
    flip_negates_x = True
    metric_name = "mean_angle_deg"
    baseline_name = "mean-normal map"

    def metric(self, reconstruction, target):
        cos = F.cosine_similarity(reconstruction, target, dim=1).clamp(-1, 1)
        return self.metric_name, float(torch.rad2deg(torch.acos(cos)).mean())

    def baseline(self, target, classes=None):
        return F.normalize(target.float().mean((2, 3), keepdim=True), dim=1).expand_as(target)


class ClassMapModality(DenseModality):
    """Class ids per pixel (uint8 PNG); the tokenizer sees long ids (224, 224) and decodes class logits."""

    class_names: list[str] = []
    metric_name = "miou"
    baseline_name = "majority class"

    def encode(self, label: np.ndarray) -> bytes:
        import cv2

        ok, data = cv2.imencode(f".{self.extension}", np.asarray(label).astype(np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise ValueError(f"{self.name}: {self.extension} encoding failed")
        return data.tobytes()

    def from_image_file(self, image):
        return image if image.ndim == 2 else image[..., 0]

    def to_tensor(self, array, crop, image_size):
        region = self._region(array, crop, image_size)
        out = F.interpolate(region[None, None].float(), size=(RESOLUTION, RESOLUTION), mode="nearest")[0, 0].long()
        return out.flip(-1) if int(crop[4]) else out

    def reference_input(self, x):
        """Ids shifted by one, as the reference's `SemsegTransform(shift_idx_by_one=True)` (uint8: 255 -> 0)."""
        return (x + 1) % 256

    def reference_tokenizer_problems(self, cfg):
        labels = len(self.class_names) + 1  # the reference's unlabelled class 0 first
        if cfg.n_labels != labels:
            return [f"{self.name} has {len(self.class_names)} classes: the tokenizer reads n_labels={cfg.n_labels} "
                    f"(expected {labels}, unlabelled included)"]
        return []

    def from_reference_output(self, y):
        """Logits of the reference's labels (0 = unlabelled, then ours shifted by one) -> logits of ours."""
        return y[:, 1:]

    def tensor_picture(self, x):
        ids = x.argmax(0) if x.ndim == 3 else x
        return pictures.palette_picture(ids.cpu().numpy())

    def picture(self, stored, photo):
        return pictures.palette_picture(stored)

    def legend(self, stored):
        import matplotlib

        present = [int(c) for c in np.unique(stored)][:12]
        return [(matplotlib.colormaps["tab20"]((c % 20) / 19), self.class_names[c] if c < len(self.class_names)
                 else str(c)) for c in present]

    def metric(self, reconstruction, target):  # mean IoU over the classes present in either map
        predicted = reconstruction.argmax(1)
        ious = []
        for c in torch.unique(torch.cat([predicted.unique(), target.unique()])):
            inter = ((predicted == c) & (target == c)).sum()
            union = ((predicted == c) | (target == c)).sum()
            ious.append(float(inter) / float(union))
        return self.metric_name, sum(ious) / len(ious)

    def baseline(self, target, classes=None):
        majority = torch.stack([t.flatten().bincount().argmax() for t in target])
        logits = F.one_hot(majority, classes or int(target.max()) + 1).float()
        return logits[:, :, None, None].expand(-1, -1, *target.shape[-2:])


class FeatureMapModality(DenseModality):
    """One feature vector per 16x16 patch of the photo (float16 .npy, (h, w, D)); crops cut with roi_align, so
    a crop means the same region as in the photo; no patch projection in the tokenizer (a token per vector)."""

    extension = "npy"
    channels_from_data = True
    condition_from_image = False  # a feature map is given to generation as token ids
    labelled_per_crop = True      # the reference's tokenizers saw features of each crop, not cut out of the image's
    metric_name = "cosine"
    baseline_name = "mean feature"

    def encode(self, label):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(label).astype(np.float16))
        return buffer.getvalue()

    def decode(self, data):
        return np.load(io.BytesIO(data))

    def to_tensor(self, array, crop, image_size):
        from torchvision.ops import roi_align

        top, left, h, w, flip = (int(v) for v in crop)
        scale_y, scale_x = array.shape[0] / image_size[0], array.shape[1] / image_size[1]
        features = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None]
        box = torch.tensor([[0, left * scale_x, top * scale_y, (left + w) * scale_x, (top + h) * scale_y]])
        out = roi_align(features, box, output_size=self.token_grid, spatial_scale=1.0, sampling_ratio=2,
                        aligned=True)[0]
        return out.flip(-1) if flip else out

    @property
    def width(self) -> int | None:
        """Each vector's size, where the entry's tokenizer settings fix it (a labeler's model may set it instead)."""
        return (self.tokenizer or {}).get("in_channels")

    label_form = ("a feature map", ("height", "width"))  # what a label is, and its axes before the vector's

    def check_label(self, label) -> None:
        shape, (form, axes) = np.shape(label), self.label_form
        if len(shape) != len(axes) + 1 or (self.width and shape[-1] != self.width):
            described = ", ".join([*axes, str(self.width or "D")]) + ("," if not axes else "")
            raise ValueError(f"{self.name} is {form} ({described}); got {shape}")

    def features_tensor(self, features) -> torch.Tensor:
        """What its labeler makes of one crop, (h, w, D), -> the tokenizer's input (D, h, w)."""
        return torch.as_tensor(features).float().permute(2, 0, 1)

    def reference_tokenizer_problems(self, cfg):
        if cfg.patch_proj or cfg.n_labels:
            return [f"{self.name} is a feature map (a token per vector): the tokenizer has patch_proj="
                    f"{cfg.patch_proj}, n_labels={cfg.n_labels}"]
        return []

    def tensor_picture(self, x):
        return pictures.pca_picture(x.float().cpu().permute(1, 2, 0).numpy())

    def picture(self, stored, photo):
        return pictures.pca_picture(stored)

    def metric(self, reconstruction, target):
        return self.metric_name, float(F.cosine_similarity(reconstruction, target, dim=1).mean())


class GlobalFeatureModality(FeatureMapModality):
    """One feature vector per image (DINOv2's normalised class token): float16 .npy (D,). Its tokenizer reads it as a
    1x1 map (bottleneck MLPs around Memcodes, the reference's global tokenizers) and gives one token per codebook:
    16, which 4M lays out as 4x4 with learned positions, at any image size. A crop of the photo keeps its vector
    (the published tokenizers read each crop's own, computed by the labeler)."""

    pooled = True
    token_grid = 4                # 16 codebooks
    baseline_name = "mean vector of the batch"

    def to_tensor(self, array, crop, image_size):
        return torch.from_numpy(np.asarray(array, np.float32).reshape(-1, 1, 1))

    label_form = ("one vector per image", ())

    def features_tensor(self, features) -> torch.Tensor:
        return torch.as_tensor(features).float().reshape(-1, 1, 1)

    def reference_tokenizer_problems(self, cfg):
        if cfg.quant_type != "memcodes" or cfg.n_labels:
            return [f"{self.name} is one vector per image: the tokenizer has quant_type={cfg.quant_type!r}, "
                    f"n_labels={cfg.n_labels} (expected memcodes over the vector)"]
        return []

    def tensor_picture(self, x):
        return self.picture(x.float().cpu().reshape(-1).numpy(), None)

    def picture(self, stored, photo):
        """The vector as a square of cells (row by row), each value stretched over the vector's own range."""
        values = np.asarray(stored, np.float32).reshape(-1)
        side = int(np.ceil(np.sqrt(len(values))))
        cells = np.full(side * side, np.nan, np.float32)
        cells[:len(values)] = values
        picture = pictures.colormap_picture(cells.reshape(side, side), "viridis", stretch=True)
        picture[np.isnan(cells.reshape(side, side))] = 1.0  # past the vector's end: white
        return picture

    def baseline(self, target, classes=None):
        return target.float().mean(0, keepdim=True).expand_as(target)  # one vector for all: nothing learned


def sequence_domains(modality: Modality) -> list[Domain]:
    """A text 4M reads in the caption vocabulary, from the modality's folder, or from its token folder where
    tokenize makes it (`pretokenized`)."""
    folder = modality.token_folder if modality.pretokenized else modality.folder
    return [Domain(modality.name, modality, "sequence", folder, vocab_size=TEXT_VOCABULARY,
                   max_tokens=modality.max_tokens, positions=modality.embedding_length)]


class SequenceModality(Modality):
    """Text per sample, tokenized with the text tokenizer when the 4M loader reads it."""

    kind = "sequence"
    extension = "txt"
    needs_photo = False           # `to_text` reads the photo's size (boxes are moved into the crop)
    max_tokens = 256              # most tokens 4M reads, [EOS] included: longer texts are cut (the reference's)

    def domains(self) -> list[Domain]:
        return sequence_domains(self)

    def encode(self, label) -> bytes:
        return str(label).encode()

    def decode(self, data: bytes):
        return data.decode("utf-8", errors="replace")

    def corpus_text(self, data: bytes) -> str:
        """A stored member as text for the text tokenizer's training corpus."""
        return self.decode(data)

    def to_text(self, data: bytes, crop, image_size, min_score: float, rng=None) -> str:
        """A stored member at a crop -> the text 4M reads; scored items below `min_score` left out. `rng` (a numpy
        Generator, training only) for a text that varies per load."""
        return self.decode(data)

    def condition_text(self, value: str) -> str:
        """A generation condition as given (text, or a file a modality reads) -> its text."""
        return str(value)

    def generated(self, text: str) -> dict:
        """What a generated text means beyond itself (boxes: the boxes), written beside it."""
        return {}

    def picture(self, stored, photo):
        return None

    def generated_picture(self, extras: dict, photo: np.ndarray | None) -> np.ndarray | None:
        return None


class BoxesModality(SequenceModality):
    """Boxes: {"instances": [{boxes: [xmin, ymin, xmax, ymax] in 0..1, class_name, score}]} as JSON; 4M reads them
    as text (class name and four coordinate tokens per box), moved into the crop."""

    extension = "json"
    needs_photo = True

    def encode(self, label) -> bytes:
        return json.dumps({"instances": label}).encode()

    def decode(self, data: bytes):
        return json.loads(data)["instances"]

    def corpus_text(self, data):
        return boxes_to_text(self.decode(data))

    def to_text(self, data, crop, image_size, min_score, rng=None):
        return boxes_to_text(metrics.crop_boxes(self.decode(data), crop, image_size, min_score))

    def condition_text(self, value):
        text = str(value)
        if not text.endswith(".json"):
            return text
        from pathlib import Path

        return boxes_to_text(json.loads(Path(text).read_text()))

    def generated(self, text):
        try:
            return {"boxes": text_to_boxes(text)}
        except BoxTextError:
            return {"boxes": []}

    def picture(self, stored, photo):
        return pictures.boxes_picture(np.asarray(photo, np.float32) / 255.0, stored[:15])

    def generated_picture(self, extras, photo):
        return pictures.boxes_picture(photo, extras.get("boxes", []), size=RESOLUTION)


class EmbeddingSequenceModality(Modality):
    """A sequence of vectors per sample that 4M reads as they are (T5 caption embeddings): an input only, projected
    into the model by a linear layer, never predicted (4M has no vocabulary for them).

    Stored as the reference's `.npz`: `emb` (1, L, C) float16 and `mask_valid` (1, L), the valid vectors only, so
    its `CaptionEmbTransform` reads our files as they are."""

    kind = "embeddings"
    extension = "npz"
    channels = 4096               # each vector's size (T5-XXL's); the model's projection reads exactly this
    max_tokens = 77               # most vectors 4M reads: longer sequences are cut

    def domains(self) -> list[Domain]:
        return [Domain(self.name, self, "embeddings", self.folder, channels=self.channels,
                       max_tokens=self.max_tokens)]

    def encode(self, label) -> bytes:
        vectors = np.asarray(label, np.float16)
        if vectors.ndim != 2 or vectors.shape[1] != self.channels:
            raise ValueError(f"{self.name}: expected (tokens, {self.channels}) vectors, got {vectors.shape}")
        buffer = io.BytesIO()
        np.savez(buffer, emb=vectors[None], mask_valid=np.ones((1, len(vectors)), bool))
        return buffer.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        """The valid vectors (L, C) of the first sequence, as the reference's transform reads them."""
        with np.load(io.BytesIO(data)) as stored:
            return stored["emb"][0][stored["mask_valid"][0].astype(bool)]

    def to_embeddings(self, data: bytes) -> torch.Tensor:
        """A stored member -> what the 4M loader masks: float32 (L, C), cut at `max_tokens`."""
        vectors = self.decode(data)
        if vectors.shape[-1] != self.channels:
            raise ValueError(f"{self.name}: stored vectors are {vectors.shape[-1]}-d, 4M reads {self.channels}")
        return torch.from_numpy(vectors[:self.max_tokens].astype(np.float32))

    def picture(self, stored, photo):
        """The vectors as bands, one per token (their first 256 values), each stretched to its own range."""
        rows = np.asarray(stored, np.float32)[:, :256]
        low, high = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
        bands = np.repeat((rows - low) / np.maximum(high - low, 1e-6), max(1, 256 // max(len(rows), 1)), axis=0)
        return pictures.colormap_picture(bands, "viridis")
