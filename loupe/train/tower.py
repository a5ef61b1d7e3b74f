"""Tuning the image tower's last block on the catalog's simulated shopper photos.

The heads read the tower's pooled vectors, and no head brings back what the pooling lost: the
detail of a product that a shopper's crop cut in half. So ``loupe train --tower-steps N`` first
moves the tower's tail (``encoders.tower_tail``: its last block and head convolution) on the
photos' cached trunk maps (``CatalogFeatures.maps``), then trains the heads on the tuned
tower's vectors. The objective is the heads' image view's (``objective.py``): InfoNCE from a
simulated shopper photo to its catalog photo, plus the neighbourhood KL against the frozen
tower, shopper photo to catalog and catalog to catalog, so that the tower keeps what it knew
of which products look alike. Held-out products never take part, as in ``trainer.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from loupe.encoders.image_towers import ImageEncoder
from loupe.encoders.tower_tail import TowerTail
from loupe.train.config import TrainConfig
from loupe.train.evaluate import retrieval_scores
from loupe.train.features import CatalogFeatures, TowerMaps
from loupe.train.objective import info_nce, neighbourhood_kl
from loupe.train.trainer import held_out_mask

log = logging.getLogger(__name__)

EVAL_CHUNK = 128  # maps run through the tail together when evaluating


def tune_tower(
    image: ImageEncoder,
    features: CatalogFeatures,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> TowerTail:
    """A tuned copy of ``image``'s tail, trained ``config.tower_steps`` steps on ``features``'
    maps (``extract_features(..., tower_maps=True)``). ``on_progress`` gets, every
    ``config.eval_every`` steps, the step, the mean loss and the held-out products' photo R@1
    on their progress photo (the seen ones' when none is held out)."""
    if features.maps is None:
        raise ValueError(
            "tuning the tower needs the photos' maps: extract_features(tower_maps=True)"
        )
    device = device or torch.device("cpu")
    started = time.perf_counter()
    maps = features.maps
    held = held_out_mask(features.keys, config.holdout, config.seed)
    rows = torch.from_numpy(np.flatnonzero(~held))
    if len(rows) < 2:
        raise ValueError(
            f"tuning the tower needs 2 products outside the held-out share, got {len(rows)}"
        )
    frozen = TowerTail(image).to(device).eval()
    tail = copy.deepcopy(frozen).train()
    frozen_catalog = torch.from_numpy(features.catalog_image.astype(np.float32)).to(device)
    optimiser = torch.optim.AdamW(
        tail.parameters(), lr=config.tower_learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    per, views = config.tower_photos_per_product, maps.views.shape[1]
    batch = min(config.tower_batch_size, len(rows))
    t, tn = config.temperature, config.neighbourhood_temperature
    running = 0.0
    for step in range(1, config.tower_steps + 1):
        drawn = rows[torch.randperm(len(rows), generator=generator)[:batch]]
        pick = torch.randint(0, views, (len(drawn), per), generator=generator)
        photos = maps.views[drawn[:, None], pick].flatten(0, 1).to(device)  # (B * per, C, h, w)
        own = torch.arange(len(drawn), device=device).repeat_interleave(per)
        catalog, asked = tail(maps.catalog[drawn].to(device)), tail(photos)
        loss = info_nce(asked, catalog, t, own)
        if config.neighbourhood_weight:
            with torch.no_grad():
                was_asked, was = frozen(photos), frozen_catalog[drawn.to(device)]
            keep = neighbourhood_kl(was_asked @ was.T, asked @ catalog.T, tn, own=own)
            keep = keep + neighbourhood_kl(was @ was.T, catalog @ catalog.T, tn)
            loss = loss + config.neighbourhood_weight * keep
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running += float(loss.detach())
        if on_progress is not None and (
            step % config.eval_every == 0 or step == config.tower_steps
        ):
            done = step % config.eval_every or config.eval_every
            record = {
                "step": step,
                "loss": round(running / done, 4),
                "seconds": round(time.perf_counter() - started, 1),
                "photo_r1": _progress_recall(
                    tail, maps, held if held.any() else ~held, device, config.eval_queries
                ),
            }
            running = 0.0
            tail.train()
            on_progress(record)
    return tail.eval()


def tower_progress_line(record: dict) -> str:
    return (
        f"    tower step {record['step']:>5}  loss {record['loss']:.4f}  held-out: photo R@1 "
        f"{record['photo_r1']:.3f}  ({record['seconds']:.0f} s)"
    )


def through_tail(
    features: CatalogFeatures, tail: TowerTail, device: torch.device | None = None
) -> CatalogFeatures:
    """``features`` with the image vectors of the tuned ``tail``: what the heads train on."""
    maps = features.maps
    if maps is None:
        raise ValueError("the features have no maps: extract_features(tower_maps=True)")
    device = device or torch.device("cpu")
    views = _vectors(tail, maps.views.flatten(0, 1), device)
    return dataclasses.replace(
        features,
        catalog_image=_vectors(tail, maps.catalog, device),
        view_image=views.reshape(*maps.views.shape[:2], -1),
        eval_image=_vectors(tail, maps.eval, device),
    )


def _vectors(tail: TowerTail, maps: torch.Tensor, device: torch.device) -> np.ndarray:
    tail.eval()
    with torch.inference_mode():
        parts = [
            tail(maps[s : s + EVAL_CHUNK].to(device)).cpu() for s in range(0, len(maps), EVAL_CHUNK)
        ]
    return torch.cat(parts).numpy().astype(np.float16)


def _progress_recall(
    tail: TowerTail, maps: TowerMaps, mask: np.ndarray, device: torch.device, most: int
) -> float:
    """Photo R@1 of (at most ``most`` of) the ``mask``ed products' progress photos against the
    whole catalog, ranked as ``loupe.train.evaluate`` ranks every query."""
    rows = np.flatnonzero(mask)[:most]
    catalog = _vectors(tail, maps.catalog, device).astype(np.float32)
    asked = _vectors(tail, maps.eval[torch.from_numpy(rows)], device).astype(np.float32)
    return retrieval_scores(asked, catalog, recall=True, categories=None, rows=rows).recall_at_1
