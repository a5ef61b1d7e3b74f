"""How a photo + text query's answer is ranked: the photographed product first, then its kind.

A photo + text query searches the fused view, whose neighbours are of the kind the words name.
But the words ("diamond ring") do not say *which* ring, and the fused view gives them half the
say: a look-alike of the right kind can outrank the photographed product there, where the image
view would have put it first. So the answer is the image view's best match (the *anchor*) first,
then the fused view's ranking without it. Finding the photographed product is then never worse
than with the photo alone, and the rest of the answer keeps the words' category.

The service (``search_service``) and the training's evaluation (``loupe.train.evaluate``) both
rank with ``anchored``, so the measured numbers are the service's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def anchored(
    ranked: Sequence[T],
    anchor: T | None,
    k: int,
    key: Callable[[T], Hashable] = lambda item: item,
) -> list[T]:
    """``anchor`` first, then ``ranked`` without it, ``k`` items at most. ``key`` tells when an
    item of ``ranked`` is the anchor."""
    if anchor is None:
        return list(ranked[:k])
    first = key(anchor)
    return [anchor, *(item for item in ranked if key(item) != first)][:k]
