"""The demo's ``loupe train`` step: fit the fusion model to the catalog once, then reuse it.

The checkpoint is cached under the demo's state directory, named by a hash of what determines
it (the model base, the products' keys and photos, the photo simulators' format, the training
config), so a second demo starts at once; its metadata keeps the before/after metrics the
report shows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from loupe.consumers.settings import Settings
from loupe.dev.catalog import CatalogProduct, training_products
from loupe.encoders.fusion import load_fusion
from loupe.train.config import TrainConfig
from loupe.train.features import FEATURE_FORMAT
from loupe.train.pipeline import train_checkpoint, untrained_encoder
from loupe.train.trainer import progress_line

# Fewer simulated photos than `loupe train`'s default: the first demo on a 2-core laptop should
# take minutes, not ten (8 views measured within 0.02 of 16 on this catalog).
DEMO_TRAINING = TrainConfig(views=8)


def demo_checkpoint(
    settings: Settings, products: list[CatalogProduct], config: TrainConfig = DEMO_TRAINING
) -> tuple[Path, dict, bool]:
    """The checkpoint for these products (trained now, or found), its training record, and
    whether it was found in the cache."""
    encoder = untrained_encoder(settings)
    try:
        training = training_products(products)
        digest = hashlib.sha256(
            json.dumps(
                [encoder.base_version, FEATURE_FORMAT, asdict(config)], sort_keys=True
            ).encode()
        )
        for product in training:
            digest.update(product.key.encode())
            digest.update(hashlib.sha256(product.image).digest())
        path = (
            settings.state_dir / "demo" / "models" / f"fusion-{digest.hexdigest()[:16]}.safetensors"
        )
        if path.is_file():
            return path, load_fusion(path).training, True

        trained = train_checkpoint(
            encoder,
            training,
            config,
            state_dir=settings.state_dir,
            out=path,
            on_evaluation=lambda record: print(progress_line(record), flush=True),
        )
        return path, trained.result.record(config), False
    finally:
        encoder.close()
