"""The one batching helper: every batch in Loupe is made here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
