"""The GPU fast path's steps, each run here on the CPU: mixed precision, channels-last, batch JPEG
decode, mixed-device batches, and the guard against non-finite vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.device import Acceleration, autocast_dtype, stack_on
from loupe.encoders.errors import Rejection, VectorNotFinite
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile

PLAIN = Acceleration(
    amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=False
)


@pytest.fixture(scope="module")
def reference():
    model = FusedEncoder.from_profile(ModelProfile(batch_size=16, device="cpu", precision="fp32"))
    yield model
    model.close()


def test_defaults_follow_the_device():
    cpu = Acceleration.for_device(torch.device("cpu"))
    assert cpu == PLAIN
    assert cpu.describe() == "fp32"
    bf16 = Acceleration.for_device(torch.device("cpu"), "bf16")
    assert bf16.amp_dtype == torch.bfloat16 and not bf16.pinned_copies
    assert autocast_dtype(torch.device("cpu"), "fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_dtype(torch.device("cpu"), "fp8")


def test_pinned_copies_are_refused_without_cuda(reference):
    pinned = Acceleration(
        amp_dtype=None, channels_last=False, pinned_copies=True, batch_jpeg_decode=False
    )
    with pytest.raises(ValueError, match="pinned copies need a CUDA device"):
        reference.with_options(acceleration=pinned)


def test_a_batch_mixing_host_and_device_tensors_lands_on_the_device():
    # nvjpeg leaves JPEGs on the GPU while PNGs come from Pillow on the host; torch.stack alone
    # refuses that mix. The meta device stands in for the GPU.
    host = torch.zeros(3, 4, 4)
    device = torch.device("meta")
    batch = stack_on([host, host.to(device), host], device, pinned=False)
    assert batch.device.type == "meta" and batch.shape == (3, 3, 4, 4)
    assert stack_on([host, host], device, pinned=False).device.type == "meta"
    on_cpu = stack_on([host, host + 1], torch.device("cpu"), pinned=False)
    assert torch.equal(on_cpu[1], host + 1)


@pytest.mark.parametrize(
    ("name", "acceleration", "min_cosine"),
    [
        # measured on these 16 products: min 0.9986 (image), 0.9993 (fused), 0.99998 (text)
        ("bf16", Acceleration(torch.bfloat16, True, False, True), 0.99),
        # measured: min 0.99999 on every view
        ("fp16", Acceleration(torch.float16, True, False, True), 0.9995),
    ],
)
def test_the_cuda_steps_agree_with_fp32_on_real_products(reference, name, acceleration, min_cosine):
    items = [encode_input(p) for p in load_catalog()[::15]]
    expected = reference.encode_products(items)
    fast = reference.with_options(acceleration=acceleration)
    got = fast.encode_products(items)
    fast.close()
    for view in ("image", "text", "fused"):
        a = np.stack([r.vectors[view] for r in expected])
        b = np.stack([r.vectors[view] for r in got])
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
        cosines = (a * b).sum(axis=1)
        assert cosines.min() >= min_cosine, (name, view, cosines.min())


def test_a_non_finite_vector_fails_its_item_not_the_batch(reference):
    # PyTorch's tower: the fault is injected with a hook on its module.
    profile = ModelProfile(batch_size=16, image_weights="random", encoder_backend="torch")
    model = FusedEncoder.from_profile(profile)
    # Fault injection: the image tower overflows on the second item only.
    model.image_encoder.register_forward_hook(
        lambda module, args, out: out.index_fill(0, torch.tensor([1]), float("nan"))
    )
    items = [encode_input(p) for p in load_catalog()[:3]]
    results = model.encode_products(items)
    text_only = model.encode_queries([EncodeInput(text="gold ring")])[0]
    model.close()
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, VectorNotFinite)
    assert results[1].error.reason == Rejection.NOT_FINITE
    assert results[1].error.stage == "encode"
    assert "image/fused" in str(results[1].error)
    assert results[1].vectors == {}
    assert text_only.ok
