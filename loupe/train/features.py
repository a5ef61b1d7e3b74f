"""The frozen towers' vectors for training, computed once per product and cached.

Training only moves the light heads, so the expensive part (decoding and simulating photos,
running the CNN and the BERT tower) is done once: each product's vectors are stored in one file
named by a hash of everything that determines them (the model base, the photo's bytes, the
texts, the number of views, the seed). A second ``loupe train`` on the same catalog, or on a
catalog with a few new products, computes only what is new.

Per product: the catalog photo and text (what the index holds), ``views`` simulated shopper
photos with a short query text each (training), and one evaluation photo from another simulator
and seed family with the held-back query template (evaluation).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.encoders.images import DecodeLimits
from loupe.progress import progress
from loupe.train.augment import phone_photo, shopper_photo, studio_photo
from loupe.train.queries import evaluation_query, training_queries
from loupe.train.source import TrainingProduct

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_000_007  # evaluation photos never share a seed with training views
FEATURE_FORMAT = "3"  # bump when the simulators or the query templates change: stale cache
PRODUCTS_PER_CHUNK = 8  # products whose photos are simulated and encoded together


@dataclass
class CatalogFeatures:
    """Row ``i`` of every array is product ``i``. Stored as float16 (half the memory; cosines
    move by < 1e-3), used as float32."""

    keys: list[str]
    categories: np.ndarray | None  # (N,) str, or None when the catalog has no category
    catalog_image: np.ndarray  # (N, Di)
    catalog_text: np.ndarray  # (N, Dt)
    view_image: np.ndarray  # (N, K, Di) simulated shopper photos
    view_text: np.ndarray  # (N, K, Dt) a short query text per view
    eval_image: np.ndarray  # (N, Di) a photo from the evaluation simulator
    eval_text: np.ndarray  # (N, Dt) the held-back query template

    def __len__(self) -> int:
        return len(self.keys)


def product_digest(product: TrainingProduct, base_version: str, views: int, seed: int) -> str:
    digest = hashlib.sha256()
    for part in (FEATURE_FORMAT, base_version, str(views), str(seed), product.key, product.text):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(product.image)
    return digest.hexdigest()[:32]


def extract_features(
    encoder: FusedEncoder,
    products: Sequence[TrainingProduct],
    *,
    views: int,
    seed: int,
    cache_dir: Path | None,
    workers: int | None = None,
) -> CatalogFeatures:
    """Every product's tower vectors, from the cache where present; shows progress. Photos are
    simulated on ``workers`` threads (default: one per CPU; Pillow releases the GIL)."""
    workers = workers or min(32, os.cpu_count() or 2)
    chunk_size = max(PRODUCTS_PER_CHUNK, workers)
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    rows: list[dict[str, np.ndarray] | None] = [None] * len(products)
    paths: list[Path | None] = [None] * len(products)
    if cache_dir is not None:
        where = cache_dir / encoder.base_version
        where.mkdir(parents=True, exist_ok=True)
        for i, product in enumerate(products):
            paths[i] = where / f"{product_digest(product, encoder.base_version, views, seed)}.npz"
            if paths[i].is_file():
                rows[i] = _read(paths[i])
    missing = [i for i, row in enumerate(rows) if row is None]
    log.info(
        "features: %d of %d products cached, %d to compute (%d photos each)",
        len(products) - len(missing),
        len(products),
        len(missing),
        views + 2,
    )
    if missing:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="simulate") as pool,
            progress(total=len(missing), desc="features", unit="product") as bar,
        ):
            for start in range(0, len(missing), chunk_size):
                chunk = missing[start : start + chunk_size]
                computed = _compute(encoder, [products[i] for i in chunk], views, seed, pool)
                for i, row in zip(chunk, computed, strict=True):
                    rows[i] = row
                    if paths[i] is not None:
                        _write(paths[i], row)
                bar.update(len(chunk))
    categories = [p.category for p in products]
    return CatalogFeatures(
        keys=[p.key for p in products],
        categories=np.array(categories) if all(categories) else None,
        **{name: _stack([row[name] for row in rows]) for name in _ARRAYS},
    )


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """``np.stack`` into float16, filled row by row (no float32 copy of the whole catalog)."""
    out = np.empty((len(parts), *parts[0].shape), dtype=np.float16)
    for i, part in enumerate(parts):
        out[i] = part
    return out


_ARRAYS = ("catalog_image", "catalog_text", "view_image", "view_text", "eval_image", "eval_text")


def _compute(
    encoder: FusedEncoder,
    products: list[TrainingProduct],
    views: int,
    seed: int,
    pool: ThreadPoolExecutor,
) -> list[dict[str, np.ndarray]]:
    photos = [
        photo
        for product_photos in pool.map(
            lambda product: _simulate(product, views, seed, encoder.limits), products
        )
        for photo in product_photos
    ]  # per product: `views` training photos, then the evaluation photo
    items = [EncodeInput(image=p.image, media_type=p.media_type) for p in products]
    items += [EncodeInput(image=photo) for photo in photos]
    texts = []
    for product in products:
        rng = random.Random(_product_seed(product.key, seed))
        texts.append(product.text)
        texts += training_queries(product.title, product.attributes, views, rng)
        texts.append(evaluation_query(product.title, product.attributes))
    items += [EncodeInput(text=t) for t in texts]
    encoded = encoder.encode_towers(items)
    failed = [r.error for r in encoded if not r.ok]
    if failed:  # the products were checked when they were read; a failure here is a bug
        raise RuntimeError(f"encoding training inputs failed: {failed[0]}")
    vectors = [r.vectors.get("image", r.vectors.get("text")) for r in encoded]
    catalog_images = vectors[: len(products)]
    photo_vectors = vectors[len(products) : len(products) + len(photos)]
    text_vectors = vectors[len(products) + len(photos) :]
    rows = []
    per_product = views + 2  # texts: product text, `views` queries, evaluation query
    for n in range(len(products)):
        photos_n = photo_vectors[n * (views + 1) : (n + 1) * (views + 1)]
        texts_n = text_vectors[n * per_product : (n + 1) * per_product]
        rows.append(
            {
                "catalog_image": catalog_images[n].astype(np.float16),
                "catalog_text": texts_n[0].astype(np.float16),
                "view_image": np.stack(photos_n[:views]).astype(np.float16),
                "view_text": np.stack(texts_n[1 : views + 1]).astype(np.float16),
                "eval_image": photos_n[views].astype(np.float16),
                "eval_text": texts_n[views + 1].astype(np.float16),
            }
        )
    return rows


def _simulate(product: TrainingProduct, views: int, seed: int, limits: DecodeLimits) -> list[bytes]:
    """The product's simulated photos; its catalog photo is decoded once for all of them."""
    base = _product_seed(product.key, seed)
    studio = studio_photo(product.image, limits)
    photos = [shopper_photo(studio, base + k) for k in range(views)]
    photos.append(phone_photo(product.image, EVAL_SEED_OFFSET + base, limits))
    return photos


def _product_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "big") * 1000


def _read(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return {name: data[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError) as exc:  # a torn or foreign file: compute it again
        log.warning("ignoring unreadable feature cache file %s: %s", path, exc)
        return None


def _write(path: Path, row: dict[str, np.ndarray]) -> None:
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **row)
    partial.replace(path)
