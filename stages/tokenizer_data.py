"""Samples for the dense tokenizers: labelled shards in, cropped tensors out (shared by training and tokenize).

Each modality is read from its own folder (`rgb/` JPEG, `depth/` 16-bit PNG, `normal/` RGB PNG, `semseg/`
class-id PNG, `clip/` float16 npy), in the rgb shard's key order. A crop is [top, left, h, w, hflip] in the rgb
image's pixels, so one crop means the same region in every modality: label maps are stored at the image's
size, and CLIP maps (one vector per 16x16 patch at short side 224) are cropped in proportion. Every crop is
resized to 224x224 (CLIP: 14x14); a flip mirrors the x component of normals too.
"""
from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.shards import DatasetLayout

EXTENSIONS = {"rgb": "jpg", "depth": "png", "normal": "png", "semseg": "png", "clip": "npy"}
SIZE = 224


def tokenizer_name(modality: str) -> str:
    """tok_<name>@224 -> <name>: the tokenizer's folder under <root>/tokenizers."""
    return modality.split("@")[0].removeprefix("tok_")


def read_members(path: Path, extension: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of the members with this extension, in the shard's order, streamed."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("." + extension):
                yield member.name.rsplit(".", 1)[0], tar.extractfile(member).read()


def decode(modality: str, data: bytes) -> np.ndarray:
    """Stored bytes -> the label at its stored size (rgb/normal uint8 HxWx3, depth uint16, semseg uint8,
    clip float16 (h, w, D))."""
    import cv2

    if modality == "clip":
        return np.load(io.BytesIO(data))
    flags = {"rgb": cv2.IMREAD_COLOR, "normal": cv2.IMREAD_COLOR}.get(modality, cv2.IMREAD_UNCHANGED)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise ValueError(f"{modality}: not a decodable PNG/JPEG")
    return np.ascontiguousarray(array[..., ::-1]) if array.ndim == 3 else array


def center_crop(height: int, width: int) -> list[int]:
    side = min(height, width)
    return [(height - side) // 2, (width - side) // 2, side, side, 0]


def random_crop(rng: np.random.Generator, height: int, width: int, scale=(0.8, 1.0), ratio=(0.75, 4 / 3),
                flip: bool = True) -> list[int]:
    """A random-resized crop (area fraction in `scale`, aspect ratio in `ratio`), as torchvision draws them."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return [top, left, h, w, int(flip and rng.random() < 0.5)]
    return center_crop(height, width)[:4] + [int(flip and rng.random() < 0.5)]


def crop_to_tensor(modality: str, array: np.ndarray, crop, image_size: tuple[int, int]) -> torch.Tensor:
    """One sample's stored label and a crop in rgb pixels -> the tokenizer's input (see models/vqvae.py)."""
    top, left, h, w, flip = (int(v) for v in crop)
    if modality == "clip":
        from torchvision.ops import roi_align

        scale_y, scale_x = array.shape[0] / image_size[0], array.shape[1] / image_size[1]
        features = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None]
        box = torch.tensor([[0, left * scale_x, top * scale_y, (left + w) * scale_x, (top + h) * scale_y]])
        out = roi_align(features, box, output_size=SIZE // 16, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
        return out.flip(-1) if flip else out
    if array.shape[:2] != tuple(image_size):
        raise ValueError(f"{modality}: stored at {array.shape[:2]}, the rgb image is {tuple(image_size)}")
    region = torch.from_numpy(np.ascontiguousarray(array[top:top + h, left:left + w]))
    if modality == "semseg":
        out = F.interpolate(region[None, None].float(), size=(SIZE, SIZE), mode="nearest")[0, 0].long()
        return out.flip(-1) if flip else out
    scale = 65535.0 if modality == "depth" else 255.0
    x = region.float().div_(scale)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        x = x.flip(-1)
        if modality == "normal":
            x[0] = 1 - x[0]  # mirrored surfaces face the other way along x
    return x.clamp_(0, 1).mul_(2).sub_(1)


@dataclass
class RgbIndex:
    """One shard's rgb members: every key in order, and the image size of those whose header reads."""

    keys: list[str]
    sizes: dict[str, tuple[int, int]]


def rgb_index(layout: DatasetLayout, shard: str) -> RgbIndex:
    """Keys and (height, width) of a shard's rgb images, read from the JPEG headers in one pass."""
    from PIL import Image

    keys, sizes = [], {}
    for key, data in read_members(layout.tar("rgb", shard), "jpg"):
        keys.append(key)
        try:
            with Image.open(io.BytesIO(data)) as im:
                sizes[key] = (im.height, im.width)
        except Exception:  # noqa: BLE001 - an unreadable image has no size; its labels are absent too
            continue
    return RgbIndex(keys, sizes)


def shard_samples(layout: DatasetLayout, modality: str, shard: str) -> Iterator[tuple[str, np.ndarray, tuple]]:
    """(key, decoded label, rgb image size) for every sample of a shard that has this modality."""
    sizes = rgb_index(layout, shard).sizes
    for key, data in read_members(layout.tar(modality, shard), EXTENSIONS[modality]):
        if key in sizes:
            yield key, decode(modality, data), sizes[key]
