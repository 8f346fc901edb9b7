"""Turning downloaded bytes into the stored image: upright RGB, longest side at most `max_side`, JPEG.

Decoding dominates the download stage's CPU time: CC12M's images are often 2000x1500 and larger while we
keep 768 at most. For JPEGs we ask libjpeg for a DCT-scaled decode (1/2, 1/4 or 1/8 of the size, never
below the target) and then resize with Lanczos, which costs a fraction of a full decode and keeps the
result within a few tenths of a dB of a full-resolution decode (see `make bench-download`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

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

    try:
        if im.format in ("JPEG", "MPO") and stored_size != im.size:
            im.draft(None, stored_size)  # DCT scaling: libjpeg decodes straight to >= stored_size
        im.load()
        im = _to_rgb(im)
        if im.size != stored_size:
            im = im.resize(stored_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError("decode_error", f"cannot decode {im.format or 'image'}: {err}") from None
    if transpose is not None:
        im = im.transpose(transpose)

    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return StoredImage(out.getvalue(), im.width, im.height, original_w, original_h)
