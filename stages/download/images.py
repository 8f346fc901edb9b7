"""Turning downloaded bytes into the stored image: upright RGB, longest side at most `max_side`, JPEG.

Decoding and resizing are the download stage's CPU cost: CC12M's images are often 2000x1500 and larger
while we keep 768 at most. For JPEGs we ask libjpeg for a DCT-scaled decode (1/2, 1/4 or 1/8 of the size,
never below the target), which leaves a resize by a factor below 2: OpenCV's bicubic does that in a few
milliseconds (Pillow's Lanczos takes 5-8x longer here) and lands within 46-50 dB PSNR of a full decode
resized with Lanczos. Larger factors (formats without DCT scaling) use OpenCV's area filter, which
averages every source pixel. Figures: docs/benchmarks.md.

Pillow reads every header (size, mode, EXIF orientation) so limits are checked before any pixel is decoded.
A complete RGB or grayscale JPEG, the common case, is then decoded, resized and encoded by OpenCV without
crossing into Pillow's pixel layout (that copy alone costs ~3 ms); everything else goes through Pillow.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Parallelism comes from shard tasks and download threads; OpenCV's own thread pool would oversubscribe.
cv2.setNumThreads(1)

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (ImageOps.exif_transpose's table).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
ACCEPTED_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]  # JPEG also opens MPO


# The same turns for OpenCV's BGR arrays, keyed by Pillow's transpose.
CV2_UPRIGHT = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda a: cv2.flip(a, 1),
    Image.Transpose.ROTATE_180: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    Image.Transpose.FLIP_TOP_BOTTOM: lambda a: cv2.flip(a, 0),
    Image.Transpose.TRANSPOSE: cv2.transpose,
    Image.Transpose.ROTATE_270: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    Image.Transpose.TRANSVERSE: lambda a: cv2.flip(cv2.transpose(a), -1),
    Image.Transpose.ROTATE_90: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
CV2_REDUCED_DECODE = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                      8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class StoredImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale so the longest side is at most max_side, keeping the aspect ratio; never upscale."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _sniff(data: bytes) -> None:
    head = data[:64].lstrip()
    if not head:
        raise ImageError("not_an_image", "empty body")
    if head[:1] in (b"<", b"{", b"[") or head[:5].lower() in (b"<!doc", b"<html"):
        raise ImageError("not_an_image", f"body starts with {data[:40]!r}: text, not an image")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit scaled down, CMYK/palette converted."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit samples: keep the top byte (Pillow's own convert would clip everything above 255 to white).
        values = np.asarray(im, dtype=np.uint32)
        return Image.fromarray((values >> 8).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _resize_array(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale; bicubic below a factor of 2 (no aliasing to fear), area averaging above."""
    interpolation = cv2.INTER_AREA if pixels.shape[1] >= 2 * size[0] else cv2.INTER_CUBIC
    return cv2.resize(pixels, size, interpolation=interpolation)


def _ends_complete(data: bytes) -> bool:
    # A JPEG cut short lacks its end-of-image marker; OpenCV would grey-fill it silently, Pillow raises.
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _opencv_jpeg(data: bytes, size: tuple[int, int], stored_size: tuple[int, int],
                 transpose: Image.Transpose | None, quality: int) -> bytes | None:
    """Decode (DCT-scaled), resize, turn upright and encode in OpenCV; None if OpenCV cannot decode it."""
    factor = min(size[0] // stored_size[0], size[1] // stored_size[1])
    scale = next(s for s in (8, 4, 2, 1) if s <= max(factor, 1))  # never decode below the target size
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), CV2_REDUCED_DECODE[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        return None
    if (pixels.shape[1], pixels.shape[0]) != stored_size:
        pixels = _resize_array(pixels, stored_size)
    if transpose is not None:
        pixels = CV2_UPRIGHT[transpose](pixels)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes() if ok else None


def process_image(data: bytes, max_side: int = 768, quality: int = 95, max_pixels: int = 50_000_000) -> StoredImage:
    _sniff(data)
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a recognised image format (starts with {data[:12]!r})") from None
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("decode_error", f"cannot read image header: {err}") from None

    # Only the header has been read so far: refuse bombs before any pixel is decoded.
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")

    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
        orientation = 1
    transpose = UPRIGHT.get(orientation)
    swaps = transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                          Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)
    original_w, original_h = (height, width) if swaps else (width, height)
    out_w, out_h = target_size(original_w, original_h, max_side)
    # Resize in the stored (sensor) orientation, then transpose the small result.
    stored_size = (out_h, out_w) if swaps else (out_w, out_h)

    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L") and _ends_complete(data):
        jpeg = _opencv_jpeg(data, im.size, stored_size, transpose, quality)
        if jpeg is not None:
            return StoredImage(jpeg, out_w, out_h, original_w, original_h)

    try:
        if im.format in ("JPEG", "MPO") and stored_size != im.size:
            im.draft(None, stored_size)  # DCT scaling: libjpeg decodes straight to >= stored_size
        im.load()
        im = _to_rgb(im)
        if im.size != stored_size:
            im = Image.fromarray(_resize_array(np.asarray(im), stored_size))
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError("decode_error", f"cannot decode {im.format or 'image'}: {err}") from None
    if transpose is not None:
        im = im.transpose(transpose)

    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return StoredImage(out.getvalue(), im.width, im.height, original_w, original_h)
