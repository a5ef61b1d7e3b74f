"""Finding the part of a query photo where the product is: the box around the tower's strongest
response, that part read at the tower's full size, and the box in the shopper's photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe.consumers.errors import ConfigError
from loupe.consumers.settings import load_settings
from loupe.dev.catalog import load_catalog
from loupe.encoders.device import Acceleration
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.preprocess import ImagePreprocessor, Photo
from loupe.encoders.profile import QUERY_REGION_SHARES as REGION_SHARES
from loupe.encoders.regions import (
    crop_photo,
    crop_regions,
    photo_box,
    region_boxes,
)
from loupe.evaluation.scenes import scene_photo


def test_the_box_is_centred_on_the_hottest_cell_and_kept_inside_the_square():
    heat = torch.zeros(3, 9, 9)
    heat[0, 4, 4] = 1.0  # the centre
    heat[1, 0, 8] = 1.0  # the top-right corner
    heat[2, 6, 1] = 1.0
    boxes = region_boxes(heat, share=0.4)
    assert boxes[0].tolist() == pytest.approx([0.3, 0.3, 0.4, 0.4])
    assert boxes[1].tolist() == pytest.approx([0.6, 0.0, 0.4, 0.4])  # moved inside
    assert boxes[2].tolist() == pytest.approx([0.0, 6.5 / 9 - 0.2, 0.4, 0.4])  # left edge
    with pytest.raises(ValueError, match="share"):
        region_boxes(heat, share=0.0)


def test_a_region_is_cut_from_the_pixels_and_read_at_full_size():
    pixels = torch.zeros(1, 3, 100, 100)
    pixels[:, :, 20:60, 40:80] = 1.0  # a white square: the box below
    crop = crop_regions(pixels, torch.tensor([[0.4, 0.2, 0.4, 0.4]]))
    assert crop.shape == (1, 3, 100, 100)
    assert float(crop.min()) == pytest.approx(1.0)


def test_a_region_is_cut_from_the_photo_as_decoded_at_its_own_resolution():
    upright = torch.zeros(3, 200, 400, dtype=torch.uint8)  # a wide photo: padded above, below
    upright[:, 50:130, 200:280] = 255  # an 80-pixel square: 0.2 of the model's square
    upright[:, 60:62, 210:270] = 0  # a 2-pixel line: kept at a 100-pixel side, not at 20
    box = (0.5, 0.25 + 50 / 400, 0.2, 0.2)  # that square, in shares of the model's square
    part = crop_photo(upright, box, 100, "pad")
    assert part.shape == (3, 100, 100)
    assert float(part[:, 20:80, 50].min()) == pytest.approx(1.0)  # the square fills the part
    assert float(part[:, 13, 20:80].max()) < 0.2, "the thin line survives: read, not enlarged"
    assert crop_photo(upright, (0.0, 0.0, 0.2, 0.2), 100, "pad") is None, "all padding"


def test_the_preprocessor_keeps_the_decoded_photos_it_is_asked_for(tmp_path):
    plain = Acceleration(
        amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=False
    )
    prep = ImagePreprocessor(side=64, device=torch.device("cpu"), acceleration=plain)
    catalog = load_catalog()[:2]
    photos = [Photo(catalog[0].image_path.read_bytes()), Photo(b"not a photo")]
    photos.append(Photo(catalog[1].image_path.read_bytes()))
    try:
        pixels, rows, failures, uprights = prep.batch_keeping(photos, keep=[1, 2])
        assert rows == [0, 2] and list(failures) == [1]
        assert list(uprights) == [2], "the failed photo is not kept, nor the one not asked for"
        assert uprights[2].dtype == torch.uint8 and uprights[2].shape[0] == 3
        assert min(uprights[2].shape[1:]) > 64, "decoded at more than the model's side"
        assert torch.equal(pixels, prep.batch(photos)[0]), "the pixels are batch's own"
    finally:
        prep.close()


@pytest.mark.parametrize(
    ("size", "fit", "box", "expected"),
    [
        ((400, 400), "pad", (0.1, 0.2, 0.4, 0.4), (0.1, 0.2, 0.4, 0.4)),
        ((400, 200), "pad", (0.0, 0.25, 0.5, 0.5), (0.0, 0.0, 0.5, 1.0)),  # the band's middle
        ((400, 200), "pad", (0.5, 0.0, 0.5, 0.5), (0.5, 0.0, 0.5, 0.5)),  # clipped to the photo
        ((400, 400), "squash", (0.1, 0.2, 0.4, 0.4), (0.1, 0.2, 0.4, 0.4)),
        ((800, 400), "center_crop", (0.0, 0.0, 1.0, 1.0), (0.28125, 0.0625, 0.4375, 0.875)),
    ],
)
def test_a_box_in_the_models_square_is_given_in_shares_of_the_photo(size, fit, box, expected):
    assert photo_box(box, *size, fit) == pytest.approx(expected)


@pytest.fixture(scope="module")
def encoders():
    served = FusedEncoder.from_profile(ModelProfile(batch_size=8))
    yield served, served.with_options(backend="torch")
    served.close()


def test_a_photo_query_has_a_region_on_either_backend_and_nothing_else_does(encoders):
    served, reference = encoders
    catalog = load_catalog()[:3]
    photos = [scene_photo(p.image_path.read_bytes(), i) for i, p in enumerate(catalog)]
    queries = [EncodeInput(image=p) for p in photos] + [EncodeInput(text="a gold ring")]
    ours, theirs = served.encode_queries(queries), reference.encode_queries(queries)
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert len(a.regions) == len(b.regions) == len(REGION_SHARES)
        for part, reference_part, share in zip(a.regions, b.regions, REGION_SHARES, strict=True):
            assert part.box == pytest.approx(reference_part.box, abs=1e-6)
            assert part.box[2] == pytest.approx(share), "one square of each share, in order"
            assert float(np.dot(part.image, reference_part.image)) >= 0.9999
            assert abs(float(np.linalg.norm(part.image)) - 1.0) < 1e-5
    assert ours[3].regions == []
    products = served.encode_products(
        [EncodeInput(image=photos[0], text="a product", media_type="image/jpeg")]
    )
    assert products[0].regions == [], "a catalog photo is indexed whole"
    off = served.with_options()
    off.runtime.query_regions = False
    try:
        assert off.encode_queries(queries[:1])[0].regions == []
    finally:
        off.close()


def test_a_photo_querys_parts_are_read_from_the_photo_as_decoded(encoders):
    served, _ = encoders
    photo = scene_photo(load_catalog()[5].image_path.read_bytes(), 7)
    (result,) = served.encode_towers([EncodeInput(image=photo, query=True)])
    runtime = served.runtime
    upright = runtime.preprocessor.upright(Photo(photo))
    pixels = runtime.preprocessor.one(Photo(photo))[None]
    side, fit = runtime.preprocessor.side, runtime.preprocessor.fit
    assert len(result.regions) == len(REGION_SHARES)
    for part in result.regions:
        expected = runtime.image_vectors(crop_photo(upright, part.box, side, fit)[None])
        assert float(np.dot(part.image, expected[0].numpy())) >= 0.9999
        enlarged = runtime.image_vectors(crop_regions(pixels, torch.tensor([part.box])))
        assert float(np.dot(part.image, enlarged[0].numpy())) < 0.999, (
            "not the model's pixels enlarged"
        )


def test_the_parts_searched_are_the_profiles_own(encoders, monkeypatch):
    served, _ = encoders
    photo = scene_photo(load_catalog()[2].image_path.read_bytes(), 1)
    one = served.with_options()
    one.runtime.region_shares = (0.5,)
    try:
        (result,) = one.encode_towers([EncodeInput(image=photo, query=True)])
        assert [part.box[2] for part in result.regions] == pytest.approx([0.5])
    finally:
        one.close()
    monkeypatch.setenv("LOUPE_QUERY_REGION_SHARES", "0.25, 0.5")
    assert load_settings().model_profile().query_region_shares == (0.25, 0.5)
    for wrong, message in [
        ("0.4,1.5", r"in \(0, 1\]"),
        ("big", "comma-separated"),
        (",", "1 to 8"),
    ]:
        monkeypatch.setenv("LOUPE_QUERY_REGION_SHARES", wrong)
        with pytest.raises(ConfigError, match=message):
            load_settings()
