"""The transfer tasks' training augmentations at a CPU cost that can feed a GPU: timm's (classification) and
torchvision's (dense tasks) own transforms and random draws, the pixels carried as (H, W, 3) uint8 arrays from the
decode to the tensor, the operations on faster kernels.

- The random-resized crop and flip: timm's draws (`random`) and torchvision's flip draw, the crop resized with
  torch's antialiased bicubic kernel on the uint8 pixels (Pillow's filter, about 4x faster than Pillow's resize on
  this machine's cores).
- RandAugment: timm's draws and level arguments, its operations on arrays (stages/transfer/pixel_ops.py: Pillow's
  pixels, the warps' cubic OpenCV's). An operation without an array version, or any other step timm puts in the
  composition, runs on a PIL image made for it.

The dense tasks (transfer_data.make_transform) keep torchvision's paired geometry, on the photo as a uint8 tensor
and its label as a mask, then jitter colour on the array (`ColorJitter`): torchvision's draws, Pillow's brightness,
contrast and saturation pixels, the hue through OpenCV's HSV.

Every draw of classification's is timm's, in timm's order, so a seed gives the same crop boxes and operations as
the stock transform; the pixels differ by the warps' kernel alone (median 71 dB apart on the test photos, 2 of 60
samples under 40 dB: a solarize after a warp moves a few pixels across its threshold).

timm's transforms draw from `random`, one generator for the whole process, which other threads draw from too
(websockets' keepalive pings in Prefect's event-loop thread call `random.getrandbits`): a sample augmented in the
training process (loader_workers 0, as the demo profile trains) now and then got another crop, and a resumed run
other weights. So timm's augmentation modules draw from `draws` here, a generator of each thread's own, seeded per
sample; the draws are the ones `random` would make from the same seed.
"""
from __future__ import annotations

import functools
import random
import threading

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from stages.transfer import pixel_ops


class ThreadDraws(threading.local):
    """`random`'s functions on the calling thread's own generator."""

    def __init__(self):
        self.generator = random.Random()

    def __getattr__(self, name):
        return getattr(self.generator, name)


draws = ThreadDraws()


def _draw_from_thread_generators() -> None:
    from timm.data import auto_augment, transforms

    auto_augment.random = transforms.random = draws


_draw_from_thread_generators()


def classification_transform(size: int, train: bool, settings, mean):
    """timm's transform for the task, uint8 (3, size, size) out; when training, it takes the (H, W, 3) uint8 array
    `transfer_data._rgb_pixels` decodes (or a PIL image) and runs on arrays."""
    from timm.data import create_transform

    transform = create_transform(size, is_training=train, auto_augment=settings.randaugment if train else None,
                                 scale=tuple(settings.crop_scale), mean=mean, interpolation="bicubic",
                                 re_prob=0.0, use_prefetcher=True)  # mean: RandAugment's fill colour
    if train:
        adapt(transform)
    return transform


def adapt(transform) -> None:
    """Carry timm's composed training transform on arrays (in place; its draws are left alone): its crop and the
    flip after it become one `ResizedCrop`, RandAugment's operations their array versions, the last step a tensor
    view of the array; any other step runs on a PIL image."""
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
    from torchvision.transforms import RandomHorizontalFlip

    steps = transform.transforms
    if not isinstance(steps[0], RandomResizedCropAndInterpolation):
        raise TypeError(f"timm's training transform starts with {steps[0]!r}, not its random-resized crop")
    adapted = [ResizedCrop(steps[0])]
    for step in steps[1:]:
        if isinstance(step, RandomHorizontalFlip) and len(adapted) == 1:
            adapted[0].flip = step.p
        elif isinstance(step, RandAugment):
            for op in step.ops:
                op.aug_fn = array_operation(op.aug_fn)
            adapted.append(step)
        elif isinstance(step, MaybePILToTensor):
            adapted.append(to_tensor)
        else:
            adapted.append(OnPIL(step))
    steps[:] = adapted


class ResizedCrop:
    """timm's random-resized crop and the horizontal flip after it: their draws, the crop resized by torch's
    antialiased bicubic on uint8 pixels and flipped there. Takes an (H, W, 3) uint8 array or a PIL image; gives an
    array."""

    def __init__(self, timm_crop, flip: float | None = None):
        self.timm_crop, self.flip = timm_crop, flip
        self.size = tuple(timm_crop.size)

    def __call__(self, image) -> np.ndarray:
        pixels = np.asarray(image)
        shape = torch.zeros(1, 1).expand(pixels.shape[:2])  # timm's draws read only the image's size
        top, left, height, width = self.timm_crop.get_params(shape, self.timm_crop.scale, self.timm_crop.ratio)
        crop = torch.from_numpy(np.array(pixels[top:top + height, left:left + width], order="C"))  # writable
        out = torch.nn.functional.interpolate(crop.permute(2, 0, 1)[None], size=self.size, mode="bicubic",
                                              antialias=True)[0]  # planar out
        if self.flip is not None and torch.rand(1) < self.flip:  # torchvision's RandomHorizontalFlip's draw
            out = out.flip(-1)
        return cv2.merge(list(out.numpy()))  # planes to (H, W, 3): a tenth of a transposing copy's time

    def __repr__(self) -> str:
        return f"ResizedCrop({self.timm_crop!r}, flip p={self.flip}, torch's uint8 bicubic)"


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8, a view as torchvision's pil_to_tensor gives (the batch's collation copies it)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


class OnPIL:
    """A step of timm's composition that takes PIL images, between array steps."""

    def __init__(self, step):
        self.step = step

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        from PIL import Image

        return np.array(self.step(Image.fromarray(pixels)))

    def __repr__(self) -> str:
        return f"OnPIL({self.step!r})"


@functools.cache
def _array_versions() -> dict:
    """timm's operation functions and their array versions; the geometric ones resolve timm's resampling filter
    as timm does (a draw when it is a random choice), the others take none."""
    from timm.data import auto_augment as aa

    def geometric(fn):
        return lambda pixels, *args, **kwargs: fn(pixels, *args, **{**kwargs, "resample": aa._interpolation(kwargs)})

    ops = {aa.auto_contrast: pixel_ops.auto_contrast, aa.equalize: pixel_ops.equalize, aa.invert: pixel_ops.invert,
           aa.posterize: pixel_ops.posterize, aa.solarize: pixel_ops.solarize,
           aa.solarize_add: pixel_ops.solarize_add, aa.color: pixel_ops.color, aa.contrast: pixel_ops.contrast,
           aa.brightness: pixel_ops.brightness, aa.sharpness: pixel_ops.sharpness}
    for name in ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
                 "translate_y_abs"):
        ops[getattr(aa, name)] = geometric(getattr(pixel_ops, name))
    return ops


def array_operation(fn):
    """The array version of one of timm's operation functions; one without runs on a PIL image made for it."""
    from PIL import Image

    return _array_versions().get(fn) or (
        lambda pixels, *args, **kwargs: np.array(fn(Image.fromarray(pixels), *args, **kwargs)))


class ColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter on (H, W, 3) uint8 arrays: its draws (the order of the four and their factors, from
    torch's generator), Pillow's pixels for brightness, contrast and saturation as torchvision's PIL kernels give
    them, the hue through OpenCV's HSV."""

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        params = self.make_params([])
        kernels = (pixel_ops.brightness, pixel_ops.contrast, pixel_ops.color, pixel_ops.hue)
        factors = (params["brightness_factor"], params["contrast_factor"], params["saturation_factor"],
                   params["hue_factor"])
        for index in params["fn_idx"].tolist():
            if factors[index] is not None:
                pixels = kernels[index](pixels, factors[index])
        return pixels


class DenseTraining:
    """A dense task's training transform: torchvision's paired geometry on the photo as a channels-last uint8 tensor
    (torch's uint8 resize kernel: about half of Pillow's time, within a grey level of its pixels) and its label as a
    mask, then the colour jitter on the pixels; (uint8 (3, H, W), label) out."""

    def __init__(self, paired_geometry, jitter):
        self.paired_geometry, self.jitter = paired_geometry, jitter

    def __call__(self, pixels: np.ndarray, label):
        image, label = self.paired_geometry(tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1)), label)
        return to_tensor(self.jitter(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))), label

    def __repr__(self) -> str:
        return f"DenseTraining({self.paired_geometry!r}, {self.jitter!r})"
