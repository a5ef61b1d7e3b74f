"""The batch JPEG decode path that CUDA uses (nvjpeg), run here with torchvision on the CPU:
same gating, orientation, fallbacks and geometry as on a GPU, checked against the Pillow path."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from loupe.dev.catalog import load_catalog
from loupe.encoders.device import Acceleration
from loupe.encoders.errors import Rejection
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.images import DecodeLimits, orient, pil_to_uint8_tensor, plain_jpeg_header

BATCH_DECODE_ONLY = Acceleration(
    amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=True
)


@pytest.fixture(scope="module")
def encoders():
    pillow = FusedEncoder.from_profile(ModelProfile(batch_size=16))
    batched = pillow.with_options(acceleration=BATCH_DECODE_ONLY)
    yield pillow, batched
    pillow.close()
    batched.close()


def _jpeg(image: Image.Image, orientation: int | None = None, **params) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, "JPEG", **params)
    return out.getvalue()


def _orientation(data: bytes | None, limits: DecodeLimits) -> int | None:
    header = plain_jpeg_header(data, limits)
    return None if header is None else header.orientation


def test_only_plain_jpegs_within_limits_take_the_batch_path():
    limits = DecodeLimits()
    assert _orientation(_jpeg(Image.new("RGB", (64, 64))), limits) == 1
    assert _orientation(_jpeg(Image.new("L", (64, 64))), limits) == 1
    assert _orientation(_jpeg(Image.new("RGB", (64, 32)), orientation=6), limits) == 6
    assert _orientation(_jpeg(Image.new("RGB", (64, 32)), orientation=42), limits) == 1
    assert _orientation(_jpeg(Image.new("CMYK", (64, 64))), limits) is None
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    assert _orientation(png.getvalue(), limits) is None
    small = DecodeLimits(max_image_pixels=100)
    assert _orientation(_jpeg(Image.new("RGB", (64, 64))), small) is None
    assert _orientation(b"\xff\xd8 not really", limits) is None
    assert _orientation(None, limits) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = io.BytesIO()  # lossless, so the comparison can be exact
    Image.fromarray(pixels).save(png, "PNG", exif=exif.tobytes())
    expected = pil_to_uint8_tensor(ImageOps.exif_transpose(Image.open(png)).convert("RGB"))
    got = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
    assert torch.equal(got, expected)


def test_batch_path_agrees_with_the_pillow_path_on_real_photos(encoders):
    pillow, batched = encoders
    photos = [EncodeInput(image=p.image_path.read_bytes()) for p in load_catalog()[::24]]
    a = np.stack([r.vectors["image"] for r in pillow.encode_queries(photos)])
    b = np.stack([r.vectors["image"] for r in batched.encode_queries(photos)])
    cosines = (a * b).sum(axis=1)
    # Different JPEG decoders (and, for large photos, Pillow's draft decode): close, not equal.
    assert cosines.min() > 0.995, cosines  # measured: min 0.9996 over all 236 photos


def test_batch_path_applies_exif_orientation_like_the_pillow_path(encoders):
    # torchvision ignores apply_exif_orientation on CUDA, so the batch path orients the tensors
    # itself. A phone photo taken upright carries orientation 6; ignoring it costs real recall.
    pillow, batched = encoders
    photo = Image.open(load_catalog()[3].image_path)
    items = [EncodeInput(image=_jpeg(photo, orientation=o, quality=95)) for o in range(1, 9)]
    a = np.stack([r.vectors["image"] for r in pillow.encode_queries(items)])
    b = np.stack([r.vectors["image"] for r in batched.encode_queries(items)])
    assert (a * b).sum(axis=1).min() > 0.995
    # The check can fail: each orientation's upright image differs from the stored one
    # (measured cosine to orientation 1: 0.94 to 0.986).
    assert (a[1:] @ a[0]).max() < 0.99


def test_batch_decode_calls_stay_within_the_pixel_budget(encoders, monkeypatch):
    pillow, _ = encoders
    photos = [p.image_path.read_bytes() for p in load_catalog()[:6]]

    def pixels(data: bytes) -> int:
        width, height = Image.open(io.BytesIO(data)).size
        return width * height

    budget = max(pixels(p) for p in photos)  # at least one photo fits, not all of them
    calls = []
    chunked = pillow.with_options(acceleration=BATCH_DECODE_ONLY, device_decode_pixels=budget)
    real_decode = chunked.preprocessor.decoder.decode

    def spy(data):
        calls.append(sum(pixels(d) for d in data))
        return real_decode(data)

    monkeypatch.setattr(chunked.preprocessor.decoder, "decode", spy)
    items = [EncodeInput(image=p) for p in photos]
    got = np.stack([r.vectors["image"] for r in chunked.encode_queries(items)])
    chunked.close()
    expected = np.stack([r.vectors["image"] for r in pillow.encode_queries(items)])
    assert len(calls) > 1 and max(calls) <= budget
    assert (got * expected).sum(axis=1).min() > 0.995


def test_mixed_batch_falls_back_per_item(encoders):
    _, batched = encoders
    photo = load_catalog()[0].image_path.read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, "PNG")
    rotated = _jpeg(Image.new("RGB", (120, 40), (200, 0, 0)), orientation=6)
    items = [
        EncodeInput(image=photo),
        EncodeInput(image=png.getvalue()),  # PNG: the Pillow path
        EncodeInput(image=photo[: len(photo) // 3]),  # truncated: refused, then rejected
        EncodeInput(image=rotated),
        EncodeInput(image=_jpeg(Image.new("CMYK", (64, 64)))),  # CMYK: the Pillow path
    ]
    results = batched.encode_queries(items)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].error.reason == Rejection.IMAGE_INVALID
    np.testing.assert_allclose(
        results[0].vectors["image"] @ results[1].vectors["image"], 1.0, atol=0.02
    )


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_a_share_decoded_on_the_host_gives_the_same_vectors(encoders, share):
    """``host_decode_share``: some photos decode in the CPU threads while the device decodes
    the others; all are fitted together, and each photo's vector is what the Pillow path gives."""
    pillow, _ = encoders
    mixed = pillow.with_options(
        acceleration=dataclasses.replace(BATCH_DECODE_ONLY, host_decode_share=share)
    )
    photos = [EncodeInput(image=p.image_path.read_bytes()) for p in load_catalog()[:7]]
    photos.append(EncodeInput(image=b"\xff\xd8 truncated"))
    got = mixed.encode_queries(photos)
    mixed.close()
    expected = pillow.encode_queries(photos)
    assert [r.ok for r in got] == [True] * 7 + [False]
    assert got[-1].error.reason == Rejection.IMAGE_INVALID
    a = np.stack([r.vectors["image"] for r in got[:7]])
    b = np.stack([r.vectors["image"] for r in expected[:7]])
    assert (a * b).sum(axis=1).min() > 0.999


def test_a_device_decoder_failure_sends_only_that_photo_to_pillow(encoders, monkeypatch):
    _, batched = encoders
    photos = [EncodeInput(image=p.image_path.read_bytes()) for p in load_catalog()[:4]]
    real_decode = batched.preprocessor.decoder.decode
    monkeypatch.setattr(
        batched.preprocessor.decoder,
        "decode",
        lambda data: [None if i == 1 else t for i, t in enumerate(real_decode(data))],
    )
    fallback = []
    real_one = batched.preprocessor.one
    monkeypatch.setattr(
        batched.preprocessor, "one", lambda photo: fallback.append(1) or real_one(photo)
    )
    results = batched.encode_queries(photos)
    assert all(r.ok for r in results) and len(fallback) == 1
