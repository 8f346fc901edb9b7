"""The paper's classification augmentation (timm's random-resized crop, flip and RandAugment) at a CPU cost that
can feed a GPU: timm's own transforms and random draws, with two of its pixel operations on faster kernels.

- The random-resized crop: timm's draws (`random`), resized with torch's antialiased bicubic kernel on the uint8
  pixels (Pillow's filter, about 4x faster than Pillow's resize on this machine's cores).
- RandAugment's geometric operations (rotate, shear, translate): the same affine matrices and fill, warped with
  OpenCV's bicubic (Pillow's generic bicubic transform takes about 3 ms for a 224 image, OpenCV's 1.2 ms on one
  thread). Its cubic kernel is a little sharper than Pillow's (a = -0.75 against -0.5): 40-44 dB apart on photos.
- Posterize at 0 bits (timm's increasing ops, `-inc1` as MAE and DeiT use them, at magnitude 10) is refused by
  Pillow 13 with a ValueError that timm 1.0.31 passes on, about one sample in 650 at rand-m9-mstd0.5-inc1: a
  crashed epoch. Here it gives the black image older Pillows gave.

Every draw is timm's, in timm's order, so a seed gives the same crop boxes and operations as the stock transform;
the pixels differ by the kernels alone (median 71 dB apart on the test photos, 2 of 60 samples under 40 dB: a
solarize after a warp moves a few pixels across its threshold).

timm's transforms draw from `random`, one generator for the whole process, which other threads draw from too
(websockets' keepalive pings in Prefect's event-loop thread call `random.getrandbits`): a sample augmented in the
training process (loader_workers 0, as the demo profile trains) now and then got another crop, and a resumed run
other weights. So timm's augmentation modules draw from `draws` here, a generator of each thread's own, seeded per
sample; the draws are the ones `random` would make from the same seed.
"""
from __future__ import annotations

import math
import random
import threading

import cv2
import numpy as np
import torch

# Parallelism comes from the loader's worker processes; OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(1)


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
    """timm's transform for the task, uint8 (3, size, size) out, with the faster kernels when training."""
    from timm.data import create_transform

    transform = create_transform(size, is_training=train, auto_augment=settings.randaugment if train else None,
                                 scale=tuple(settings.crop_scale), mean=mean, interpolation="bicubic",
                                 re_prob=0.0, use_prefetcher=True)  # mean: RandAugment's fill colour
    if train:
        adapt(transform)
    return transform


def adapt(transform) -> None:
    """Swap the kernels inside timm's composed training transform (in place; its draws are left alone)."""
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation

    kernels = _kernels()
    for i, step in enumerate(transform.transforms):
        if isinstance(step, RandomResizedCropAndInterpolation):
            transform.transforms[i] = ResizedCrop(step)
        elif isinstance(step, RandAugment):
            for op in step.ops:
                op.aug_fn = kernels.get(op.aug_fn, op.aug_fn)


class ResizedCrop:
    """timm's random-resized crop: its box draws, resized by torch's antialiased bicubic on uint8 pixels."""

    def __init__(self, timm_crop):
        self.timm_crop = timm_crop
        self.size = tuple(timm_crop.size)

    def __call__(self, image):
        from PIL import Image

        top, left, height, width = self.timm_crop.get_params(image, self.timm_crop.scale, self.timm_crop.ratio)
        pixels = torch.from_numpy(np.array(image.crop((left, top, left + width, top + height))))
        out = torch.nn.functional.interpolate(pixels.permute(2, 0, 1)[None], size=self.size, mode="bicubic",
                                              antialias=True)
        return Image.merge("RGB", [Image.fromarray(plane) for plane in out[0].numpy()])  # 4x a transposing copy

    def __repr__(self) -> str:
        return f"ResizedCrop({self.timm_crop!r}, torch's uint8 bicubic)"


def warp(image, matrix, fillcolor=None, **_):
    """Pillow's AFFINE `matrix` (output to input, pixel edges as 0) through OpenCV's bicubic warp."""
    from PIL import Image

    a, b, c, d, e, f = matrix
    # OpenCV puts 0 at a pixel's centre, Pillow at its edge
    inverse = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]])
    out = cv2.warpAffine(np.asarray(image), inverse, image.size, flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=fillcolor or 0)
    return Image.fromarray(out)


def rotate(image, degrees, **kwargs):
    """Counter-clockwise about the centre, as Pillow's `rotate`."""
    w, h = image.size
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return warp(image, (cos, -sin, w / 2 - cos * w / 2 + sin * h / 2,
                        sin, cos, h / 2 - sin * w / 2 - cos * h / 2), **kwargs)


def posterize(image, bits, **_):
    from PIL import ImageOps

    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits > 0 else image.point(lambda _: 0)


def _kernels() -> dict:
    """timm's operation functions and the ones that replace them."""
    from timm.data import auto_augment as aa

    return {aa.rotate: rotate,
            aa.shear_x: lambda image, factor, **kw: warp(image, (1, factor, 0, 0, 1, 0), **kw),
            aa.shear_y: lambda image, factor, **kw: warp(image, (1, 0, 0, factor, 1, 0), **kw),
            aa.translate_x_rel: lambda image, pct, **kw: warp(image, (1, 0, pct * image.size[0], 0, 1, 0), **kw),
            aa.translate_y_rel: lambda image, pct, **kw: warp(image, (1, 0, 0, 0, 1, pct * image.size[1]), **kw),
            aa.translate_x_abs: lambda image, pixels, **kw: warp(image, (1, 0, pixels, 0, 1, 0), **kw),
            aa.translate_y_abs: lambda image, pixels, **kw: warp(image, (1, 0, 0, 0, 1, pixels), **kw),
            aa.posterize: posterize}
