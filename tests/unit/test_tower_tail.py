"""Tuning the image tower's last block: the split is the whole tower, the tuned weights travel
in the checkpoint and come back into the served tower under another model version, tuning moves
only the trained-on products' photos, and the maps are extracted and cached beside the vectors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from loupe.encoders.errors import WeightsNotFound
from loupe.encoders.fused import FusedEncoder
from loupe.encoders.fusion import (
    FusionConfig,
    FusionModel,
    checkpoint_digest,
    fusion_digest,
    load_fusion,
    save_fusion,
)
from loupe.encoders.image_towers import ImageEncoder, tuned_weights_id
from loupe.encoders.profile import ModelProfile
from loupe.encoders.tower_tail import TowerTail, TowerTuningUnsupported, trunk
from loupe.train.config import TrainConfig
from loupe.train.features import CatalogFeatures, TowerMaps, extract_features
from loupe.train.source import TrainingProduct
from loupe.train.tower import through_tail, tune_tower
from loupe.train.trainer import held_out_mask

SIDE = 96  # the smallest side the tower reads: 3 x 3 maps, fast


@pytest.fixture(scope="module")
def tower() -> ImageEncoder:
    return ImageEncoder("efficientnet-lite0", input_side=SIDE)


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _tuned(tower: ImageEncoder) -> TowerTail:
    tail = TowerTail(tower)
    with torch.no_grad():
        tail.conv_head.weight.mul_(1.5)
        tail.block._project_conv.weight.add_(0.01)
    return tail


def test_the_tail_over_the_trunk_is_the_whole_tower(tower):
    pixels = _pixels()
    with torch.inference_mode():
        whole = tower.encode(pixels)
        split = TowerTail(tower)(trunk(tower, pixels))
    assert trunk(tower, pixels).shape == (3, 192, SIDE // 32, SIDE // 32)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_a_tower_without_a_tunable_tail_is_refused_by_name():
    with pytest.raises(TowerTuningUnsupported, match=r"resnet50.*--tower-steps 0"):
        TowerTail(ImageEncoder("resnet50", "random"))


def test_tuned_weights_travel_in_the_checkpoint_into_the_served_tower(tower, tmp_path):
    tail = _tuned(tower)
    tensors = tail.tower_tensors()
    assert "_conv_head.weight" in tensors and "_blocks.15._project_conv.weight" in tensors
    heads = FusionModel(FusionConfig(image_dim=1280, text_dim=384))
    path = tmp_path / "tuned.safetensors"
    digest = save_fusion(heads, path, base="b", image_tower=tensors)
    assert digest == checkpoint_digest(heads, tensors) != fusion_digest(heads)
    assert checkpoint_digest(heads) == fusion_digest(heads), "heads alone: the digest of before"

    loaded = load_fusion(path)
    assert loaded.image_tower.keys() == tensors.keys()
    served = ImageEncoder("efficientnet-lite0", input_side=SIDE)
    before = served.weights_id
    served.load_tuned(loaded.image_tower)
    assert served.weights_id == tuned_weights_id(before, tensors) != before
    pixels = _pixels(seed=1)
    with torch.inference_mode():
        expected = tail.eval()(trunk(tower, pixels))
        torch.testing.assert_close(served.encode(pixels), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tower.encode(pixels), expected, atol=1e-3), "tuned: not frozen"


def test_tuned_weights_that_do_not_fit_are_refused_before_anything_changes(tower):
    served = ImageEncoder("efficientnet-lite0", input_side=SIDE)
    before = served.weights_id
    state = {k: v.clone() for k, v in served.backbone.state_dict().items()}
    good = _tuned(tower).tower_tensors()
    with pytest.raises(WeightsNotFound, match=r"unknown.*_blocks\.99"):
        served.load_tuned({**good, "_blocks.99.weight": torch.zeros(1)})
    with pytest.raises(WeightsNotFound, match=r"wrong shape.*_conv_head\.weight"):
        served.load_tuned({**good, "_conv_head.weight": torch.zeros(2, 2)})
    assert served.weights_id == before
    for name, value in served.backbone.state_dict().items():
        torch.testing.assert_close(value, state[name])


def test_a_heads_only_checkpoint_of_format_2_still_loads(tmp_path):
    heads = FusionModel(FusionConfig(image_dim=1280, text_dim=384))
    path = tmp_path / "old.safetensors"
    save_fusion(heads, path, base="b")
    with safe_open(str(path), framework="pt") as handle:  # what Loupe wrote before format 3
        metadata = {**handle.metadata(), "loupe.fusion.format": "2"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)
    loaded = load_fusion(path)
    assert loaded.image_tower == {} and fusion_digest(loaded.model) == fusion_digest(heads)


def _synthetic_features(tower: ImageEncoder, products: int = 12, views: int = 3) -> CatalogFeatures:
    """Maps of random photos: each product's views are its catalog photo's maps plus noise."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        catalog = trunk(tower, _pixels(products, seed=2))
    noise = 0.5 * torch.randn(products, views + 1, *catalog.shape[1:], generator=generator)
    shots = catalog[:, None] + noise
    maps = TowerMaps(catalog.half(), shots[:, :views].half(), shots[:, views].half())
    frozen = TowerTail(tower).eval()
    with torch.inference_mode():
        pooled = {
            "catalog_image": frozen(maps.catalog).numpy(),
            "view_image": frozen(maps.views.flatten(0, 1)).numpy().reshape(products, views, -1),
            "eval_image": frozen(maps.eval).numpy(),
        }
    texts = np.zeros((products, 4), dtype=np.float16)
    return CatalogFeatures(
        keys=[f"m/p{i}" for i in range(products)],
        categories=None,
        catalog_text=texts,
        view_text=np.zeros((products, views, 4), dtype=np.float16),
        eval_text=texts,
        maps=maps,
        **{k: v.astype(np.float16) for k, v in pooled.items()},
    )


def test_tuning_moves_the_tail_on_trained_on_products_only(tower):
    features = _synthetic_features(tower)
    config = TrainConfig(
        views=3, tower_steps=30, tower_batch_size=8, eval_every=10, holdout=0.25, seed=3
    )
    held = held_out_mask(features.keys, config.holdout, config.seed)
    assert 0 < held.sum() < len(held)
    poisoned = features.maps.catalog.clone()
    poisoned[torch.from_numpy(held)] = float("nan")  # a held-out product in a batch: NaN loss
    features.maps = TowerMaps(poisoned, features.maps.views, features.maps.eval)
    records = []
    tail = tune_tower(tower, features, config, on_progress=records.append)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert all(np.isfinite(r["loss"]) for r in records), "held-out products never trained on"
    assert records[-1]["loss"] < records[0]["loss"]
    assert 0.0 <= records[-1]["photo_r1"] <= 1.0
    moved = tail.tower_tensors()
    frozen = TowerTail(tower).tower_tensors()
    assert not torch.equal(moved["_conv_head.weight"], frozen["_conv_head.weight"])
    torch.testing.assert_close(moved["_bn1.running_mean"], frozen["_bn1.running_mean"])

    tuned = through_tail(features, tail)
    seen = ~held
    assert tuned.view_image.shape == features.view_image.shape
    assert not np.allclose(tuned.view_image[seen], features.view_image[seen], atol=1e-3)
    np.testing.assert_array_equal(tuned.catalog_text, features.catalog_text)


def test_tuning_needs_the_maps(tower):
    features = _synthetic_features(tower)
    features.maps = None
    with pytest.raises(ValueError, match="tower_maps=True"):
        tune_tower(tower, features, TrainConfig(views=3, tower_steps=1))


def _photo(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (120, 90), colour).save(out, "JPEG")
    return out.getvalue()


def test_maps_are_extracted_beside_the_vectors_and_cached(tmp_path):
    encoder = FusedEncoder.from_profile(ModelProfile(image_side=SIDE, batch_size=8))
    try:
        products = [
            TrainingProduct(
                key=f"m/p{i}",
                title=f"Ring {i}",
                attributes={"category": "ring"},
                description="",
                image=_photo((40 * i, 90, 30)),
            )
            for i in range(3)
        ]
        plain = extract_features(encoder, products, views=2, seed=0, cache_dir=None)
        with_maps = extract_features(
            encoder, products, views=2, seed=0, cache_dir=tmp_path, tower_maps=True
        )
        assert plain.maps is None
        assert with_maps.maps.catalog.shape == (3, 192, 3, 3)
        assert with_maps.maps.views.shape == (3, 2, 192, 3, 3)
        assert with_maps.maps.eval.shape == (3, 192, 3, 3)
        for name in ("catalog_image", "view_image", "eval_image"):
            np.testing.assert_allclose(
                getattr(with_maps, name).astype(np.float32),
                getattr(plain, name).astype(np.float32),
                atol=2e-3,
            )
        cached = extract_features(
            encoder, products, views=2, seed=0, cache_dir=tmp_path, tower_maps=True
        )
        torch.testing.assert_close(cached.maps.views, with_maps.maps.views)
        cached_under = [p.name for p in (tmp_path / "image").iterdir()]
        assert cached_under == [f"{encoder.image_base}-maps"], "apart from the vectors alone"
    finally:
        encoder.close()
