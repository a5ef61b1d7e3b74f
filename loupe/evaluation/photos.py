"""Query vectors for evaluation: each product asked for with a photo from an evaluation
simulator (``simulators``) and the held-back query text, through the frozen towers, cached.

Row ``i`` is product ``i`` of the catalog features (``loupe.train.features``); the trainer's
``evaluate_splits(..., queries=(photo, text, regions))`` ranks them against the catalog as the
service would (a photo by the whole and by parts around where its product is, each product at
its closest part: ``ranking.best_of``).
The seeds come from another hash than training's, so no evaluation photo is a training one
however the seeds line up.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.evaluation.simulators import SIMULATORS
from loupe.progress import progress
from loupe.train.features import tower_vectors
from loupe.train.queries import evaluation_query
from loupe.train.source import TrainingProduct

log = logging.getLogger(__name__)

QUERIES_FORMAT = "3"  # bump when a simulator or the query side changes: stale cache
CHUNK = 32  # photos simulated and encoded together


@dataclass(frozen=True)
class ShopperQueries:
    simulator: str
    seed: int
    photo: np.ndarray  # (N, Di) the simulated shopper photos' image vectors
    text: np.ndarray  # (N, Dt) the held-back query template's text vectors
    # (N, k, Di) the image vectors of the parts of each photo where its product may be, as the
    # service encodes a photo query (``encoders/regions.py``); a part missing repeats ``photo``
    regions: np.ndarray | None = None


def photo_seed(simulator: str, seed: int, key: str) -> int:
    """The seed of product ``key``'s photo from ``simulator`` in evaluation run ``seed``."""
    digest = hashlib.sha256(f"evaluation/{simulator}/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def shopper_queries(
    encoder: FusedEncoder,
    products: Sequence[TrainingProduct],
    simulator: str,
    seed: int,
    cache_dir: Path | None = None,
) -> ShopperQueries:
    """Every product's evaluation query vectors from ``simulator`` (a key of ``SIMULATORS``),
    from the cache when there (photos and texts apart: another text tower reuses the photos)."""
    if simulator not in SIMULATORS:
        raise ValueError(f"unknown simulator {simulator!r}; known: {', '.join(SIMULATORS)}")
    make = SIMULATORS[simulator]
    shares = encoder.runtime.region_shares if encoder.runtime.query_regions else ()

    def photos() -> np.ndarray:  # (N, 1 + k, Di): the whole photo's vector, its parts'
        parts = len(shares)
        vectors = []
        with progress(total=len(products), desc=f"{simulator} photos", unit="product") as bar:
            for start in range(0, len(products), CHUNK):
                chunk = products[start : start + CHUNK]
                items = [
                    EncodeInput(
                        image=make(p.image, photo_seed(simulator, seed, p.key), encoder.limits),
                        query=True,  # as a shopper's photo: with its parts
                    )
                    for p in chunk
                ]
                for result in encoder.encode_towers(items):
                    if not result.ok:
                        raise RuntimeError(
                            f"evaluation queries could not be encoded: {result.error}"
                        )
                    whole = result.vectors["image"]
                    found = [region.image for region in result.regions]
                    vectors.append([whole, *found, *[whole] * (parts - len(found))])
                bar.update(len(chunk))
        return np.stack(vectors).astype(np.float16)

    def texts() -> np.ndarray:
        items = [
            EncodeInput(text=evaluation_query(p.title, p.attributes), query=True) for p in products
        ]
        return np.stack(tower_vectors(encoder, items, "text", "evaluation queries")).astype(
            np.float16
        )

    what = f"{simulator}-regions{'-'.join(map(str, shares))}"
    photo = _cached(cache_dir, "image", encoder.image_base, what, seed, products, photos)
    text = _cached(cache_dir, "text", encoder.text_base, "queries", seed, products, texts)
    return ShopperQueries(simulator, seed, photo[:, 0], text, photo[:, 1:] if shares else None)


def _cached(cache_dir, half, base, what, seed, products, compute) -> np.ndarray:
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256()
    for part in (QUERIES_FORMAT, base, what, str(seed)):
        digest.update(part.encode() + b"\0")
    for product in products:
        digest.update(product.key.encode() + b"\0" + hashlib.sha256(product.image).digest())
        digest.update(product.text.encode() + b"\0")
    path = cache_dir / half / base / f"evaluation-{what}-{digest.hexdigest()[:32]}.npy"
    if path.is_file():
        return np.load(path)
    vectors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)
    return vectors


def nearest_category_accuracy(vectors: np.ndarray, labels: list[str]) -> float:
    """Leave one out: how often each vector's nearest other vector (by dot product: unit
    vectors, cosine) has its label."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    return float(np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]))
