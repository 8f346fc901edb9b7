"""RandAugment's image operations as timm calls them (`fn(image, *level_args, **kwargs)`), on (H, W, 3) uint8 arrays
instead of PIL images: each gives Pillow's pixels (tests/test_transfer_augment.py compares them), except the warps,
whose cubic is OpenCV's.

Why arrays: on a 224 image, Pillow's `point` with a 768-entry table takes about 0.2 ms where OpenCV's LUT takes
0.08, its generic 3x3 filter about 1 ms, its bicubic affine transform about 3 ms, and every PIL image made from an
array or turned into one is another copy. A training sample of classification at 224 spent about a third of its
loader time in these operations and conversions.

- The table operations (auto-contrast, equalize, invert, posterize, solarize, solarize-add, and brightness and
  contrast, whose blend partner is one grey level) build Pillow's tables and apply them with OpenCV's LUT.
- The blends (colour, sharpness) are Pillow's `Image.blend`: float32 arithmetic, truncated, clipped only when
  extrapolating; the grey image is Pillow's "L" conversion, the smoothing Pillow's 3x3 SMOOTH kernel.
- The warps (rotate, shear, translate) are Pillow's affine matrices through OpenCV's `warpAffine`, on float pixels
  (OpenCV's uint8 cubic warp has no vector kernel on these cores: 1.1-1.5 ms against 0.7-0.8 with the conversions,
  the same pixels). OpenCV's cubic is a little sharper than Pillow's (a = -0.75 against -0.5): 40-44 dB apart.
- The dense tasks' colour jitter uses brightness, contrast and colour above, and `hue`: torchvision's hue shift
  through OpenCV's HSV (Pillow's two HSV conversions took about 10 ms for a 512 crop), within a stated PSNR.
- Posterize at 0 bits (timm's increasing operations at magnitude 10, `-inc1` as MAE and DeiT use them) is refused
  by Pillow 13 with a ValueError that timm 1.0.31 passes on, about one sample in 650 at rand-m9-mstd0.5-inc1: a
  crashed epoch. Here it gives the black image older Pillows gave.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# Parallelism comes from the loader's worker processes; OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(1)

RAMP = np.arange(256)
GREY = np.array([[19595, 38470, 7471, 32768]], np.float32) / 65536  # Pillow's RGB to "L", and its rounding
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # Pillow's ImageFilter.SMOOTH


def _lut(pixels: np.ndarray, tables) -> np.ndarray:
    """`tables`: 256 values for every channel, or one row of 256 per channel; clipped to 0-255 as Pillow's point."""
    tables = np.clip(np.asarray(tables), 0, 255).astype(np.uint8)
    return cv2.LUT(pixels, tables if tables.ndim == 1 else np.ascontiguousarray(tables.T)[:, None, :])


def _histograms(pixels: np.ndarray) -> np.ndarray:
    """(3, 256) counts, Pillow's `histogram()` of an RGB image."""
    return np.stack([cv2.calcHist([pixels], [c], None, [256], [0, 256]).ravel() for c in range(3)]).astype(np.int64)


def grey(pixels: np.ndarray) -> np.ndarray:
    """Pillow's `convert("L")`: (R 19595 + G 38470 + B 7471 + 32768) >> 16, exactly, in float32 (every sum is a
    multiple of 1/65536 under 256: 24 bits); a tenth of the time of the integer arithmetic in numpy."""
    return cv2.transform(pixels.astype(np.float32), GREY).astype(np.uint8)


def _blend(degenerate, pixels: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's `Image.blend(degenerate, image, factor)`: degenerate + factor (image - degenerate) in float32,
    truncated, clipped when extrapolating. `degenerate`: a number or an array of `pixels`' shape (numpy's
    broadcasting across channels takes three times as long)."""
    degenerate = np.asarray(degenerate, np.float32)
    out = pixels.astype(np.float32)
    out -= degenerate
    out *= np.float32(factor)
    out += degenerate
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


# -- table operations -----------------------------------------------------------------------------------------------
def auto_contrast(pixels, **_):
    tables = []
    for counts in _histograms(pixels):
        low, high = np.flatnonzero(counts)[[0, -1]].tolist()  # the darkest and lightest levels present
        scale = 255.0 / (high - low) if high > low else None
        tables.append(np.trunc(RAMP * scale + -low * scale) if scale else RAMP)
    return _lut(pixels, tables)


def equalize(pixels, **_):
    tables = []
    for counts in _histograms(pixels):
        used = counts[counts > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])  # pixels under each level
        tables.append((step // 2 + below) // step if step else RAMP)
    return _lut(pixels, tables)


def invert(pixels, **_):
    return cv2.bitwise_not(pixels)


def posterize(pixels, bits, **_):
    if bits >= 8:
        return pixels
    return _lut(pixels, RAMP & ~(2 ** (8 - bits) - 1)) if bits > 0 else np.zeros_like(pixels)


def solarize(pixels, thresh, **_):
    return _lut(pixels, np.where(RAMP < thresh, RAMP, 255 - RAMP))


def solarize_add(pixels, add, thresh=128, **_):
    return _lut(pixels, np.where(RAMP < thresh, np.minimum(255, RAMP + add), RAMP))


def brightness(pixels, factor, **_):
    return _lut(pixels, _blend(0, RAMP, factor))


def contrast(pixels, factor, **_):
    mean = int(grey(pixels).mean(dtype=np.float64) + 0.5)  # Pillow's ImageStat mean of the grey image, rounded
    return _lut(pixels, _blend(mean, RAMP, factor))


# -- blends with an image -------------------------------------------------------------------------------------------
def color(pixels, factor, **_):
    levels = grey(pixels)
    return _blend(cv2.merge([levels, levels, levels]), pixels, factor)


def sharpness(pixels, factor, **_):
    smooth = cv2.filter2D(pixels, -1, SMOOTH)
    smooth[[0, -1]], smooth[:, [0, -1]] = pixels[[0, -1]], pixels[:, [0, -1]]  # Pillow leaves the border as it was
    return _blend(smooth, pixels, factor)


# -- warps ----------------------------------------------------------------------------------------------------------
def warp(pixels, matrix, fillcolor=None, resample=None, **_):
    """Pillow's AFFINE `matrix` (output to input, pixel edges as 0) through OpenCV's warp."""
    from PIL import Image

    a, b, c, d, e, f = matrix
    # OpenCV puts 0 at a pixel's centre, Pillow at its edge
    inverse = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]])
    kernel = {Image.Resampling.NEAREST: cv2.INTER_NEAREST, Image.Resampling.BILINEAR: cv2.INTER_LINEAR}.get(
        resample, cv2.INTER_CUBIC)
    out = cv2.warpAffine(pixels.astype(np.float32), inverse, (pixels.shape[1], pixels.shape[0]),
                         flags=kernel | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=fillcolor or 0)
    return np.rint(out, out=out).clip(0, 255).astype(np.uint8)


def rotate(pixels, degrees, **kwargs):
    """Counter-clockwise about the centre, as Pillow's `rotate`."""
    h, w = pixels.shape[:2]
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return warp(pixels, (cos, -sin, w / 2 - cos * w / 2 + sin * h / 2,
                         sin, cos, h / 2 - sin * w / 2 - cos * h / 2), **kwargs)


def shear_x(pixels, factor, **kwargs):
    return warp(pixels, (1, factor, 0, 0, 1, 0), **kwargs)


def shear_y(pixels, factor, **kwargs):
    return warp(pixels, (1, 0, 0, factor, 1, 0), **kwargs)


def translate_x_rel(pixels, pct, **kwargs):
    return warp(pixels, (1, 0, pct * pixels.shape[1], 0, 1, 0), **kwargs)


def translate_y_rel(pixels, pct, **kwargs):
    return warp(pixels, (1, 0, 0, 0, 1, pct * pixels.shape[0]), **kwargs)


def translate_x_abs(pixels, offset, **kwargs):
    return warp(pixels, (1, 0, offset, 0, 1, 0), **kwargs)


def translate_y_abs(pixels, offset, **kwargs):
    return warp(pixels, (1, 0, 0, 0, 1, offset), **kwargs)


# -- the dense tasks' colour jitter -----------------------------------------------------------------------------------
def hue(pixels, factor, **_):
    """torchvision's hue jitter (H + int(factor * 255), wrapping, in Pillow's 0-255 hue) through OpenCV's HSV, whose
    rounding differs from Pillow's (about 10 ms of Pillow's two conversions for a 512 crop; tests state the PSNR)."""
    h, s, v = cv2.split(cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL))
    h = cv2.LUT(h, ((RAMP + int(factor * 255)) % 256).astype(np.uint8))
    return cv2.cvtColor(cv2.merge([h, s, v]), cv2.COLOR_HSV2RGB_FULL)
