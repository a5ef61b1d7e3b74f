"""The batch JPEG decode path that CUDA uses (nvjpeg), run here with torchvision on the CPU:
same gating, fallbacks and geometry as on a GPU, checked against the Pillow path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from consumers.jewelry import load_catalog
from encoders.fused import EncodeInput, FusedEncoder, ModelProfile, _is_plain_jpeg
from encoders.images import DecodeLimits
from schemas.errors import ErrorCode


@pytest.fixture(scope="module")
def encoders():
    pillow = FusedEncoder.from_profile(ModelProfile(batch_size=16))
    batched = FusedEncoder(
        pillow.image_encoder,
        pillow.text_encoder,
        pillow.fusion,
        device=pillow.device,
        batch_size=16,
        batch_jpeg_decode=True,
    )
    yield pillow, batched
    pillow.close()
    batched.close()


def _jpeg(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **params)
    return out.getvalue()


def test_only_plain_jpegs_within_limits_take_the_batch_path():
    limits = DecodeLimits()
    assert _is_plain_jpeg(_jpeg(Image.new("RGB", (64, 64))), limits)
    assert _is_plain_jpeg(_jpeg(Image.new("L", (64, 64))), limits)
    assert not _is_plain_jpeg(_jpeg(Image.new("CMYK", (64, 64))), limits)
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    assert not _is_plain_jpeg(png.getvalue(), limits)
    assert not _is_plain_jpeg(_jpeg(Image.new("RGB", (64, 64))), DecodeLimits(max_image_pixels=100))
    assert not _is_plain_jpeg(b"\xff\xd8 not really", limits)


def test_batch_path_agrees_with_the_pillow_path_on_real_photos(encoders):
    pillow, batched = encoders
    photos = [EncodeInput(image=p.image_path.read_bytes()) for p in load_catalog()[::24]]
    a = np.stack([r.vectors["image"] for r in pillow.encode_queries(photos)])
    b = np.stack([r.vectors["image"] for r in batched.encode_queries(photos)])
    cosines = (a * b).sum(axis=1)
    # Different JPEG decoders (and, for large photos, Pillow's draft decode): close, not equal.
    assert cosines.min() > 0.995, cosines  # measured: min 0.9996 over all 236 photos


def test_mixed_batch_falls_back_per_item(encoders):
    _, batched = encoders
    photo = load_catalog()[0].image_path.read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(Image.new("RGB", (120, 40), (200, 0, 0)), exif=exif.tobytes())
    items = [
        EncodeInput(image=photo),
        EncodeInput(image=png.getvalue()),  # PNG: the Pillow path
        EncodeInput(image=photo[: len(photo) // 3]),  # truncated: refused, then rejected
        EncodeInput(image=rotated),
        EncodeInput(image=_jpeg(Image.new("CMYK", (64, 64)))),  # CMYK: the Pillow path
    ]
    results = batched.encode_queries(items)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].error.code == ErrorCode.IMAGE_INVALID
    np.testing.assert_allclose(
        results[0].vectors["image"] @ results[1].vectors["image"], 1.0, atol=0.02
    )
