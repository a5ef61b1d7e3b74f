"""The image tower on ONNX Runtime: the same vectors as PyTorch on the catalog's photos, a graph
exported once and cached, and PyTorch whenever the graph cannot be trusted."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders import onnx_tower
from loupe.encoders.device import Acceleration, use_onnxruntime
from loupe.encoders.errors import DeviceUnavailable
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.image_towers import ImageEncoder
from loupe.encoders.onnx_tower import MIN_PROBE_COSINE, OnnxImageTower, OnnxUnavailable, graph_name

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoders():
    """The default profile on this CPU (ONNX Runtime), and the same towers in PyTorch."""
    served = FusedEncoder.from_profile(ModelProfile(batch_size=16))
    reference = served.with_options(backend="torch")
    yield served, reference
    reference.close()
    served.close()


def test_the_cpu_default_is_onnx_runtime_with_the_same_model_version(encoders):
    served, reference = encoders
    assert (served.backend, reference.backend) == ("onnxruntime", "torch")
    assert served.model_version == reference.model_version


def test_every_view_agrees_with_pytorch_on_the_catalogs_photos_and_texts(encoders):
    """The issue's bar: cosine >= 0.9999 per view, products and queries (photo, text, both)."""
    served, reference = encoders
    catalog = load_catalog()[::12]  # 20 products, every category
    products = [encode_input(p) for p in catalog]
    queries = [
        *(EncodeInput(image=p.image, media_type=p.media_type) for p in products[:6]),
        *(EncodeInput(text=p.text) for p in products[:6]),
        *(EncodeInput(image=p.image, media_type=p.media_type, text="gold ring") for p in products),
    ]
    for encode in ("encode_products", "encode_queries"):
        items = products if encode == "encode_products" else queries
        ours = getattr(served, encode)(items)
        theirs = getattr(reference, encode)(items)
        for a, b in zip(ours, theirs, strict=True):
            assert a.ok and b.ok and set(a.vectors) == set(b.vectors)
            for view in a.vectors:
                cosine = float(np.dot(a.vectors[view], b.vectors[view]))
                assert cosine >= MIN_PROBE_COSINE, (encode, view, cosine)


@pytest.fixture
def small_tower():
    return ImageEncoder("efficientnet-lite0", "random", input_side=96)


def test_the_graph_is_exported_once_and_read_from_the_cache_after(
    small_tower, tmp_path, monkeypatch
):
    first = OnnxImageTower.load(small_tower, tmp_path)
    assert first.path == tmp_path / graph_name(small_tower) and first.path.is_file()

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_tower, "_export", no_export)
    again = OnnxImageTower.load(small_tower, tmp_path)
    pixels = torch.rand(3, 3, 96, 96)
    np.testing.assert_allclose(again(pixels).numpy(), first(pixels).numpy(), atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_another_towers_weights_get_another_graph(small_tower):
    tuned = ImageEncoder("efficientnet-lite0", "random", input_side=96)
    tuned.load_tuned({"_conv_head.weight": tuned.backbone._conv_head.weight * 0.5})
    assert graph_name(tuned) != graph_name(small_tower)
    assert graph_name(ImageEncoder("efficientnet-lite0", "random", input_side=128)) != graph_name(
        small_tower
    )


def test_a_broken_graph_file_is_refused_with_its_path(small_tower, tmp_path):
    (tmp_path / graph_name(small_tower)).write_bytes(b"not a graph")
    with pytest.raises(OnnxUnavailable, match=graph_name(small_tower)):
        OnnxImageTower.load(small_tower, tmp_path)


def test_a_graph_that_disagrees_with_the_tower_is_refused(small_tower, tmp_path):
    """Another tower's graph under this tower's name (a stale or tampered cache)."""
    other = ImageEncoder("efficientnet-lite0", input_side=96)  # the pretrained weights
    exported = OnnxImageTower.load(other, tmp_path).path
    exported.rename(tmp_path / graph_name(small_tower))
    with pytest.raises(OnnxUnavailable, match="disagrees with the tower"):
        OnnxImageTower.load(small_tower, tmp_path)


def test_an_encoder_whose_graph_fails_runs_in_pytorch_with_one_warning(monkeypatch, caplog):
    def unavailable(tower, *args, **kwargs):
        raise OnnxUnavailable("onnxruntime is not installed (pip install onnxruntime)")

    monkeypatch.setattr(OnnxImageTower, "load", classmethod(lambda cls, *a, **k: unavailable(*a)))
    profile = ModelProfile(image_weights="random", text_weights="random", image_side=96)
    with caplog.at_level(logging.WARNING, logger="loupe.encoders.fused"):
        encoder = FusedEncoder.from_profile(profile)
    try:
        assert encoder.backend == "torch"
        # Loupe's own warnings: a Kafka client another test left behind may log meanwhile.
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("loupe")
        ]
        assert warnings == [
            "the image tower runs in PyTorch: onnxruntime is not installed (pip install "
            "onnxruntime)"
        ]
        photo = encode_input(load_catalog()[0])
        assert encoder.encode_products([photo])[0].ok
    finally:
        encoder.close()


def test_a_tower_whose_weights_change_after_export_falls_back_to_pytorch(small_tower, tmp_path):
    """``load_tuned`` after the graph was made: the graph no longer computes this tower."""
    graph = OnnxImageTower.load(small_tower, tmp_path)
    assert graph.serves(small_tower)
    small_tower.load_tuned({"_conv_head.weight": small_tower.backbone._conv_head.weight * 0.5})
    assert not graph.serves(small_tower)


@pytest.mark.parametrize(
    ("backend", "device", "precision", "expected"),
    [
        ("auto", "cpu", "auto", True),
        ("auto", "cpu", "bf16", False),
        ("torch", "cpu", "auto", False),
        ("onnxruntime", "cpu", "fp32", True),
    ],
)
def test_which_backend_runs_the_image_tower(backend, device, precision, expected):
    plan = Acceleration.for_device(torch.device(device), precision)
    assert use_onnxruntime(backend, torch.device(device), plan) is expected


def test_onnx_runtime_where_it_cannot_compute_the_same_vectors_is_an_error():
    plan = Acceleration.for_device(CPU, "bf16")
    with pytest.raises(DeviceUnavailable, match="LOUPE_ENCODER_BACKEND"):
        use_onnxruntime("onnxruntime", CPU, plan)
    with pytest.raises(ValueError, match="unknown encoder backend"):
        use_onnxruntime("tensorrt", CPU, plan)
