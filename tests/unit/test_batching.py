"""The batching helpers: by count and by budget."""

from __future__ import annotations

import pytest

from loupe.encoders.batching import iter_batch, iter_budget


def test_iter_batch_keeps_order_and_size():
    assert list(iter_batch(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_batch([], 3)) == []


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_iter_batch_refuses_a_bad_size(size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(iter_batch([1], size))


def test_iter_budget_keeps_each_batch_within_its_budget():
    costs = [4, 3, 2, 5, 1, 1]
    batches = list(iter_budget(costs, lambda c: c, 7))
    assert batches == [[4, 3], [2, 5], [1, 1]]
    assert all(sum(b) <= 7 for b in batches)


def test_iter_budget_yields_an_oversized_item_alone():
    assert list(iter_budget([2, 50, 3], lambda c: c, 10)) == [[2], [50], [3]]


def test_iter_budget_is_lazy():
    seen = []

    def cost(item):
        seen.append(item)
        return 1

    first = next(iter_budget(iter(range(100)), cost, 2))
    assert first == [0, 1] and seen == [0, 1, 2]


def test_iter_budget_refuses_a_bad_budget():
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        next(iter_budget([1], lambda c: c, 0))
