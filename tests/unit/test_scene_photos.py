"""The evaluation family ``scenes``: the product cut out of its studio photo and photographed
lying on a surface, deterministic per seed, within the ranges its module names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from loupe.dev.catalog import load_catalog
from loupe.encoders.errors import ImageRejected
from loupe.encoders.images import DecodeLimits
from loupe.evaluation.scenes import LONG_SIDE, scene_photo
from loupe.evaluation.simulators import SIMULATORS


@pytest.fixture(scope="module")
def studio() -> bytes:
    return load_catalog()[40].image_path.read_bytes()


def test_a_scene_is_the_same_bytes_for_the_same_seed_and_another_for_another(studio):
    first = [scene_photo(studio, seed) for seed in range(6)]
    assert [scene_photo(studio, seed) for seed in range(6)] == first
    assert len(set(first)) == 6


def test_a_scene_is_a_phone_sized_jpeg_with_no_studio_white_left_around_the_product(studio):
    for seed in range(8):
        photo = Image.open(io.BytesIO(scene_photo(studio, seed)))
        assert photo.format == "JPEG"
        assert LONG_SIDE[0] <= max(photo.size) <= LONG_SIDE[1]
        pixels = np.asarray(photo.convert("L"))
        # The studio's white sweep was about three quarters of the catalog photo; in a scene,
        # only glare or a light surface comes near white.
        assert (pixels > 245).mean() < 0.25, seed


def test_scenes_is_an_evaluation_family_and_its_photos_decode_under_the_models_limits(studio):
    assert SIMULATORS["scenes"](studio, 3, None) == scene_photo(studio, 3)
    with pytest.raises(ImageRejected):
        scene_photo(studio, 0, DecodeLimits(max_image_bytes=1000))
