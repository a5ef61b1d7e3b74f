"""How ``loupe train`` trains: one frozen dataclass, no torch, so the CLI can show its defaults
without loading the model stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    views: int = 12  # simulated shopper photos (and query texts) per product, cached
    holdout: float = 0.2  # share of products never trained on, measured apart
    steps: int = 600  # optimiser steps
    batch_size: int = 128  # products per step; the others in the batch are the negatives
    photos_per_product: int = 4  # shopper photos (each with a query text) per product per step
    fused_weight: float = 0.3  # weight of the fused view's InfoNCE (the image view's is 1)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05  # InfoNCE softmax temperature
    neighbourhood_weight: float = 1.0  # weight of the KL terms; 0 is InfoNCE alone (ablation)
    neighbourhood_temperature: float = 0.05
    # The fused query's neighbourhood target: the frozen fused view's similarities with this
    # share of the frozen text view's. The frozen fused view is half photo, and a phone photo's
    # noise outweighs the words; with the words' share a photo + text query's neighbours are
    # products of the kind it names (0: the fused view alone, the ablation).
    query_words_share: float = 0.75
    # Train the text view's head. Off: the text view (text-only queries) keeps the frozen
    # tower's vectors and the fusion reads them as they are. Trained, it gained nothing for
    # text-only queries and cost photo + text recall (bench.quality --ablation).
    train_text_head: bool = False
    # Train the image view's head. Off (the default): photo queries use the whitened tower
    # vectors as they are, and the fusion alone learns. On top of the whitening the head gave
    # photo-only answers more of the product's category after the first hit, and cost up to 4
    # points of R@1 on photos that cut the product (bench.quality --ablation; docs/training.md).
    train_image_head: bool = False
    head_rank: int = 128  # rank of the residual projection heads
    # The image view's whitening (``loupe.train.whitening``), fitted before the heads are
    # trained: its shrinkage toward the identity, larger keeps more of the tower's own
    # geometry; 0 fits none (the heads alone read the tower's vectors).
    whitening_shrinkage: float = 1.0
    # Steps tuning the image tower's last block before the heads (``loupe.train.tower``); 0
    # keeps the towers frozen, as they are pretrained.
    tower_steps: int = 0
    tower_batch_size: int = 64  # products per tower step
    tower_photos_per_product: int = 2  # shopper photos per product per tower step
    tower_learning_rate: float = 1e-4
    eval_every: int = 100  # steps between evaluations (progress lines)
    eval_queries: int = 2000  # products asked for per split and evaluation, at most (sampled)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be within [0, 1), got {self.holdout}")
        if not 0.0 <= self.query_words_share <= 1.0:
            raise ValueError(
                f"query_words_share must be within [0, 1], got {self.query_words_share}"
            )
        for name in (
            "views",
            "steps",
            "batch_size",
            "eval_every",
            "photos_per_product",
            "tower_batch_size",
            "tower_photos_per_product",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.whitening_shrinkage < 0:
            raise ValueError(
                f"whitening_shrinkage must be at least 0, got {self.whitening_shrinkage}"
            )
        if self.tower_steps < 0:
            raise ValueError(f"tower_steps must be at least 0, got {self.tower_steps}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (in-batch negatives), got {self.batch_size}"
            )
