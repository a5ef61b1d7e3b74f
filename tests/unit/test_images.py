"""Decoding untrusted image bytes: limits, hostile files, every pixel mode, EXIF."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.encoders.errors import ImageRejected, Rejection
from loupe.encoders.images import DecodeLimits, decode_image, fit_square, pil_to_uint8_tensor


def _save(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _jpeg(size=(64, 48), color=(200, 30, 30)) -> bytes:
    return _save(Image.new("RGB", size, color), "JPEG", quality=90)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares 10 gigapixels (its data would inflate to ~30 GB)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" + b"\x00" * 3 * 1024, 9)  # a sliver: never read anyway
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _rejected(data: bytes, reason: Rejection, needle: str, **kwargs) -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == reason
    assert needle in str(info.value), str(info.value)


def test_zero_bytes():
    _rejected(b"", Rejection.IMAGE_INVALID, "empty")


def test_not_an_image():
    _rejected(b"<html>404 not found</html>", Rejection.IMAGE_INVALID, "not a JPEG, PNG or WebP")


def test_formats_outside_the_allow_list_are_not_even_tried():
    _rejected(_save(Image.new("RGB", (32, 32)), "BMP"), Rejection.IMAGE_INVALID, "not a JPEG")
    _rejected(_save(Image.new("RGB", (32, 32)), "GIF"), Rejection.IMAGE_INVALID, "not a JPEG")


def test_truncated_jpeg():
    data = _save(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    _rejected(data[: len(data) // 2], Rejection.IMAGE_INVALID, "could not be decoded")


def test_png_bomb_is_rejected_from_its_header_without_decoding():
    data = _png_bomb()
    assert len(data) < 1000
    _rejected(data, Rejection.IMAGE_TOO_LARGE, "10000000000 pixels")
    # Below Pillow's own guard, ours still refuses before decoding.
    _rejected(_png_bomb(8_000, 8_000), Rejection.IMAGE_TOO_LARGE, "8000x8000 pixels")


def test_huge_jpeg_dimensions_are_rejected():
    data = bytearray(_jpeg((64, 48)))
    sof = data.index(b"\xff\xc0")  # start of frame: precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 9_000, 9_000)
    _rejected(bytes(data), Rejection.IMAGE_TOO_LARGE, "9000x9000")


def test_byte_limit():
    _rejected(
        _jpeg(), Rejection.IMAGE_TOO_LARGE, "byte limit", limits=DecodeLimits(max_image_bytes=100)
    )


def test_declared_media_type_must_match_the_content():
    _rejected(
        _jpeg(),
        Rejection.IMAGE_INVALID,
        "declared image/png but the content is JPEG",
        media_type="image/png",
    )
    assert decode_image(_jpeg(), media_type="image/jpeg").size == (64, 48)


def test_tiny_images_are_refused():
    _rejected(_save(Image.new("RGB", (4, 4))), Rejection.IMAGE_INVALID, "too small")


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("L", (20, 10), 128), "PNG"),
        (Image.new("CMYK", (20, 10), (0, 0, 0, 0)), "JPEG"),
        (Image.new("P", (20, 10), 3), "PNG"),
        (Image.new("RGB", (20, 10), (1, 2, 3)), "WEBP"),
        (Image.new("1", (20, 10), 1), "PNG"),
    ],
)
def test_every_mode_becomes_rgb(image, fmt):
    decoded = decode_image(_save(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparency_becomes_white_not_black():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.putpixel((10, 10), (255, 0, 0, 255))
    decoded = np.asarray(decode_image(_save(rgba)))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[10, 10]) == (255, 0, 0)


def test_palette_with_transparency_becomes_white():
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    decoded = np.asarray(decode_image(_save(palette, transparency=0)))
    assert tuple(decoded[0, 0]) == (255, 255, 255)


def test_16_bit_greyscale_uses_the_full_range():
    array = np.full((10, 20), 65535, dtype=np.uint16)
    array[:, :10] = 32768
    assert Image.fromarray(array).mode == "I;16"
    decoded = np.asarray(decode_image(_save(Image.fromarray(array))))
    assert decoded[0, 15, 0] == 255
    assert 120 <= decoded[0, 5, 0] <= 135, "mid-grey must stay mid-grey, not clip to white"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_save(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 60)


def test_large_jpeg_decodes_at_reduced_scale_for_the_model():
    data = _jpeg((2000, 1600))
    full = decode_image(data)
    drafted = decode_image(data, target_side=224)
    assert full.size == (2000, 1600)
    assert 448 <= min(drafted.size) < 1600


@pytest.mark.parametrize("fit", ["pad", "center_crop", "squash"])
def test_fit_square_shapes_and_range(fit):
    tensor = pil_to_uint8_tensor(Image.new("RGB", (300, 100), (0, 0, 0)))
    out = fit_square(tensor, 224, fit)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_pad_keeps_the_whole_photo_on_white():
    tensor = pil_to_uint8_tensor(Image.new("RGB", (300, 100), (0, 0, 0)))
    out = fit_square(tensor, 30, "pad")
    assert float(out[:, 0, 15].min()) == 1.0, "the padding is white"
    assert float(out[:, 15, 0].max()) == 0.0, "the photo spans the full width"
    cropped = fit_square(tensor, 30, "center_crop")
    assert float(cropped.max()) == 0.0, "a centre crop of a wide photo has no margin"


def test_unknown_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fit 'zoom'"):
        fit_square(torch.zeros(3, 10, 10, dtype=torch.uint8), 8, "zoom")
