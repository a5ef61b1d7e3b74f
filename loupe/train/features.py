"""The frozen towers' vectors for training, computed once per product and cached.

Training only moves the light heads, so the expensive part (decoding and simulating photos,
running the CNN and the BERT tower) is done once: each product's vectors are stored in one file
named by a hash of everything that determines them (the model base, the photo's bytes, the
texts, the number of views, the seed). A second ``loupe train`` on the same catalog, or on a
catalog with a few new products, computes only what is new.

Per product: the catalog photo and text (what the index holds), ``views`` simulated shopper
photos with a short query text each (training), and one more simulated photo, which training
never draws, with the held-back query template: what ``loupe train`` reports its progress on.
Photos from simulators training never saw are ``loupe.evaluation``'s (``bench.quality``).
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
import torch

from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.encoders.images import DecodeLimits
from loupe.encoders.preprocess import Photo
from loupe.encoders.tower_tail import TowerTail, trunk
from loupe.progress import progress
from loupe.train.augment import shopper_photo, studio_masks, studio_photo
from loupe.train.queries import evaluation_query, training_queries
from loupe.train.source import TrainingProduct

log = logging.getLogger(__name__)

FEATURE_FORMAT = "6"  # bump when the simulator or the query templates change: stale cache
PRODUCTS_PER_CHUNK = 8  # products whose photos are simulated and encoded together


@dataclass(frozen=True)
class TowerMaps:
    """The photos' maps where the image tower's tunable tail starts (``encoders.tower_tail``),
    float16 on the host, row ``i`` product ``i``: what ``loupe.train.tower`` tunes the tail on,
    and what the pooled image arrays of ``CatalogFeatures`` are the frozen tail's vectors of."""

    catalog: torch.Tensor  # (N, C, h, w)
    views: torch.Tensor  # (N, K, C, h, w)
    eval: torch.Tensor  # (N, C, h, w)


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
    eval_image: np.ndarray  # (N, Di) a simulated photo training never draws
    eval_text: np.ndarray  # (N, Dt) the held-back query template
    # The image tower's maps before its tuned tail (``tower_maps``), for tuning the tower.
    maps: TowerMaps | None = None

    def __len__(self) -> int:
        return len(self.keys)


def product_digest(product: TrainingProduct, tower_base: str, views: int, seed: int) -> str:
    """The cache key of one product's vectors from one tower (``tower_base``: the encoder's
    ``image_base`` or ``text_base``): a product's photo vectors stay valid when only the text
    tower changes, and the other way round."""
    digest = hashlib.sha256()
    for part in (FEATURE_FORMAT, tower_base, str(views), str(seed), product.key, product.text):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(product.image)
    return digest.hexdigest()[:32]


IMAGE_ARRAYS = ("catalog_image", "view_image", "eval_image")
MAP_ARRAYS = ("catalog_maps", "view_maps", "eval_maps")
TEXT_ARRAYS = ("catalog_text", "view_text", "eval_text")


def extract_features(
    encoder: FusedEncoder,
    products: Sequence[TrainingProduct],
    *,
    views: int,
    seed: int,
    cache_dir: Path | None,
    workers: int | None = None,
    tower_maps: bool = False,
) -> CatalogFeatures:
    """Every product's tower vectors, from the cache where present; shows progress. Photos are
    simulated on ``workers`` threads (default: one per CPU; Pillow releases the GIL). Each
    tower's vectors are cached apart (``<cache>/image/<image base>``, ``<cache>/text/<text
    base>``): changing the text tower computes only texts, the cheap half. ``tower_maps``: also
    the photos' maps where the image tower's tunable tail starts (``maps``; cached apart, about
    31 KB a photo at 288 pixels), the image vectors computed from them by the frozen tail."""
    workers = workers or min(32, os.cpu_count() or 2)
    chunk_size = max(PRODUCTS_PER_CHUNK, workers)
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    image_half = (encoder.image_base, IMAGE_ARRAYS)
    if tower_maps:
        image_half = (f"{encoder.image_base}-maps", IMAGE_ARRAYS + MAP_ARRAYS)
    halves = {"image": image_half, "text": (encoder.text_base, TEXT_ARRAYS)}
    rows: dict[str, list[dict[str, np.ndarray] | None]] = {
        h: [None] * len(products) for h in halves
    }
    paths: dict[str, list[Path | None]] = {h: [None] * len(products) for h in halves}
    if cache_dir is not None:
        for half, (base, names) in halves.items():
            where = cache_dir / half / base
            where.mkdir(parents=True, exist_ok=True)
            for i, product in enumerate(products):
                path = where / f"{product_digest(product, base, views, seed)}.npz"
                paths[half][i] = path
                if path.is_file():
                    rows[half][i] = _read(path, names)
    missing = {h: [i for i, row in enumerate(rows[h]) if row is None] for h in halves}
    log.info(
        "features: %d of %d products' photos and %d of their texts cached (%d photos each)",
        len(products) - len(missing["image"]),
        len(products),
        len(products) - len(missing["text"]),
        views + 2,
    )
    todo = sorted(set(missing["image"]) | set(missing["text"]))
    tail = TowerTail(encoder.image_encoder).to(encoder.device).eval() if tower_maps else None
    if todo:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="simulate") as pool,
            progress(total=len(todo), desc="features", unit="product") as bar,
        ):
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                need = {h: [i for i in chunk if rows[h][i] is None] for h in halves}
                computed = {
                    "image": _compute_images(
                        encoder, [products[i] for i in need["image"]], views, seed, pool, tail
                    ),
                    "text": _compute_texts(
                        encoder, [products[i] for i in need["text"]], views, seed
                    ),
                }
                for half in halves:
                    for i, row in zip(need[half], computed[half], strict=True):
                        rows[half][i] = row
                        if paths[half][i] is not None:
                            _write(paths[half][i], row)
                bar.update(len(chunk))
    categories = [p.category for p in products]
    arrays = {
        name: _stack([row[name] for row in rows[half]])
        for half, (_, names) in halves.items()
        for name in names
    }
    maps = None
    if tower_maps:
        maps = TowerMaps(*(torch.from_numpy(arrays.pop(name)) for name in MAP_ARRAYS))
    return CatalogFeatures(
        keys=[p.key for p in products],
        categories=np.array(categories) if all(categories) else None,
        maps=maps,
        **arrays,
    )


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """``np.stack`` into float16, filled row by row (no float32 copy of the whole catalog)."""
    out = np.empty((len(parts), *parts[0].shape), dtype=np.float16)
    for i, part in enumerate(parts):
        out[i] = part
    return out


def _compute_images(
    encoder: FusedEncoder,
    products: list[TrainingProduct],
    views: int,
    seed: int,
    pool: ThreadPoolExecutor,
    tail: TowerTail | None = None,
) -> list[dict[str, np.ndarray]]:
    if not products:
        return []
    photos = [
        photo
        for product_photos in pool.map(
            lambda product: _simulate(product, views, seed, encoder.limits), products
        )
        for photo in product_photos
    ]  # per product: `views` training photos, then the evaluation photo
    if tail is not None:
        catalog = [Photo(p.image, p.media_type) for p in products]
        return _rows_with_maps(encoder, tail, catalog, [Photo(p) for p in photos], views)
    items = [EncodeInput(image=p.image, media_type=p.media_type) for p in products]
    items += [EncodeInput(image=photo) for photo in photos]
    vectors = tower_vectors(encoder, items, "image")
    return _image_rows(vectors, len(products), views)


def _image_rows(vectors: Sequence, products: int, views: int, suffix: str = "image") -> list:
    """Per product, its catalog photo's, ``views`` training photos' and the progress photo's
    rows of ``vectors`` (the catalog photos first, then each product's simulated ones)."""
    catalog, simulated = vectors[:products], vectors[products:]
    rows = []
    for n in range(products):
        photos_n = simulated[n * (views + 1) : (n + 1) * (views + 1)]
        rows.append(
            {
                f"catalog_{suffix}": np.asarray(catalog[n]).astype(np.float16),
                f"view_{suffix}": np.stack(photos_n[:views]).astype(np.float16),
                f"eval_{suffix}": np.asarray(photos_n[views]).astype(np.float16),
            }
        )
    return rows


def _rows_with_maps(
    encoder: FusedEncoder, tail: TowerTail, catalog: list[Photo], simulated: list[Photo], views: int
) -> list[dict[str, np.ndarray]]:
    """``_image_rows`` with the photos' trunk maps beside their vectors, both from one pass:
    the trunk, then the frozen tail (the rest of the tower, its pooling included)."""
    maps, vectors = [], []
    photos = catalog + simulated
    for start in range(0, len(photos), 32):
        pixels, _, failures = encoder.preprocessor.batch(photos[start : start + 32])
        if failures:  # the products were checked when read: a failure here is a bug
            raise RuntimeError(f"encoding training photos failed: {next(iter(failures.values()))}")
        with torch.inference_mode(), encoder.runtime.autocast():  # as the service encodes
            chunk = trunk(encoder.image_encoder, pixels)
            vectors += list(tail(chunk).float().cpu().numpy())
        maps += list(chunk.half().cpu().numpy())
    rows = _image_rows(vectors, len(catalog), views)
    for row, with_maps in zip(rows, _image_rows(maps, len(catalog), views, "maps"), strict=True):
        row.update(with_maps)
    return rows


def _compute_texts(
    encoder: FusedEncoder, products: list[TrainingProduct], views: int, seed: int
) -> list[dict[str, np.ndarray]]:
    if not products:
        return []
    items = []  # per product: its own text (a document), `views` queries, the evaluation query
    for product in products:
        rng = random.Random(_product_seed(product.key, seed))
        items.append(EncodeInput(text=product.text))
        queries = training_queries(product.title, product.attributes, views, rng)
        queries.append(evaluation_query(product.title, product.attributes))
        items += [EncodeInput(text=q, query=True) for q in queries]
    vectors = tower_vectors(encoder, items, "text")
    per_product = views + 2
    rows = []
    for n in range(len(products)):
        texts_n = vectors[n * per_product : (n + 1) * per_product]
        rows.append(
            {
                "catalog_text": texts_n[0].astype(np.float16),
                "view_text": np.stack(texts_n[1 : views + 1]).astype(np.float16),
                "eval_text": texts_n[views + 1].astype(np.float16),
            }
        )
    return rows


def tower_vectors(
    encoder: FusedEncoder, items: list[EncodeInput], view: str, what: str = "training inputs"
) -> list[np.ndarray]:
    """The frozen towers' ``view`` vector of each item. The products were checked when they
    were read, so a failure here is a bug: raised, naming ``what`` was encoded."""
    encoded = encoder.encode_towers(items)
    failed = [r.error for r in encoded if not r.ok]
    if failed:
        raise RuntimeError(f"encoding {what} failed: {failed[0]}")
    return [r.vectors[view] for r in encoded]


def _simulate(product: TrainingProduct, views: int, seed: int, limits: DecodeLimits) -> list[bytes]:
    """The product's simulated photos, ``views`` to train on and one to report progress on;
    its catalog photo is decoded once for all of them."""
    base = _product_seed(product.key, seed)
    studio = studio_photo(product.image, limits)
    masks = studio_masks(studio)
    return [shopper_photo(studio, base + k, masks) for k in range(views + 1)]


def _product_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "big") * 1000


def _read(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return {name: data[name] for name in names}
    except (OSError, ValueError, KeyError) as exc:  # a torn or foreign file: compute it again
        log.warning("ignoring unreadable feature cache file %s: %s", path, exc)
        return None


def _write(path: Path, row: dict[str, np.ndarray]) -> None:
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **row)
    partial.replace(path)
