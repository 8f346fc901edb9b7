"""The transfer datasets, read from the user's local copies in their usual layouts, and their augmentations.

  classification  ImageNet-1K folders: <dir>/<class>/*.JPEG (train and val alike); the class list is the
                  training folder's, sorted
  segmentation    ADE20K: <dir>/images/<split>/*.jpg with <dir>/annotations/<split>/*.png (0 = unlabelled,
                  ignored; class c is id c - 1), <split> = training or validation; or <dir>/images and
                  <dir>/annotations directly
  depth           NYUv2: <dir>/rgb/<name>.{jpg,png} with <dir>/depth/<name>.png (16-bit, metres x
                  `depth_scale`, 1000 by default: millimetres) or <name>.npy (float metres); 0 = no measurement

Augmentations are timm's (classification: RandAugment, random-resized crops; mixup and cutmix act on batches in
the training task) and torchvision's paired v2 transforms (segmentation: large-scale jitter, crop, flip, colour
jitter; depth: random crop, flip, colour jitter), so image and label move together. Every sample's random draws
are seeded by (seed, its position in the run), so a resumed run sees the same augmented batches.

Samples leave the loader as uint8 pixels (timm's prefetcher form: a quarter of the bytes to move, no float work
in the loader processes); `model_input` turns a batch on the device into the ImageNet-normalised floats the model
reads. Training pixels stay (H, W, 3) uint8 arrays (or channels-last tensors over them) from the decode to the
tensor; the dense tasks move the photo and its label together as a torchvision image and mask, then jitter the
photo's colours as an array (stages/transfer/augment.py).

Bad input fails before training and names the file: an empty class folder, a class missing from the training
folder, an image without its label, a label of another size than its image, class ids beyond the head.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from models.metrics import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as 4M's RGB input is normalised


class TransferInputError(ValueError):
    """A transfer dataset that cannot be trained on: names the folder or file."""


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


# -- classification -------------------------------------------------------------------------------------------------
def class_folders(train: Path) -> list[str]:
    classes = sorted(p.name for p in Path(train).iterdir() if p.is_dir()) if Path(train).is_dir() else []
    if not classes:
        raise TransferInputError(f"{train}: no class folders (expected <dir>/<class>/*.JPEG)")
    return classes


def classification_samples(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    folder, samples = Path(folder), []
    extra = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes)) if folder.is_dir() else []
    if extra:
        raise TransferInputError(f"{folder}: class folders {extra} are not in the training set's classes")
    for index, name in enumerate(classes):
        images = _images(folder / name)
        if not images and (folder / name).exists():
            raise TransferInputError(f"{folder / name}: an empty class folder (no images)")
        samples += [(p, index) for p in images]
    if not samples:
        raise TransferInputError(f"{folder}: no images in class folders")
    return samples


# -- segmentation ---------------------------------------------------------------------------------------------------
def segmentation_samples(folder: Path, split: str) -> list[tuple[Path, Path]]:
    folder = Path(folder)
    images = folder / "images" / split if (folder / "images" / split).is_dir() else folder / "images"
    labels = folder / "annotations" / split if (folder / "annotations" / split).is_dir() else folder / "annotations"
    pairs = [(p, labels / f"{p.stem}.png") for p in _images(images)]
    if not pairs:
        raise TransferInputError(f"{folder}: no images under {images} (expected images/{split}/*.jpg and "
                                 f"annotations/{split}/*.png)")
    missing = [str(label) for _, label in pairs if not label.is_file()]
    if missing:
        raise TransferInputError(f"{missing[0]}: the annotation of {pairs[0][0].name} is missing"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return pairs


def read_annotation(path: Path, image_size: tuple[int, int], classes: int) -> np.ndarray:
    """Class ids 0..classes-1 and IGNORE, from an ADE20K png (0 = unlabelled, c = class c - 1); uint8 from an
    8-bit png (IGNORE is 255, where 0 - 1 wraps: an eighth of int64's bytes through the augmentations)."""
    from PIL import Image

    raw = np.asarray(Image.open(path))
    if raw.ndim != 2:
        raise TransferInputError(f"{path}: an annotation must be one channel of class ids, not shape {raw.shape}")
    if raw.shape != image_size:
        raise TransferInputError(f"{path}: annotation {raw.shape[1]}x{raw.shape[0]} for an image of "
                                 f"{image_size[1]}x{image_size[0]}")
    if int(raw.max()) > classes:
        raise TransferInputError(f"{path}: class id {int(raw.max())} beyond the head's {classes} classes "
                                 f"(transfer.classes)")
    if raw.dtype == np.uint8 and IGNORE == 255:
        return raw - np.uint8(1)
    ids = raw.astype(np.int64) - 1
    ids[raw == 0] = IGNORE
    return ids


# -- depth ----------------------------------------------------------------------------------------------------------
def depth_samples(folder: Path) -> list[tuple[Path, Path]]:
    folder = Path(folder)
    pairs = []
    for image in _images(folder / "rgb"):
        label = next((p for p in (folder / "depth" / f"{image.stem}.png", folder / "depth" / f"{image.stem}.npy")
                      if p.is_file()), None)
        if label is None:
            raise TransferInputError(f"{folder / 'depth'}: no {image.stem}.png or .npy for {image}")
        pairs.append((image, label))
    if not pairs:
        raise TransferInputError(f"{folder}: no images under {folder / 'rgb'} (expected rgb/<name>.jpg with "
                                 f"depth/<name>.png)")
    return pairs


def read_depth(path: Path, image_size: tuple[int, int], scale: float) -> np.ndarray:
    """Metres (float32); 0 where nothing was measured."""
    from PIL import Image

    depth = np.load(path).astype(np.float32) if path.suffix == ".npy" else \
        np.asarray(Image.open(path)).astype(np.float32) / scale
    if depth.shape != image_size:
        raise TransferInputError(f"{path}: depth {depth.shape[-1]}x{depth.shape[0]} for an image of "
                                 f"{image_size[1]}x{image_size[0]}")
    return depth


# -- one dataset for the three tasks --------------------------------------------------------------------------------
def _rgb(path: Path):
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()  # reads the file and closes it
        return image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB photo (a decode's cost)
    except OSError as err:
        raise TransferInputError(f"{path}: not a readable image ({err})") from None


def _rgb_pixels(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, for the training transforms (stages/transfer/augment.py): no PIL image of the whole photo.
    OpenCV's decode (libjpeg-turbo, as Pillow's) gives Pillow's pixels for RGB and grey JPEGs and for PNGs, CMYK
    JPEGs within a grey level; EXIF orientation is left alone, as Pillow's open (and timm) leave it."""
    import cv2

    try:
        data = np.frombuffer(Path(path).read_bytes(), np.uint8)
        pixels = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    except (OSError, cv2.error) as err:
        raise TransferInputError(f"{path}: not a readable image ({err})") from None
    if pixels is None:
        raise TransferInputError(f"{path}: not a readable image (OpenCV cannot decode it)")
    return pixels


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a tensor built from a list on a GPU is a blocking copy, not to be paid every step."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1))


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    """A batch of uint8 pixels (B, 3, H, W), already on the model's device, as ImageNet-normalised floats."""
    mean, std = _mean_std(pixels.device)
    return (pixels.float() / 255 - mean) / std


def model_target(target: torch.Tensor) -> torch.Tensor:
    """A batch of labels on the model's device as the losses and metrics take them: uint8 class ids as int64."""
    return target.long() if target.dtype == torch.uint8 else target


def make_transform(task: str, train: bool, size: int, settings):
    """timm's classification transforms; for dense tasks torchvision's paired v2 geometry and its colour jitter on
    the pixels (stages/transfer/augment.py); uint8 out."""
    if task == "classification":
        from stages.transfer.augment import classification_transform

        return classification_transform(size, train, settings, MEAN)
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if not train:
        return v2.Compose([v2.Resize((size, size), antialias=True), v2.PILToTensor()])
    from stages.transfer.augment import ColorJitter, DenseTraining

    fill = {tv_tensors.Mask: IGNORE if task == "segmentation" else 0, "others": 0}
    geometry = [v2.ScaleJitter((size, size), scale_range=tuple(settings.scale_jitter), antialias=True)] \
        if task == "segmentation" else [v2.Resize(size, antialias=True)]
    return DenseTraining(v2.Compose([*geometry, v2.RandomCrop(size, pad_if_needed=True, fill=fill),
                                     v2.RandomHorizontalFlip()]), ColorJitter(0.4, 0.4, 0.4, 0.1))


class TransferDataset(torch.utils.data.Dataset):
    """Indexed by (position in the run, sample index): the position seeds the sample's augmentation."""

    def __init__(self, task: str, samples: list, train: bool, size: int, settings, seed: int):
        self.task, self.samples, self.train, self.size = task, samples, train, size
        self.settings, self.seed = settings, seed
        self.transform = make_transform(task, train, size, settings)
        # the training transforms read pixel arrays; the evaluation resizes (timm's, torchvision's) take PIL images
        self.decode = _rgb_pixels if train else _rgb

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from stages.transfer.augment import draws

        position, index = key if isinstance(key, tuple) else (key, key)
        seed = (self.seed * 1_000_003 + position) % 2 ** 32
        # timm's crops and RandAugment draw from this thread's generator (augment.draws), its choice of operations
        # from numpy's, the flips from torch's CPU generator: seeded directly, as torch.manual_seed would also queue
        # a CUDA seeding with its stack trace (a seventh of a sample's time)
        draws.seed(seed), np.random.seed(seed), torch.default_generator.manual_seed(seed)
        path, label = self.samples[index]
        image = self.decode(path)
        if self.task == "classification":
            return self.transform(image), torch.tensor(label)
        from torchvision import tv_tensors

        size = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        target = read_annotation(label, size, self.settings.classes) if self.task == "segmentation" \
            else read_depth(label, size, self.settings.depth_scale)
        pixels, target = self.transform(image, tv_tensors.Mask(torch.from_numpy(target)))
        return pixels, target.as_subclass(torch.Tensor)


class RunOrder(torch.utils.data.Sampler):
    """(position, sample index) for every sample a run reads from step `start` on: each epoch a permutation
    seeded by (seed, epoch), cut into batches; a resumed run reads on from the same position."""

    def __init__(self, size: int, batch: int, start: int, steps: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch, self.start, self.steps = size, batch, start, steps
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = max(1, size // (batch * world))

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, order_epoch = None, None
        for step in range(self.start, self.steps):
            epoch, within = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.size), epoch
            first = (within * self.world + self.rank) * self.batch
            for i in range(self.batch):
                yield step * self.batch * self.world + self.rank * self.batch + i, int(order[(first + i) % self.size])
