"""The image view's whitening: fitted in closed form on the simulated photos, it shrinks the
directions in which a photo differs from its catalog photo, travels in the checkpoint, and
leaves the untrained model's version as it was."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loupe.encoders.fusion import (
    FusionConfig,
    FusionModel,
    config_record,
    fusion_digest,
    load_fusion,
    save_fusion,
    with_image_whitening,
)
from loupe.train.config import TrainConfig
from loupe.train.trainer import held_out_mask, train
from loupe.train.whitening import fit_whitening
from tests.unit.test_training import SMALL, synthetic_catalog

BASE = "image-abc.text-def.pad288-t128"


def test_the_directions_photos_vary_in_are_shrunk_and_the_others_kept():
    rng = np.random.default_rng(0)
    n, k, dim = 50, 8, 16
    catalog = rng.normal(size=(n, dim))
    shake = np.zeros(dim)
    shake[3] = 1.0  # every photo differs from its catalog photo mostly along feature 3
    views = (
        catalog[:, None]
        + rng.normal(size=(n, k, 1)) * 5.0 * shake
        + 0.1 * rng.normal(size=(n, k, dim))
    )
    rows = np.arange(40)
    mean, matrix = fit_whitening(catalog, views, rows, shrinkage=0.1)
    assert torch.allclose(mean, torch.from_numpy(catalog[rows].mean(0)).float(), atol=1e-5)
    assert torch.allclose(matrix, matrix.T, atol=1e-5)
    kept = (torch.eye(dim)[0] @ matrix).norm()
    shrunk = (torch.eye(dim)[3] @ matrix).norm()
    assert shrunk < 0.1 * kept
    # More shrinkage: closer to the identity, the shaken direction less shrunk.
    _, gentle = fit_whitening(catalog, views, rows, shrinkage=10.0)
    assert (torch.eye(dim)[3] @ gentle).norm() / (torch.eye(dim)[0] @ gentle).norm() > 0.5


def test_whitening_lifts_products_it_never_saw_when_photos_share_their_nuisance():
    features = synthetic_catalog(n=120)
    held = held_out_mask(features.keys, 0.25, 0)
    mean, matrix = fit_whitening(
        features.catalog_image, features.view_image, np.flatnonzero(~held), shrinkage=0.1
    )
    model = FusionModel(SMALL)
    whitened = with_image_whitening(model, mean, matrix)

    def held_out_r1(m: FusionModel) -> float:
        index = m.image(torch.from_numpy(features.catalog_image.astype(np.float32)))
        asked = m.image(torch.from_numpy(features.eval_image.astype(np.float32)))
        best = (asked @ index.T).argmax(1).numpy()
        return float(np.mean(best[held] == np.flatnonzero(held)))

    assert held_out_r1(whitened) > held_out_r1(model) + 0.15


def test_fitting_is_checked():
    catalog, views = np.zeros((4, 8)), np.zeros((4, 2, 8))
    with pytest.raises(ValueError, match="shrinkage must be positive"):
        fit_whitening(catalog, views, np.arange(4), shrinkage=0.0)
    with pytest.raises(ValueError, match="at least 2 products"):
        fit_whitening(catalog, views, np.arange(1), shrinkage=1.0)


def test_an_identity_whitening_changes_nothing_but_the_version():
    model = FusionModel(SMALL)
    image = torch.randn(5, SMALL.image_dim)
    text = torch.randn(5, SMALL.text_dim)
    plain = with_image_whitening(model, torch.zeros(SMALL.image_dim), torch.eye(SMALL.image_dim))
    assert torch.allclose(plain.image(image), model.image(image), atol=1e-6)
    assert torch.allclose(plain(image, text), model(image, text), atol=1e-6)
    assert fusion_digest(plain) != fusion_digest(model)


def test_a_whitened_checkpoint_round_trips_and_the_untrained_version_stays_put(tmp_path):
    # Models without whitening record their config as before it existed: the untrained model
    # and earlier checkpoints keep their versions, so their collections.
    assert "image_whitening" not in config_record(FusionConfig())
    assert json.loads(json.dumps(config_record(FusionConfig()))) == {
        k: v for k, v in dataclasses.asdict(FusionConfig()).items() if k != "image_whitening"
    }
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(SMALL.image_dim, SMALL.image_dim, generator=gen)
    whitened = with_image_whitening(FusionModel(SMALL), torch.randn(SMALL.image_dim), matrix)
    path = tmp_path / "whitened.safetensors"
    digest = save_fusion(whitened, path, base=BASE)
    loaded = load_fusion(path)
    assert loaded.model.config.image_whitening
    assert fusion_digest(loaded.model) == digest
    image, text = torch.randn(4, SMALL.image_dim), torch.randn(4, SMALL.text_dim)
    assert torch.equal(loaded.model.image(image), whitened.image(image))
    assert torch.equal(loaded.model(image, text), whitened(image, text))
    assert not torch.allclose(loaded.model.image(image), F.normalize(image, dim=-1), atol=1e-3)


def test_training_fits_the_whitening_unless_its_shrinkage_is_zero():
    features = synthetic_catalog(n=40)
    config = TrainConfig(steps=5, batch_size=16, eval_every=5, holdout=0.25)
    assert train(features, FusionModel(SMALL), config).model.config.image_whitening
    plain = train(features, FusionModel(SMALL), dataclasses.replace(config, whitening_shrinkage=0))
    assert not plain.model.config.image_whitening
    with pytest.raises(ValueError, match="whitening_shrinkage"):
        TrainConfig(whitening_shrinkage=-1.0)
