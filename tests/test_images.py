import io

import numpy as np
import pytest
from PIL import Image

from stages.download.images import ImageError, process_image, target_size
from tests.helpers import encode, exif_rotated_jpeg, large_jpeg, photo, png_bomb_header, psnr


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "RGB"
    return im


def test_large_jpeg_is_resized_to_max_side_keeping_aspect_and_quality():
    data = large_jpeg((2048, 1536))
    out = process_image(data, max_side=768, quality=95)
    assert (out.width, out.height, out.original_width, out.original_height) == (768, 576, 2048, 1536)
    im = decode(out.jpeg)
    assert im.size == (768, 576)
    # Against a full-resolution decode resized with Lanczos, the DCT-scaled decode loses nothing visible.
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((768, 576), Image.Resampling.LANCZOS)
    assert psnr(np.asarray(im), np.asarray(reference)) >= 35.0


def test_small_images_are_never_upscaled():
    out = process_image(encode(photo("chelsea"), quality=95), max_side=768)  # 451x300
    assert (out.width, out.height) == (451, 300)
    assert target_size(300, 200, 768) == (300, 200) and target_size(3000, 1000, 768) == (768, 256)


def test_exif_rotated_photo_is_stored_upright():
    data, upright = exif_rotated_jpeg(orientation=6)
    out = process_image(data, max_side=768)
    assert (out.width, out.height) == upright.size == (600, 400)
    assert (out.original_width, out.original_height) == (600, 400)
    assert psnr(np.asarray(decode(out.jpeg)), np.asarray(upright)) > 30


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_cmyk_and_grayscale_jpegs_become_rgb(mode):
    src = photo("coffee")
    out = process_image(encode(src.convert(mode), quality=95))
    im = decode(out.jpeg)
    expected = src.convert(mode).convert("RGB")
    assert psnr(np.asarray(im), np.asarray(expected)) > 30


def test_palette_and_alpha_are_composited_on_white():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 20, 30))
    palette.info["transparency"] = 0
    for data in (encode(rgba, "PNG"), encode(palette, "PNG", transparency=0)):
        arr = np.asarray(decode(process_image(data).jpeg)).astype(int)
        assert (arr[:, :15] > 245).all(), "transparent pixels must become white"
        assert arr[:, 25:, 0].mean() > 240 and arr[:, 25:, 1:].mean() < 15, "opaque red stays red"


def test_16_bit_grayscale_keeps_its_range():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(16, axis=0).repeat(16, axis=1)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = np.asarray(decode(process_image(data).jpeg)).astype(int)
    assert abs(arr[8, 8, 0] - 0) <= 3 and abs(arr[8, 24, 0] - 128) <= 3 and abs(arr[8, 40, 0] - 255) <= 3


def test_truncated_jpeg_is_a_decode_error():
    data = large_jpeg((1024, 768))
    with pytest.raises(ImageError) as err:
        process_image(data[: len(data) // 2])
    assert err.value.status == "decode_error" and "truncated" in err.value.message


def test_pixel_count_is_checked_from_the_header_before_decoding():
    # The pixel data is garbage: reaching the decoder would give decode_error, not too_many_pixels.
    with pytest.raises(ImageError) as err:
        process_image(png_bomb_header(9000, 9000), max_pixels=50_000_000)
    assert err.value.status == "too_many_pixels" and "9000x9000 = 81000000 pixels" in err.value.message
    with pytest.raises(ImageError) as err:  # beyond Pillow's own limit too
        process_image(png_bomb_header(60000, 60000))
    assert err.value.status == "too_many_pixels"


@pytest.mark.parametrize("body", [b"<!DOCTYPE html><html></html>", b"  <html><body>hi</body></html>",
                                  b"plain text, no image", b""])
def test_text_is_not_an_image(body):
    with pytest.raises(ImageError) as err:
        process_image(body)
    assert err.value.status == "not_an_image"


def _with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo("coffee"), quality=95, exif=exif.tobytes())  # 600x400 stored


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("path", ["opencv", "pillow"])
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation, path):
    from PIL import ImageOps

    data = _with_orientation(orientation)
    if path == "pillow":
        data += b"trailing bytes after the end marker"  # a complete JPEG that takes the Pillow path
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    out = process_image(data, max_side=300)
    target = target_size(*expected.size, 300)
    assert (out.width, out.height) == target and (out.original_width, out.original_height) == expected.size
    reference = expected.resize(target, Image.Resampling.LANCZOS)
    assert psnr(np.asarray(decode(out.jpeg)), np.asarray(reference)) > 30


def test_opencv_and_pillow_paths_agree():
    data = large_jpeg((2048, 1536), name="chelsea")
    fast = np.asarray(decode(process_image(data).jpeg))
    slow = np.asarray(decode(process_image(data + b"\0junk").jpeg))
    assert fast.shape == slow.shape == (576, 768, 3)
    assert psnr(fast, slow) > 38
