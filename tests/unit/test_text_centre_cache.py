"""The text tower's centre, computed on its first start and read back on the later ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loupe.encoders import text_centre


class _Tower:
    """What the cache reads of a text tower: its width and where its weights are."""

    def __init__(self, dim: int = 4) -> None:
        self.dim = dim
        self.model = nn.Linear(2, dim)


@pytest.fixture
def computed(monkeypatch):
    """Counts the centres actually computed, each a new value."""
    calls = []

    def mean_direction(tower, texts=text_centre.REFERENCE_TEXTS):
        calls.append(tower)
        return torch.full((tower.dim,), float(len(calls)))

    monkeypatch.setattr(text_centre, "mean_direction", mean_direction)
    return calls


def test_a_later_start_reads_the_centre_the_first_one_computed(tmp_path, computed):
    first = text_centre.cached_mean_direction(_Tower(), "tower-abc", tmp_path)
    again = text_centre.cached_mean_direction(_Tower(), "tower-abc", tmp_path)
    assert len(computed) == 1
    assert torch.equal(first, again)


def test_another_key_is_another_centre(tmp_path, computed):
    one = text_centre.cached_mean_direction(_Tower(), "tower-abc", tmp_path)
    other = text_centre.cached_mean_direction(_Tower(), "tower-def", tmp_path)
    assert len(computed) == 2
    assert not torch.equal(one, other)


@pytest.mark.parametrize(
    "content", [b"", b"not a tensor", "wrong width"], ids=["empty", "garbage", "wrong-width"]
)
def test_a_file_that_is_not_this_towers_centre_is_computed_again(tmp_path, computed, content):
    path = tmp_path / "tower-abc.pt"
    if content == "wrong width":
        torch.save(torch.zeros(7), path)
    else:
        path.write_bytes(content)
    centre = text_centre.cached_mean_direction(_Tower(), "tower-abc", tmp_path)
    assert len(computed) == 1
    assert centre.shape == (4,)
    assert torch.equal(torch.load(path, weights_only=True), centre)  # and written over


def test_a_cache_that_cannot_be_written_only_costs_the_computation(tmp_path, computed):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory should be")
    centre = text_centre.cached_mean_direction(_Tower(), "tower-abc", blocked)
    assert centre.shape == (4,)
    assert len(computed) == 1
