"""How a photo's answer is ranked: the photographed product first, then its kind.

A photo + text query searches the fused view, whose neighbours are of the kind the words name.
But the words ("diamond ring") do not say *which* ring, and the fused view gives them half the
say: a look-alike of the right kind can outrank the photographed product there, where the image
view would have put it first. So the answer is the image view's best match (the *anchor*) first,
then the fused view's ranking without it. Finding the photographed product is then never worse
than with the photo alone, and the rest of the answer keeps the words' category.

A photo alone names no kind at all: its image view's neighbours after the best match are
look-alikes of any kind (a pendant's chain next to a chain necklace). ``kind_kept`` (off unless
``LOUPE_PHOTO_KIND_WEIGHT`` is set) keeps the best match first and ranks the next candidates by
their image cosine plus that weight times their fused-view cosine with the best match, the
photographed product's look and then its kind (docs/training.md, "Limits", measures it).

A photo query is encoded whole and in parts around where its product is
(``encoders/regions.py``): ``answering_part`` says which answers it, the closest part where
``sharper`` says it beats the whole. A product
lying in a wider scene is then matched by itself, and a photo that is all product keeps its own
answer (the part of it matches less well than the whole).

The service (``workers.search``) and the training's evaluation (``loupe.train.evaluate``) both
rank with these, so the measured numbers are the service's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Candidates a photo query's image view is asked for when its answer keeps the best match's
# kind: the measured trade-off (docs/training.md) re-ranked the image view's top 50.
KIND_CANDIDATES = 50


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


def kind_kept(
    candidates: Sequence[T],
    k: int,
    weight: float,
    score: Callable[[T], float],
    fused: Callable[[T], np.ndarray | None],
) -> list[T]:
    """``candidates`` (best first, by ``score``: the image cosine) re-ranked after the first by
    ``score + weight * cos(fused(first), fused(item))``, ``k`` items at most. ``weight`` 0, or
    a first candidate without a fused vector, keeps the order; a later one without it is
    ranked by its score alone."""
    if weight <= 0 or len(candidates) < 2:
        return list(candidates[:k])
    first = fused(candidates[0])
    if first is None:
        return list(candidates[:k])
    first = first / max(float(np.linalg.norm(first)), 1e-12)

    def combined(item: T) -> float:
        vector = fused(item)
        if vector is None:
            return score(item)
        cosine = float(np.dot(first, vector)) / max(float(np.linalg.norm(vector)), 1e-12)
        return score(item) + weight * cosine

    rest = sorted(candidates[1:], key=combined, reverse=True)  # stable: ties keep their order
    return [candidates[0], *rest][: max(k, 0)]


def sharper(whole_best: float, region_best: float | None) -> bool:
    """Whether a photo query is answered by its region: its best match is closer than the whole
    photo's best match (``region_best`` None: the photo has no region)."""
    return region_best is not None and region_best > whole_best


def answering_part(whole_best: float | None, part_bests: Sequence[float | None]) -> int | None:
    """Which part of a photo query answers it, by its index in ``part_bests`` (each part's best
    match score, None where it has none), or None for the whole photo: the part whose best match
    is closest (the first of equals), where ``sharper`` says it beats the whole's."""
    scored = [(score, k) for k, score in enumerate(part_bests) if score is not None]
    if whole_best is None or not scored:
        return None
    best, closest = max(scored, key=lambda pair: pair[0])  # max keeps the first of equals
    return closest if sharper(whole_best, best) else None
