"""What the index and the query could do for photos that cut the product, besides training:
photo R@1 / R@10 of each variant beside the single catalog vector, untrained and trained, on
both evaluation simulators, trained-on and held-out products apart.

- ``single``: what Loupe stores and asks today, one image vector per product and per photo;
- ``crops``: a multi-vector point, the catalog photo and ``--crops`` crops of it (side 0.75 of
  the photo's, in the four corners and the centre), scored by MaxSim as Qdrant and Qdrant Edge
  can (a query's best match among the product's vectors);
- ``prototype``: one vector per product, the catalog photo's tower vector plus ``--alpha``
  times the mean of ``--prototype-views`` of training's simulated shopper photos of it
  (``loupe.train.augment``: what the training cache already holds), then normalised;
- ``flipped query``: the mean of the query photo's vector and its mirror image's (two tower
  passes per query).

Each costs something the single vector does not: ``crops`` six encodes per product at ingest and
an index six times larger, ``prototype`` ``1 + prototype-views`` encodes and simulated photos per
product at ingest, ``flipped query`` a second tower pass per query. The evaluation photos are
``bench.quality``'s; training is ``loupe train``'s with its defaults.

    .venv/bin/python -m bench.index_views              # seed 0: ~15 min on 2 cores, first run
    .venv/bin/python -m bench.index_views --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import ImageOps

from bench.cli import summary
from loupe.consumers.settings import load_settings
from loupe.dev.catalog import load_catalog, training_products
from loupe.encoders.fused import EncodeInput
from loupe.encoders.images import decode_image
from loupe.evaluation.photos import photo_seed, shopper_queries
from loupe.evaluation.simulators import SIMULATORS
from loupe.train.config import TrainConfig
from loupe.train.features import extract_features, tower_vectors
from loupe.train.pipeline import untrained_encoder
from loupe.train.trainer import held_out_mask, train

CROP_SIDE = 0.75  # of the catalog photo's sides
CROP_PLACES = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # share of the slack
CHUNK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--prototype-views", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    settings = load_settings()
    encoder = untrained_encoder(settings)
    cache = settings.state_dir / "train-cache"
    products = training_products(load_catalog())
    print(f"{len(products)} products; model base {encoder.base_version}", flush=True)
    started = time.perf_counter()
    crops = catalog_crops(encoder, products)  # (N, C, Di): the same for every seed
    print(f"catalog crops encoded in {time.perf_counter() - started:.0f} s", flush=True)
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        config = TrainConfig(steps=args.steps, seed=seed)
        features = extract_features(
            encoder, products, views=config.views, seed=seed, cache_dir=cache
        )
        torch.manual_seed(seed)
        trained = train(features, encoder.fusion, config, device=encoder.device).model.eval()
        held = held_out_mask(features.keys, config.holdout, seed)
        catalog = features.catalog_image.astype(np.float32)
        views = features.view_image[:, : args.prototype_views].astype(np.float32).mean(axis=1)
        prototype = _unit(catalog + args.alpha * _unit(views))
        lines = ["| photos | model | variant | trained on R@1 / R@10 | held out R@1 / R@10 |"]
        lines.append("|---|---|---|---|---|")
        for sim in SIMULATORS:
            photo = shopper_queries(encoder, products, sim, seed, cache_dir=cache).photo
            photo = photo.astype(np.float32)
            flipped = _unit(photo + mirrored_queries(encoder, products, sim, seed))
            for name, model in (("untrained", encoder.fusion.eval()), ("trained", trained)):
                variants = {
                    "single": ranks(model, photo, catalog[:, None]),
                    "crops": ranks(model, photo, np.concatenate([catalog[:, None], crops], 1)),
                    "prototype": ranks(model, photo, prototype[:, None]),
                    "flipped query": ranks(model, flipped, catalog[:, None]),
                }
                for variant, rank in variants.items():
                    cells = [
                        f"{np.mean(rank[m] == 1):.3f} / {np.mean(rank[m] <= 10):.3f}"
                        for m in (~held, held)
                    ]
                    lines.append(f"| {sim} | {name} | {variant} | " + " | ".join(cells) + " |")
        print(f"\n### seed {seed}\n\n" + "\n".join(lines), flush=True)
    encoder.close()


def ranks(model, queries: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The rank of each query's own product (query ``i`` is about product ``i``) among the
    products' MaxSim scores: ``index`` ``(N, V, Di)`` holds ``V`` tower vectors per product;
    all pass through ``model``'s image head first."""
    with torch.inference_mode():
        asked = model.image(torch.from_numpy(queries)).numpy()
        flat = torch.from_numpy(np.ascontiguousarray(index.reshape(-1, index.shape[-1])))
        stored = model.image(flat).numpy().reshape(*index.shape[:2], -1)
    scores = np.einsum("qd,nvd->qnv", asked, stored).max(axis=2)  # (Q, N)
    own = scores[np.arange(len(scores)), np.arange(len(scores))]
    return (scores > own[:, None]).sum(axis=1) + 1


def catalog_crops(encoder, products) -> np.ndarray:
    """``(N, len(CROP_PLACES), Di)``: the tower vectors of the crops of each catalog photo."""
    out = []
    for product in products:
        image = decode_image(product.image, limits=encoder.limits)
        width, height = image.size
        crop_w, crop_h = round(width * CROP_SIDE), round(height * CROP_SIDE)
        items = []
        for fx, fy in CROP_PLACES:
            left, top = round((width - crop_w) * fx), round((height - crop_h) * fy)
            crop = image.crop((left, top, left + crop_w, top + crop_h))
            items.append(EncodeInput(image=_png(crop)))
        out.append(np.stack(tower_vectors(encoder, items, "image", "catalog crops")))
    return np.stack(out).astype(np.float32)


def mirrored_queries(encoder, products, simulator: str, seed: int) -> np.ndarray:
    """The tower vectors of each evaluation photo mirrored left to right."""
    make = SIMULATORS[simulator]
    vectors = []
    for start in range(0, len(products), CHUNK):
        items = []
        for product in products[start : start + CHUNK]:
            photo = make(product.image, photo_seed(simulator, seed, product.key), encoder.limits)
            items.append(EncodeInput(image=_png(ImageOps.mirror(decode_image(photo)))))
        vectors += tower_vectors(encoder, items, "image", "mirrored queries")
    return np.stack(vectors).astype(np.float32)


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


if __name__ == "__main__":
    main()
