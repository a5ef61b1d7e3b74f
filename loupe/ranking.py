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
(``encoders/regions.py``): ``best_of`` ranks each product at its closest part's score (the whole
photo being one of them). A product lying in a wider scene is then matched by itself, and a
photo that is all product keeps its own answer (a part of it matches less well than the whole).

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


def best_of(
    lists: Sequence[Sequence[T]],
    key: Callable[[T], Hashable],
    score: Callable[[T], float],
) -> list[tuple[T, int]]:
    """The items of several ranked ``lists`` (a photo's whole, then each of its parts), each once
    at its best ``score``, best first, with the index of the list that scored it so (the first of
    equals): a product is as close as its closest part. The first item is the one the closest
    part found, so a photo is answered first by whichever of its parts matches best; the rest
    are ranked by the same rule, so that the product a part found but the whole ranked low is
    not left out of the top ten. ``best_scores`` is the same rule on score matrices."""
    best: dict[Hashable, tuple[T, int]] = {}
    for source, items in enumerate(lists):
        for item in items:
            name = key(item)
            if name not in best or score(item) > score(best[name][0]):
                best[name] = (item, source)
    return sorted(best.values(), key=lambda pair: score(pair[0]), reverse=True)  # stable


def best_scores(whole: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``best_of`` on whole score matrices: ``(Q, N)`` scores of each query's whole photo and
    ``(Q, k, N)`` of its parts to ``(Q, N)``, each product at its closest part's score."""
    if parts.shape[1] == 0:
        return whole
    return np.maximum(whole, parts.max(axis=1))
