"""``loupe train``: fit the fusion model to the merchant's own catalog."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loupe.cli.common import KAFKA_SETTINGS, global_options, settings, settings_epilog
from loupe.train.config import TrainConfig

DEFAULTS = TrainConfig()  # the options' defaults are the config's: written once


@click.command(
    epilog=settings_epilog(
        *KAFKA_SETTINGS,
        "products_topic",
        "state_dir",
        "image_backbone",
        "text_backbone",
        "image_fit",
        "image_pooling",
        "device",
    )
)
@click.option(
    "--events",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A JSON-lines file of product events to train on [default: the products topic, read "
    "from the beginning].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the checkpoint [default: $LOUPE_STATE_DIR/models/fusion-<hash>"
    ".safetensors].",
)
@click.option(
    "--views",
    type=click.IntRange(1, 256),
    default=DEFAULTS.views,
    help="Simulated shopper photos per product.",
)
@click.option(
    "--steps", type=click.IntRange(1, 1_000_000), default=DEFAULTS.steps, help="Optimiser steps."
)
@click.option(
    "--batch-size",
    type=click.IntRange(2, 65_536),
    default=DEFAULTS.batch_size,
    help="Products per step.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0.0, 0.9),
    default=DEFAULTS.holdout,
    help="Share of products never trained on, measured apart.",
)
@click.option(
    "--neighbourhood-weight",
    type=click.FloatRange(0.0, 100.0),
    default=DEFAULTS.neighbourhood_weight,
    help="Weight of the term that keeps category neighbourhoods; 0 trains on InfoNCE alone.",
)
@click.option("--learning-rate", type=click.FloatRange(1e-6, 1.0), default=DEFAULTS.learning_rate)
@click.option(
    "--whitening-shrinkage",
    type=click.FloatRange(0.0, 1000.0),
    default=DEFAULTS.whitening_shrinkage,
    help="Shrinkage toward the identity of the image view's whitening, fitted on the simulated "
    "photos before the heads; larger keeps more of the tower's own geometry, 0 fits none "
    "(docs/training.md, 'Whitening the image view').",
)
@click.option(
    "--train-image-head",
    is_flag=True,
    help="Train the image view's head as well: photo-only answers then keep more of the "
    "product's category after the first hit, for up to 4 points less R@1 on photos that cut the "
    "product (docs/training.md, 'Whitening the image view').",
)
@click.option(
    "--tower-steps",
    type=click.IntRange(0, 1_000_000),
    default=DEFAULTS.tower_steps,
    help="Steps tuning the image tower's last block on the simulated photos before the heads; "
    "0 keeps the tower frozen. EfficientNet-Lite towers only; about 2 s a step on a 2-core "
    "CPU, and the photos' maps take ~31 KB each (docs/training.md, 'Tuning the image tower').",
)
@click.option(
    "--seed",
    type=int,
    default=DEFAULTS.seed,
    help="Seeds the simulated photos, the split and training.",
)
@click.option(
    "--max-products",
    type=click.IntRange(10, 10_000_000),
    default=200_000,
    help="Refuse larger catalogs (features take ~47 KB per product at 12 views).",
)
@click.option("--no-cache", is_flag=True, help="Compute every product's tower vectors again.")
@global_options
def train(
    events: Path | None,
    out: Path | None,
    views: int,
    steps: int,
    batch_size: int,
    holdout: float,
    neighbourhood_weight: float,
    learning_rate: float,
    whitening_shrinkage: float,
    train_image_head: bool,
    tower_steps: int,
    seed: int,
    max_products: int,
    no_cache: bool,
) -> int:
    """Train the fusion model (image whitening, heads, attention fusion) on the catalog.

    Reads the latest state of every product (deleted ones left out), simulates shopper photos
    of each and short query texts from its title and attributes, fits the image view's
    whitening to what those photos change (so that a photo finds its own product), then the
    attention fusion (so that photo + text answers keep to the kind the words name) while the
    catalog's neighbourhoods are kept; with --tower-steps, the image tower's last block is
    tuned first and travels in the checkpoint. Prints the held-out metrics as it goes and, at
    the end, the checkpoint to put into service: LOUPE_FUSION_CHECKPOINT=<path> loupe reindex.
    A new checkpoint is a new model version, so the index is rebuilt under it (a new
    collection).
    """
    from loupe.consumers.kafka.io import require_broker
    from loupe.train.evaluate import scores_table
    from loupe.train.pipeline import untrained_encoder
    from loupe.train.source import (
        CatalogSourceError,
        ReadReport,
        latest_products,
        read_jsonl,
        read_topic,
    )

    config = TrainConfig(
        views=views,
        steps=steps,
        batch_size=batch_size,
        holdout=holdout,
        neighbourhood_weight=neighbourhood_weight,
        learning_rate=learning_rate,
        whitening_shrinkage=whitening_shrinkage,
        train_image_head=train_image_head,
        tower_steps=tower_steps,
        seed=seed,
    )
    current = settings()
    report = ReadReport()
    if events is not None:
        click.echo(f"==> reading product events from {events}")
        latest = latest_products(read_jsonl(events), report)
    else:
        require_broker(current, wait_s=5.0)
        where = f"{current.products_topics().label} on {current.bootstrap_servers}"
        click.echo(f"==> reading {where} from the beginning")
        latest = latest_products(
            read_topic(current.kafka_client_config(), current.products_topics()), report
        )
    click.echo(
        f"    {report.events} events: {len(latest)} products, {report.deleted} deleted, "
        f"{report.superseded} superseded, {report.invalid} invalid"
    )
    if len(latest) > max_products:
        raise CatalogSourceError(
            f"{len(latest)} products is more than --max-products {max_products}; raise it if "
            "this machine has the memory (about 47 KB per product at 12 views)"
        )
    encoder = untrained_encoder(current)
    try:
        trained = _train(encoder, latest, config, report, out=out, use_cache=not no_cache)
    finally:
        encoder.close()
    result = trained.result
    click.echo(
        "\nJudged on one held-back photo per product from training's own simulator, harder "
        "than most shoppers' (some crops cut the product): a yardstick of what training changed. "
        "bench.quality judges with simulators training never sees (docs/training.md)."
    )
    click.echo(scores_table({"untrained": result.before, "trained": result.after}))
    click.echo(f"\ntrained in {result.seconds:.0f} s; checkpoint {trained.path}")
    click.echo(f"model version {trained.model_version}")
    click.echo(f"put it into service:  LOUPE_FUSION_CHECKPOINT={trained.path} loupe reindex")
    click.echo(
        json.dumps({"checkpoint": str(trained.path), "model_version": trained.model_version})
    )
    return 0


def _train(encoder, latest: dict, config, report, *, out: Path | None, use_cache: bool):
    """Images, then training, on an encoder the caller closes."""
    from loupe.train.pipeline import train_checkpoint
    from loupe.train.source import with_images
    from loupe.train.tower import tower_progress_line
    from loupe.train.trainer import progress_line

    products = with_images(latest, settings().fetch_policy(), encoder.limits, report)
    if report.images_failed:
        click.echo(f"    {report.images_failed} products left out: their image could not be read")
    click.echo(f"==> model base {encoder.base_version} on {encoder.device}")
    click.echo(
        f"==> training on {len(products)} products ({config.holdout:.0%} held out), "
        f"{config.views} simulated photos each, "
        + (f"{config.tower_steps} steps tuning the image tower, " if config.tower_steps else "")
        + ("the image view whitened, " if config.whitening_shrinkage else "")
        + f"{config.steps} steps training the heads"
    )

    return train_checkpoint(
        encoder,
        products,
        config,
        state_dir=settings().state_dir,
        out=out,
        use_cache=use_cache,
        on_evaluation=lambda record: click.echo(progress_line(record)),
        on_tower_progress=lambda record: click.echo(tower_progress_line(record)),
    )


COMMANDS = [train]
