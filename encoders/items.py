"""What goes into the model and what comes out of it, one item at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loupe.encoders.errors import ItemRejected

VIEWS = ("image", "text", "fused")


@dataclass(frozen=True)
class EncodeInput:
    """One product or query. Products carry both; queries may lack either (not both)."""

    image: bytes | None = None
    media_type: str | None = None  # declared type, checked against the content if given
    text: str | None = None
    # The text is a shopper's query, not a product's (a text tower may read the two with
    # different prefixes: e5's "query: " and "passage: "). encode_queries sets it.
    query: bool = False


@dataclass(frozen=True)
class Region:
    """The part of a query photo where the product is (``encoders/regions.py``)."""

    box: tuple[float, float, float, float]  # left, top, width, height: shares of the square
    image: np.ndarray  # that part's image-view unit vector (the tower's, from encode_towers)


@dataclass
class Encoded:
    """Per-view unit vectors that exist for an item, or why it could not be encoded; a photo
    query also has the ``regions`` where its product may be, when the encoder looks for them
    (one per region share, in their order; fewer where a part's vector failed)."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    error: ItemRejected | None = None
    regions: list[Region] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def check_inputs(items: Sequence[EncodeInput], kind: str) -> None:
    """A ``product`` needs a photo and text; a ``query`` or ``item`` either. Raises ValueError
    naming the first that does not."""
    for index, item in enumerate(items):
        if kind == "product" and (item.image is None or not item.text):
            raise ValueError(f"product {index} needs both an image and text")
        if item.image is None and not item.text:
            raise ValueError(f"{kind} {index} has neither an image nor text")
