"""Retrieval quality of the fusion model on the real jewelry catalog: untrained, trained with
InfoNCE alone, and trained with InfoNCE + the neighbourhood KL term, side by side.

Every product is asked for with a simulated shopper photo from the evaluation simulator
(``phone_photo``, seeds training never uses), alone, with a short text (the held-back
``subcategory`` template, e.g. "diamond ring"), and the text alone; the index is the whole
catalog. Rankings are exact cosines over the same views the service stores, so they are what
the service answers (its embedded index searches exactly by default). Held-out products (20%)
are never trained on.

    .venv/bin/python -m bench.quality                 # 16 views, both objectives
    .venv/bin/python -m bench.quality --views 8 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch

from loupe.consumers.settings import load_settings
from loupe.dev.catalog import load_catalog, training_products
from loupe.train.config import TrainConfig
from loupe.train.evaluate import scores_table
from loupe.train.features import extract_features
from loupe.train.pipeline import untrained_encoder
from loupe.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=TrainConfig.views)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N products")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = load_settings()
    encoder = untrained_encoder(settings)
    products = training_products(load_catalog()[: args.limit])
    print(f"{len(products)} products; model base {encoder.base_version} on {encoder.device}")
    started = time.perf_counter()
    features = extract_features(
        encoder,
        products,
        views=args.views,
        seed=args.seed,
        cache_dir=settings.state_dir / "train-cache",
    )
    print(f"features: {time.perf_counter() - started:.0f} s (cached for the next run)")
    columns, times = {}, {}
    for label, weight in (("InfoNCE alone", 0.0), ("InfoNCE + KL", 1.0)):
        config = TrainConfig(
            views=args.views, steps=args.steps, neighbourhood_weight=weight, seed=args.seed
        )
        torch.manual_seed(args.seed)
        result = train(features, encoder.fusion, config, device=encoder.device)
        columns.setdefault("untrained", result.before)
        columns[label] = result.after
        times[label] = result.seconds
    print()
    print(scores_table(columns))
    print()
    for label, seconds in times.items():
        print(f"training ({label}): {seconds:.0f} s for {args.steps} steps")
    encoder.close()


if __name__ == "__main__":
    main()
