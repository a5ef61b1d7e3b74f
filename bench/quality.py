"""Retrieval quality of the fusion model on the real jewelry catalog: untrained, trained with
InfoNCE alone, and trained as Loupe trains (InfoNCE + the neighbourhood KL terms), side by side;
``--ablation`` adds Loupe's training without each of its other choices.

Every product is asked for with a simulated shopper photo from the evaluation simulator
(``phone_photo``, seeds training never uses), alone, with a short text (the held-back
``subcategory`` template, e.g. "diamond ring"), and the text alone; the index is the whole
catalog. Rankings are exact cosines over the same views the service stores, so they are what
the service answers (its embedded index searches exactly by default). Held-out products (20%)
are never trained on.

    .venv/bin/python -m bench.quality                 # 16 views, both objectives
    .venv/bin/python -m bench.quality --ablation      # and without each choice
    .venv/bin/python -m bench.quality --views 8 --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from loupe.consumers.settings import load_settings
from loupe.dev.catalog import load_catalog, training_products
from loupe.train.config import TrainConfig
from loupe.train.evaluate import scores_table
from loupe.train.features import extract_features
from loupe.train.pipeline import untrained_encoder
from loupe.train.trainer import evaluate_splits, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=TrainConfig.views)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N products")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also without each of Loupe's choices: the photo + text answer anchored on the "
        "image view's best match, the words in the fused query's neighbourhood target, the "
        "frozen text view",
    )
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
    variants = {"InfoNCE alone": {"neighbourhood_weight": 0.0}, "Loupe": {}}
    if args.ablation:
        variants |= {
            "query target: fused": {"query_words_share": 0.0},
            "text head trained": {"train_text_head": True},
        }
    columns, times = {}, {}
    for label, changes in variants.items():
        config = dataclasses.replace(
            TrainConfig(views=args.views, steps=args.steps, seed=args.seed), **changes
        )
        torch.manual_seed(args.seed)
        result = train(features, encoder.fusion, config, device=encoder.device)
        columns.setdefault("untrained", result.before)
        columns[label] = result.after
        times[label] = result.seconds
        if args.ablation and label == "Loupe":
            columns["no anchor"] = evaluate_splits(
                result.model, features, config, anchor=False, device=encoder.device
            )
    print()
    print(scores_table(columns))
    print()
    for label, seconds in times.items():
        print(f"training ({label}): {seconds:.0f} s for {args.steps} steps")
    encoder.close()


if __name__ == "__main__":
    main()
