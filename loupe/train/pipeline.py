"""``loupe train`` end to end: products in, a versioned fusion checkpoint out.

Tower vectors (cached) -> training -> checkpoint. The checkpoint records the model base it was
trained on, its config, and the before/after metrics; its hash is part of the model version, so
serving it means a new collection, never vectors of two models in one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loupe.consumers.settings import Settings
from loupe.encoders.fused import FusedEncoder
from loupe.encoders.fusion import checkpoint_digest, save_fusion
from loupe.encoders.model import base_version, model_version
from loupe.encoders.tower_tail import tail_start
from loupe.train.config import TrainConfig
from loupe.train.features import extract_features
from loupe.train.source import CatalogSourceError, TrainingProduct
from loupe.train.tower import through_tail, tune_tower
from loupe.train.trainer import TrainResult, held_out_mask, train

log = logging.getLogger(__name__)

MIN_PRODUCTS = 10  # fewer cannot say anything about retrieval, and the split would be empty


@dataclass(frozen=True)
class TrainedCheckpoint:
    path: Path
    model_version: str  # what the service will call it (and name its collection after)
    result: TrainResult


def untrained_encoder(settings: Settings) -> FusedEncoder:
    """The configured towers and preprocessing with untrained heads: what training starts from
    and anchors to. A configured checkpoint is what the training replaces, so it is not loaded."""
    return FusedEncoder.from_profile(
        settings.model_copy(update={"fusion_checkpoint": None}).model_profile()
    )


def default_checkpoint_path(state_dir: Path, digest: str) -> Path:
    return state_dir / "models" / f"fusion-{digest}.safetensors"


def train_checkpoint(
    encoder: FusedEncoder,
    products: Sequence[TrainingProduct],
    config: TrainConfig,
    *,
    state_dir: Path,
    out: Path | None = None,
    use_cache: bool = True,
    on_evaluation: Callable[[dict], None] | None = None,
    on_tower_progress: Callable[[dict], None] | None = None,
) -> TrainedCheckpoint:
    """Train on ``products`` from the encoder's current fusion model and save the checkpoint
    (``out``, or ``<state_dir>/models/fusion-<hash>.safetensors``)."""
    if len(products) < MIN_PRODUCTS:
        raise CatalogSourceError(
            f"training needs at least {MIN_PRODUCTS} products with a usable photo, got "
            f"{len(products)}"
        )
    held = held_out_mask([p.key for p in products], config.holdout, config.seed)
    if int((~held).sum()) < 2:  # checked before minutes of feature extraction, not after
        raise CatalogSourceError(
            f"--holdout {config.holdout} keeps {int((~held).sum())} of {len(products)} products "
            "for training; lower it (the default is 0.2)"
        )
    if config.tower_steps:
        tail_start(encoder.image_encoder)  # refuses a tower without a tunable tail, up front
    features = extract_features(
        encoder,
        products,
        views=config.views,
        seed=config.seed,
        cache_dir=state_dir / "train-cache" if use_cache else None,
        tower_maps=config.tower_steps > 0,
    )
    tower: dict[str, torch.Tensor] = {}
    heads_features = features
    if config.tower_steps:
        started = time.perf_counter()
        tail = tune_tower(
            encoder.image_encoder,
            features,
            config,
            device=encoder.device,
            on_progress=on_tower_progress,
        )
        tower = tail.tower_tensors()
        heads_features = through_tail(features, tail, encoder.device)
        log.info("image tower tuned in %.0f s", time.perf_counter() - started)
    result = train(
        heads_features,
        encoder.fusion,
        config,
        device=encoder.device,
        on_evaluation=on_evaluation,
        baseline=features if tower else None,
    )
    digest = checkpoint_digest(result.model, tower)
    path = out or default_checkpoint_path(state_dir, digest)
    save_fusion(
        result.model.cpu(),
        path,
        base=encoder.base_version,
        training=result.record(config),
        image_tower=tower,
    )
    base = base_version(encoder.image_encoder, encoder.text_encoder, encoder.fit, tower)
    return TrainedCheckpoint(
        path=path, model_version=model_version(base, result.model), result=result
    )
