"""Every image within the byte limit either becomes model input or fails as that item with a
code: never an exception out of the preprocessor, never an allocation sized by what the file
merely claims. Generated: extreme aspect ratios, 1-pixel sides, huge declared sizes in tiny
files, truncated and corrupt data, wrong declared types, every Pillow mode, EXIF orientations.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from PIL import Image

from loupe.encoders.device import Acceleration
from loupe.encoders.errors import ItemRejected, Rejection
from loupe.encoders.images import DecodeLimits, fit_square
from loupe.encoders.preprocess import ImagePreprocessor, Photo

SIDE = 224
CPU = torch.device("cpu")
PLAIN = Acceleration(
    amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=False
)
BATCHED = Acceleration(
    amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=True
)
SAVE_AS = {
    "JPEG": ("RGB", "L", "CMYK", "1"),
    "PNG": ("RGB", "L", "RGBA", "LA", "P", "I;16", "1"),
    "WEBP": ("RGB", "RGBA"),
}


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@st.composite
def images(draw) -> Photo:
    kind = draw(st.sampled_from(["image", "image", "image", "declared-huge", "garbage"]))
    if kind == "declared-huge":
        width = draw(st.integers(1, 2**31 - 1))
        height = draw(st.integers(1, 2**31 - 1))
        return Photo(_png_declaring(width, height), draw(st.sampled_from([None, "image/png"])))
    if kind == "garbage":
        return Photo(
            draw(st.binary(min_size=0, max_size=256)),
            draw(st.sampled_from([None, "image/jpeg", "image/png", "image/webp"])),
        )
    fmt = draw(st.sampled_from(sorted(SAVE_AS)))
    mode = draw(st.sampled_from(SAVE_AS[fmt]))
    short = draw(st.integers(1, 64))
    ratio = draw(st.sampled_from([1, 1, 2, 7, 19, 21, 100, 2000]))
    width, height = (short * ratio, short) if draw(st.booleans()) else (short, short * ratio)
    cap = 16_000 if fmt == "WEBP" else 40_000  # WebP's own size limit is 16,383
    width, height = min(width, cap), min(height, cap)
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)  # 16-bit greyscale
    else:
        image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    extra = {}
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))
        extra["exif"] = exif
    image.save(out, fmt, **extra)
    data = out.getvalue()
    if draw(st.booleans()) and draw(st.booleans()):
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]  # truncated
    declared = draw(st.sampled_from([None, None, "image/jpeg", "image/png", "image/webp"]))
    return Photo(data, declared)


@pytest.fixture(scope="module", params=[PLAIN, BATCHED], ids=["pillow", "batch-decode"])
def preprocessor(request):
    prep = ImagePreprocessor(
        side=SIDE,
        device=CPU,
        acceleration=request.param,
        limits=DecodeLimits(max_image_bytes=2 * 1024 * 1024),
    )
    yield prep
    prep.close()


@pytest.mark.slow  # ~1,300 generated images through both decode paths
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused after it
@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(images(), min_size=1, max_size=4))
def test_every_image_encodes_or_fails_as_itself(preprocessor, photos):
    started = time.monotonic()
    pixels, rows, failures = preprocessor.batch(photos)
    assert time.monotonic() - started < 10, "nothing sized by a claim may be decoded or allocated"
    assert sorted(rows + list(failures)) == list(range(len(photos)))
    assert pixels.shape == (len(rows), 3, SIDE, SIDE)
    if rows:
        assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    for failure in failures.values():
        assert isinstance(failure, ItemRejected)
        assert failure.reason in set(Rejection)


@pytest.mark.parametrize("fit", ["pad", "center_crop", "squash"])
@pytest.mark.parametrize("shape", [(8, 2_000_000), (2_000_000, 8), (1, 50_000), (3, 3)])
def test_fitting_allocates_nothing_from_the_long_side(fit, shape):
    """The geometry alone, without the limits that refuse such strips first: resizing comes
    before padding, so the work is bounded by the decoded image and side x side."""
    height, width = shape
    image = torch.full((3, height, width), 200, dtype=torch.uint8)
    started = time.monotonic()
    out = fit_square(image, SIDE, fit)
    assert out.shape == (3, SIDE, SIDE)
    assert time.monotonic() - started < 5
    assert float(out.min()) >= 0 and float(out.max()) <= 1
