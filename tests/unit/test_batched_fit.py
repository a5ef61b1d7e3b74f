"""``fit_batch``: many photos fitted together give exactly what each gives alone."""

from __future__ import annotations

import pytest
import torch

from loupe.encoders.images import fit_batch, fit_square, orient

SIDE = 32


def _photos() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [(40, 40), (90, 60), (40, 40), (60, 90), (90, 60), (32, 32), (7, 300), (40, 40)]
    return [
        torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in sizes
    ]


@pytest.mark.parametrize("fit", ["pad", "center_crop", "squash"])
@pytest.mark.parametrize("chunk_pixels", [1, 5_000, 10**9])
def test_a_batch_fits_each_photo_as_it_fits_alone(fit, chunk_pixels):
    photos = _photos()
    together = fit_batch(photos, SIDE, fit, chunk_pixels=chunk_pixels)
    assert together.shape == (len(photos), 3, SIDE, SIDE)
    for row, photo in enumerate(photos):
        assert torch.equal(together[row], fit_square(photo, SIDE, fit)), row


def test_oriented_views_group_by_their_upright_size():
    photos = _photos()
    oriented = [orient(photo, 6 if row % 2 else 1) for row, photo in enumerate(photos)]
    together = fit_batch(oriented, SIDE, "pad")
    for row, photo in enumerate(oriented):
        assert torch.equal(together[row], fit_square(photo.contiguous(), SIDE, "pad"))


def test_padding_is_white_and_the_photo_is_centred():
    tall = torch.zeros((3, 64, 32), dtype=torch.uint8)  # black, twice as tall as wide
    out = fit_batch([tall, tall], SIDE, "pad")
    assert torch.all(out[:, :, :, :8] == 1.0) and torch.all(out[:, :, :, 24:] == 1.0)
    assert torch.all(out[:, :, :, 8:24] == 0.0)


def test_no_photos_and_bad_fits():
    assert fit_batch([], SIDE, "pad").shape == (0, 3, SIDE, SIDE)
    with pytest.raises(ValueError, match="unknown fit"):
        fit_batch(_photos(), SIDE, "stretch")
