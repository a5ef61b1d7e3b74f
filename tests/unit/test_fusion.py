"""The fusion model: identity at initialisation (heads and attention), the textbook attention
formula, checkpoints that carry their base and refuse another."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from loupe.encoders.errors import WeightsNotFound
from loupe.encoders.fusion import (
    AttentionFusion,
    CheckpointMismatch,
    FusionConfig,
    FusionModel,
    fusion_digest,
    load_fusion,
    save_fusion,
)

CONFIG = FusionConfig(image_dim=256, text_dim=128, token_dim=64, n_heads=2, image_weight=0.7)


def _inputs(batch: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 256, generator=gen), torch.randn(batch, 128, generator=gen)


def test_untrained_fusion_is_exactly_the_weighted_concatenation():
    module = AttentionFusion(CONFIG)
    torch.nn.init.normal_(module.w_q.weight)  # Q, K, V can be anything: W_O = 0 cancels them
    torch.nn.init.normal_(module.position)
    image, text = _inputs()
    expected = torch.cat(
        [math.sqrt(0.7) * F.normalize(image, dim=-1), math.sqrt(0.3) * F.normalize(text, dim=-1)],
        dim=-1,
    )
    assert torch.equal(module(image, text), F.normalize(expected, dim=-1))
    assert torch.allclose(expected.norm(dim=-1), torch.ones(5))


def test_fused_cosine_is_the_weighted_mean_of_view_cosines_at_init():
    module = AttentionFusion(CONFIG)
    image, text = _inputs(2)
    fused = module(image, text)
    cos_image = F.cosine_similarity(image[0], image[1], dim=0)
    cos_text = F.cosine_similarity(text[0], text[1], dim=0)
    assert torch.allclose(fused[0] @ fused[1], 0.7 * cos_image + 0.3 * cos_text, atol=1e-6)


def _reference_attention(module: AttentionFusion, fused: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d_k)) V, head by head, written out by hand."""
    cfg = module.config
    tokens = fused.view(fused.shape[0], cfg.n_tokens, cfg.token_dim)
    keyed = tokens + module.position
    q = keyed @ module.w_q.weight.T
    k = keyed @ module.w_k.weight.T
    v = tokens @ module.w_v.weight.T
    d_k = module.head_dim
    outputs = []
    for h in range(cfg.n_heads):
        part = slice(h * d_k, (h + 1) * d_k)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(d_k), -1)
        outputs.append(weights @ v[..., part])
    attended = torch.cat(outputs, dim=-1) @ module.w_o.weight.T
    return (tokens + attended).reshape(fused.shape)


def test_attention_matches_the_formula_on_random_weights():
    module = AttentionFusion(CONFIG)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    image, text = _inputs(7, seed=3)
    fused = module.concat(image, text)
    actual = module.attend(fused)
    assert not torch.allclose(actual, fused), "trained attention must change the vector"
    assert torch.allclose(actual, _reference_attention(module, fused), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_dim": 100}, r"token_dim \(128\) must divide image_dim \(100\)"),
        ({"n_heads": 3}, r"n_heads \(3\) must divide token_dim \(128\)"),
        ({"image_weight": 1.5}, r"image_weight must be within \[0, 1\], got 1.5"),
    ],
)
def test_bad_dimensions_say_which(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**kwargs)


def test_wrong_input_sizes_are_refused():
    module = AttentionFusion(CONFIG)
    with pytest.raises(ValueError, match=r"expected \(256, 128\)-d inputs, got \(255, 128\)"):
        module(torch.zeros(1, 255), torch.zeros(1, 128))


BASE = "image-abc.text-def.pad224-t128"


def test_untrained_heads_are_the_identity_and_fused_is_the_weighted_concatenation():
    model = FusionModel(CONFIG)
    image, text = _inputs()
    assert torch.allclose(model.image(image), F.normalize(image, dim=-1), atol=1e-6)
    assert torch.allclose(model.text(text), F.normalize(text, dim=-1), atol=1e-6)
    assert torch.allclose(model(image, text), model.attention(image, text), atol=1e-6)


def test_trained_heads_change_the_views():
    model = FusionModel(CONFIG)
    torch.nn.init.normal_(model.image_head.up.weight, std=0.1)
    image, text = _inputs()
    assert not torch.allclose(model.image(image), F.normalize(image, dim=-1), atol=1e-3)
    assert torch.allclose(model.image(image).norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.text(text), F.normalize(text, dim=-1), atol=1e-6)


def test_head_rank_is_checked():
    with pytest.raises(ValueError, match=r"head_rank must be within \[0, 128\], got 129"):
        FusionConfig(image_dim=256, text_dim=128, token_dim=64, n_heads=2, head_rank=129)


def test_untrained_model_hashes_the_same_every_time():
    assert fusion_digest(FusionModel(CONFIG)) == fusion_digest(FusionModel(CONFIG))


def test_checkpoint_round_trip_keeps_weights_base_and_training_record(tmp_path):
    module = FusionModel(CONFIG)
    untrained = fusion_digest(module)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    path = tmp_path / "fusion.safetensors"
    digest = save_fusion(module, path, base=BASE, training={"steps": 3, "after": {"r1": 0.9}})
    assert digest != untrained, "the hash must change when the weights do"
    loaded = load_fusion(path)
    assert loaded.model.config == CONFIG
    assert loaded.base == BASE
    assert loaded.training == {"steps": 3, "after": {"r1": 0.9}}
    assert fusion_digest(loaded.model) == digest
    image, text = _inputs()
    assert torch.equal(loaded.model(image, text), module(image, text))
    assert torch.equal(loaded.model.image(image), module.image(image))
    assert not path.with_name(path.name + ".partial").exists()


def test_a_checkpoint_for_another_base_is_refused_naming_both(tmp_path):
    path = tmp_path / "fusion.safetensors"
    save_fusion(FusionModel(CONFIG), path, base=BASE)
    checkpoint = load_fusion(path)
    checkpoint.require_base(BASE)  # the same base: fine
    with pytest.raises(CheckpointMismatch) as caught:
        checkpoint.require_base("image-abc.text-def.center_crop224-t128")
    message = str(caught.value)
    assert BASE in message and "center_crop224" in message and "loupe train" in message


def test_loading_something_else_says_so(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsNotFound, match="not a Loupe fusion checkpoint"):
        load_fusion(path)
    with pytest.raises(WeightsNotFound, match=r"does not exist.*loupe train"):
        load_fusion(tmp_path / "missing.safetensors")
    old = tmp_path / "format1.safetensors"  # the attention alone, as earlier Loupe wrote it
    attention = AttentionFusion(CONFIG)
    save_file(
        dict(attention.state_dict()),
        str(old),
        metadata={"loupe.fusion.config": json.dumps(asdict(CONFIG))},
    )
    with pytest.raises(WeightsNotFound, match="format 1; this Loupe reads formats 2, 3"):
        load_fusion(old)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsNotFound, match="not a readable safetensors file"):
        load_fusion(garbage)
