"""The one batching helper: every batch in Loupe is made here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def iter_batch(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Yield lists of at most ``batch_size`` items, lazily, in order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    iterator = iter(items)
    while batch := list(islice(iterator, batch_size)):
        yield batch


def iter_budget(items: Iterable[T], cost: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Yield lists whose summed ``cost`` stays within ``budget``, lazily, in order.

    An item that alone costs more than the budget is yielded by itself: the budget bounds how
    much is held at once, and the item's own limits decide whether it is allowed at all.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    batch: list[T] = []
    spent = 0
    for item in items:
        item_cost = cost(item)
        if batch and spent + item_cost > budget:
            yield batch
            batch, spent = [], 0
        batch.append(item)
        spent += item_cost
    if batch:
        yield batch
