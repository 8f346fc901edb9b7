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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.storage import open_tar
from stages.dataset.shards import DatasetLayout

SIZE = 224


def tokenizer_name(modality: str) -> str:
    """A 4M domain (tok_<name>@224, <name>) -> its modality's name: the tokenizer's folder under <root>/tokenizers."""
    return registry.domain(modality).modality.name


def read_members(path: Path, extension: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of the members with this extension, in the shard's order, streamed."""
    with open_tar(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("." + extension):
                yield member.name.rsplit(".", 1)[0], tar.extractfile(member).read()


def decode(modality: str, data: bytes) -> np.ndarray:
    """Stored bytes -> the label at its stored size (the modality's `decode`)."""
    return registry.get(modality).decode(data)


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
    """One sample's stored label and a crop in rgb pixels -> the tokenizer's input (the modality's `to_tensor`)."""
    return registry.get(modality).to_tensor(array, crop, image_size)


def resized_crop(image: np.ndarray, crop, side: int = SIZE) -> np.ndarray:
    """The region [top, left, h, w] of an image, resized to side x side by area averaging, not mirrored (a crop's
    flip is applied where it is read)."""
    import cv2

    top, left, h, w = (int(v) for v in crop[:4])
    return cv2.resize(image[top:top + h, left:left + w], (side, side), interpolation=cv2.INTER_AREA)


def photo_crop(image: np.ndarray, crop, side: int = 224) -> np.ndarray:
    """The photo's pixels in a crop [top, left, h, w, flip], resized to side x side (area averaging), mirrored
    when flipped: what a labeler run on each crop sees."""
    region = resized_crop(image, crop, side)
    return np.ascontiguousarray(region[:, ::-1]) if int(crop[4]) else region


# The stored 224 crops: JPEG quality 95 without chroma subsampling (4:4:4), 40+ dB against the crop cut from the
# whole photo (4:2:0 gives 37-39 dB); about 31 KB a crop, 0.4 ms to decode against 5 ms for a 768-pixel photo
CROP_QUALITY = 95


def crop_jpegs(photo: bytes, crops: np.ndarray) -> bytes | None:
    """A stored photo and its crops -> one `.npz` member: entry "i" the JPEG of crop i at 224 (unmirrored, colours
    as stored); None if the photo does not decode."""
    import cv2

    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    entries = {}
    for i, crop in enumerate(crops):
        ok, jpeg = cv2.imencode(".jpg", resized_crop(image, crop), [
            cv2.IMWRITE_JPEG_QUALITY, CROP_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
        entries[str(i)] = np.frombuffer(jpeg.tobytes(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **entries)
    return buffer.getvalue()


@dataclass
class RgbIndex:
    """One shard's rgb members: every key in order, and the image size of those whose header reads."""

    keys: list[str]
    sizes: dict[str, tuple[int, int]]


def rgb_index(layout: DatasetLayout, shard: str) -> RgbIndex:
    """Keys and (height, width) of a shard's rgb images, read from the JPEG headers in one pass."""
    from PIL import Image

    keys, sizes = [], {}
    photo = registry.photo()
    for key, data in read_members(layout.tar(photo.folder, shard), photo.extension):
        keys.append(key)
        try:
            with Image.open(io.BytesIO(data)) as im:
                sizes[key] = (im.height, im.width)
        except Exception:  # noqa: BLE001 - an unreadable image has no size; its labels are absent too
            continue
    return RgbIndex(keys, sizes)


def shard_samples(layout: DatasetLayout, modality: str, shard: str,
                  drop: frozenset[str] = frozenset()) -> Iterator[tuple[str, np.ndarray, tuple]]:
    """(key, decoded label, rgb image size) for every sample of a shard that has this modality, but those in `drop`
    (the quality filters' rejects: stages/quality/filters.dropped)."""
    sizes = rgb_index(layout, shard).sizes
    for key, data in read_members(layout.tar(modality, shard), registry.get(modality).extension):
        if key in sizes and key not in drop:
            yield key, decode(modality, data), sizes[key]
