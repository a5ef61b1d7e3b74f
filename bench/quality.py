"""Retrieval quality of the fusion model on the real jewelry catalog, judged by simulators that
training never uses: untrained, trained as `loupe train` trains (the image view whitened, the
fusion trained), and trained as it did before the whitening (the heads, the image one
included), side by side over several seeds; ``--ablation`` adds InfoNCE alone, the image head
trained on the whitened view, and Loupe's training without each of its other choices.

Every product is asked for three ways: a shopper photo, that photo with a short text (the
held-back ``subcategory`` template, e.g. "diamond ring"), and the text alone; the index is the
whole catalog. The photos come from each evaluation simulator in ``loupe.evaluation.simulators``:

- ``loupe``: Loupe's own evaluation family (``phone_photo``: a tinted table, tilt, 4:3, the
  product in frame);
- ``torchvision``: standard torchvision transforms only, with ranges training does not use
  (crops anywhere, scale 0.35-1.0 and aspect 0.5-2.0, so some cut the product; rotation up to
  10 degrees; colour jitter 0.4; blur; the long side 160-640 pixels; JPEG 30-80).

Training's own simulator (``loupe.train.augment``) is never imported by the evaluation and vice
versa. Each seed draws other training photos, another held-out fifth of the products (never
trained on: the products a merchant adds after training) and other evaluation photos; the tables
give the mean over the seeds and, after ±, the standard deviation. Rankings are exact cosines over
the views the service stores, ranked as the service ranks them (``loupe/ranking.py``).

Text in Chinese (``--languages``): for each text tower, MiniLM and multilingual-e5-small, the
catalog's products are asked for by their category and sub-category in words (text alone): in
English on the English catalog, in Chinese on the same catalog rendered in Chinese through a
glossary (``loupe.evaluation.chinese``), and in Chinese on the English catalog. Category P@10
per (queries, catalog, tower). The text view is the frozen tower's, trained or not.

    .venv/bin/python -m bench.quality                      # 3 seeds, both simulators
    .venv/bin/python -m bench.quality --seeds 0 --ablation # and without each choice
    .venv/bin/python -m bench.quality --languages          # English and Chinese text, both towers
    .venv/bin/python -m bench.quality --tower-steps 300    # and the image tower's last block tuned
    LOUPE_TEXT_BACKBONE=multilingual-e5-small .venv/bin/python -m bench.quality  # its photo tables
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.cli import summary
from loupe.consumers.settings import load_settings
from loupe.dev.catalog import load_catalog, training_products
from loupe.encoders.fused import FusedEncoder
from loupe.encoders.fusion import save_fusion
from loupe.evaluation.photos import shopper_queries
from loupe.evaluation.simulators import SIMULATORS
from loupe.train.config import TrainConfig
from loupe.train.evaluate import KINDS
from loupe.train.features import extract_features
from loupe.train.pipeline import untrained_encoder
from loupe.train.tower import through_tail, tune_tower
from loupe.train.trainer import evaluate_splits, train

METRICS = ("recall_at_1", "recall_at_10", "category_p10")
SPLITS = ("seen", "held_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--views", type=int, default=TrainConfig.views)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; mean and spread")
    parser.add_argument("--simulators", default=",".join(SIMULATORS))
    parser.add_argument("--limit", type=int, default=None, help="use only the first N products")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also InfoNCE alone, and Loupe without: the photo + text answer anchored on the "
        "image view's best match, the words in the fused query's neighbourhood target, the "
        "frozen text view",
    )
    parser.add_argument(
        "--tower-steps",
        type=int,
        default=0,
        help="also tune the image tower's last block this many steps (loupe train --tower-steps) "
        "and report it alone and with the rest of training (whitening, fusion) on top, its query "
        "photos encoded by the tuned tower as the service would",
    )
    parser.add_argument(
        "--photo-kind-weight",
        type=float,
        default=0.0,
        help="also rank Loupe's photo-only answers as LOUPE_PHOTO_KIND_WEIGHT does: the best "
        "match first, then the image view's top 50 by image cosine plus this times the fused-view "
        "cosine with the best match",
    )
    parser.add_argument(
        "--languages",
        action="store_true",
        help="only the text table: English and Chinese queries and catalogs, both text towers",
    )
    args = parser.parse_args()
    if args.languages:
        products = training_products(load_catalog()[: args.limit])
        print(language_table(products))
        return
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    simulators = [s.strip() for s in args.simulators.split(",") if s.strip()]
    unknown = set(simulators) - set(SIMULATORS)
    if unknown:
        parser.error(f"unknown simulators {sorted(unknown)}; known: {', '.join(SIMULATORS)}")
    settings = load_settings()
    encoder = untrained_encoder(settings)
    cache = settings.state_dir / "train-cache"
    products = training_products(load_catalog()[: args.limit])
    print(f"{len(products)} products; model base {encoder.base_version} on {encoder.device}")
    # What `loupe train` did before the image view was whitened, beside what it does now.
    before = {"whitening_shrinkage": 0.0, "train_image_head": True}
    variants = {"heads, not whitened": before, "Loupe": {}}
    if args.ablation:
        variants = {
            "InfoNCE alone": {**before, "neighbourhood_weight": 0.0},
            "heads, not whitened": before,
            "Loupe": {},
            "image head trained": {"train_image_head": True},
            "query target: fused": {"query_words_share": 0.0},
            "text head trained": {"train_text_head": True},
        }
    # Loupe's model ranked otherwise than the service's defaults: name -> evaluate_splits options
    rankings: dict[str, dict] = {}
    if args.photo_kind_weight > 0:
        rankings[f"Loupe, kind kept ({args.photo_kind_weight:g})"] = {
            "photo_kind_weight": args.photo_kind_weight
        }
    if args.ablation:
        rankings["no anchor"] = {"anchor": False}
    # runs[simulator][model] -> one scores dict per seed
    runs: dict[str, dict[str, list]] = {sim: {} for sim in simulators}
    feature_s, train_s = [], []
    for seed in seeds:
        started = time.perf_counter()
        features = extract_features(
            encoder,
            products,
            views=args.views,
            seed=seed,
            cache_dir=cache,
            tower_maps=args.tower_steps > 0,
        )
        queries = {
            sim: shopper_queries(encoder, products, sim, seed, cache_dir=cache)
            for sim in simulators
        }
        feature_s.append(time.perf_counter() - started)
        for label, changes in variants.items():
            config = dataclasses.replace(
                TrainConfig(views=args.views, steps=args.steps, seed=seed), **changes
            )
            torch.manual_seed(seed)
            result = train(features, encoder.fusion, config, device=encoder.device)
            if label == "Loupe":
                train_s.append(result.seconds)
            for sim in simulators:
                asked = (queries[sim].photo, queries[sim].text, queries[sim].regions)
                models = {label: result.model}
                if label == "Loupe":
                    models["untrained"] = encoder.fusion
                for name, model in models.items():
                    scores = evaluate_splits(
                        model, features, config, device=encoder.device, queries=asked
                    )
                    runs[sim].setdefault(name, []).append(scores)
                for name, ranking in rankings.items() if label == "Loupe" else ():
                    scores = evaluate_splits(
                        result.model, features, config, device=encoder.device, queries=asked,
                        **ranking,
                    )  # fmt: skip
                    runs[sim].setdefault(name, []).append(scores)
        if args.tower_steps:
            config = TrainConfig(
                views=args.views, steps=args.steps, tower_steps=args.tower_steps, seed=seed
            )
            for sim, models in tuned_tower_runs(encoder, settings, products, features, config):
                for name, scores in models.items():
                    runs[sim].setdefault(name, []).append(scores)
        print(f"seed {seed} done in {time.perf_counter() - started:.0f} s", flush=True)
    for sim in simulators:
        order = ["untrained", *(m for m in runs[sim] if m != "untrained")]
        print(f"\n### {sim} simulator ({len(seeds)} seeds: mean ± sd; R@1 / R@10 / P@10)\n")
        print(table({model: runs[sim][model] for model in order}))
    print()
    print(f"features and evaluation photos: {', '.join(f'{s:.0f}' for s in feature_s)} s per seed")
    print(f"training ({args.steps} steps): {', '.join(f'{s:.0f}' for s in train_s)} s per seed")
    encoder.close()


def tuned_tower_runs(encoder, settings, products, features, config: TrainConfig):
    """``(simulator, {model: scores})`` of the image tower tuned as ``loupe train
    --tower-steps`` tunes it: alone (the untrained model on top), and with what ``loupe train``
    fits on its vectors (the whitening, the fusion). The evaluation photos are encoded by the
    tuned tower through a checkpoint loaded as the service loads one."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    tail = tune_tower(encoder.image_encoder, features, config, device=encoder.device)
    tuned = through_tail(features, tail, encoder.device)
    torch.manual_seed(config.seed)
    trained = train(tuned, encoder.fusion, config, device=encoder.device).model
    print(
        f"  tower tuned and the rest trained in {time.perf_counter() - started:.0f} s", flush=True
    )
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "tuned.safetensors"
        save_fusion(
            trained.cpu(), path, base=encoder.base_version, image_tower=tail.tower_tensors()
        )
        profile = settings.model_copy(update={"fusion_checkpoint": path}).model_profile()
        served = FusedEncoder.from_profile(profile)
    try:
        cache = settings.state_dir / "train-cache"
        for sim in SIMULATORS:
            asked = shopper_queries(served, products, sim, config.seed, cache_dir=cache)
            queries = (asked.photo, asked.text, asked.regions)
            yield (
                sim,
                {
                    name: evaluate_splits(
                        model, tuned, config, device=encoder.device, queries=queries
                    )
                    for name, model in (
                        ("tower tuned", encoder.fusion),
                        ("tower + whitening", trained),
                    )
                },
            )
    finally:
        served.close()


TEXT_TOWERS = ("all-minilm-l6-v2", "multilingual-e5-small")


def language_table(products) -> str:
    """Category P@10 of text queries by category and sub-category, per language pairing and
    tower (a Markdown table)."""
    from loupe.encoders.text_towers import TextEncoder
    from loupe.evaluation.chinese import chinese_product, chinese_queries, english_queries

    labels = np.array([p.category for p in products])
    catalogs = {"English": [p.text for p in products]}
    catalogs["Chinese"] = [chinese_product(p).text for p in products]
    asked = {"English": [english_queries(p) for p in products]}
    asked["Chinese"] = [chinese_queries(p) for p in products]
    pairings = [("English", "English"), ("Chinese", "Chinese"), ("Chinese", "English")]
    results: dict[tuple[str, str], dict[str, float]] = {}
    for name in TEXT_TOWERS:
        tower = TextEncoder(name)
        index = {lang: _encode(tower, texts, query=False) for lang, texts in catalogs.items()}
        for query_lang, catalog_lang in pairings:
            rows, texts = [], []
            for row, queries in enumerate(asked[query_lang]):
                rows += [row] * len(queries)
                texts += queries
            vectors = _encode(tower, texts, query=True)
            scores = vectors @ index[catalog_lang].T  # (Q, N)
            top = np.argsort(-scores, axis=1)[:, :10]
            precision = (labels[top] == labels[np.array(rows)][:, None]).mean()
            results.setdefault((query_lang, catalog_lang), {})[name] = float(precision)
        del tower
    lines = [
        "| queries | catalog | " + " | ".join(TEXT_TOWERS) + " |",
        "|---|---|" + "---|" * len(TEXT_TOWERS),
    ]
    for (query_lang, catalog_lang), by_tower in results.items():
        cells = " | ".join(f"{by_tower[name]:.3f}" for name in TEXT_TOWERS)
        lines.append(f"| {query_lang} | {catalog_lang} | {cells} |")
    count = sum(len(q) for q in asked["English"])
    return (
        f"text queries by category and sub-category ({count} per language, {len(products)} "
        "products): category P@10\n\n" + "\n".join(lines)
    )


def _encode(tower, texts: list[str], *, query: bool, batch: int = 64) -> np.ndarray:
    parts = [
        tower.encode(texts[i : i + batch], queries=[query] * len(texts[i : i + batch])).numpy()
        for i in range(0, len(texts), batch)
    ]
    return np.concatenate(parts)


def table(models: dict[str, list]) -> str:
    """A Markdown table: one row per (split, query kind), one column per model, each cell the
    three metrics' means over the seeds, and their standard deviations where they vary."""
    lines = [
        "| products | query | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for split in SPLITS:
        for kind in KINDS:
            cells = []
            for runs in models.values():
                values = [
                    [getattr(run[split][kind], metric) for run in runs if split in run]
                    for metric in METRICS
                ]
                cells.append(" / ".join(_cell(v) for v in values))
            name = "trained on" if split == "seen" else "held out"
            lines.append(f"| {name} | {kind.replace('+', ' + ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f}" if spread < 0.0005 else f"{mean:.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main()
