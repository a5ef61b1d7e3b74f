"""The model's configuration written once: ``ModelProfile`` declares it, ``RECIPE`` names the part
that decides the vectors, the settings fill it field by field, and a collection's card keeps the
recipe in the format cards have always had."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loupe.consumers.index.catalog import CardError, CollectionCard, ModelCard
from loupe.consumers.settings import Settings
from loupe.encoders.profile import RECIPE, ModelProfile

# A card as Loupe 0.x wrote it before LOUPE_IMAGE_SIDE existed.
BEFORE_IMAGE_SIDE = {
    "format": 1,
    "model": {
        "model_version": "m-old",
        "image_backbone": "efficientnet-lite0",
        "text_backbone": "all-minilm-l6-v2",
        "image_weights": None,
        "text_weights": None,
        "fusion_checkpoint": None,
        "image_weight": 0.5,
        "fit": "pad",
        "image_pooling": "avg",
        "max_text_tokens": 128,
    },
    "state": "live",
    "applied_offsets": {"loupe.products.v1:0": 7},
}


def test_every_profile_field_is_a_setting_and_each_setting_reaches_the_profile():
    changed = Settings(
        image_fit="center_crop", encode_batch_size=8, allow_model_download=True, image_side=224
    ).model_profile()
    assert (changed.fit, changed.batch_size, changed.allow_download) == ("center_crop", 8, True)
    assert changed.image_side == 224
    assert Settings().model_profile() == ModelProfile(), "the settings' defaults are the profile's"


def test_the_recipe_is_the_profile_fields_that_decide_the_vectors(tmp_path):
    fields = {f.name for f in dataclasses.fields(ModelProfile)}
    assert set(RECIPE) <= fields
    assert not {"device", "precision", "batch_size", "encoder_backend"} & set(RECIPE)
    checkpoint = tmp_path / "fusion.pt"
    here = ModelProfile(fusion_checkpoint=Path("fusion.pt"), image_side=224, device="cpu")
    recipe = dataclasses.replace(here, fusion_checkpoint=checkpoint).recipe()
    assert recipe["fusion_checkpoint"] == str(checkpoint.resolve())
    elsewhere = ModelProfile(device="cuda", batch_size=64).following(recipe)
    assert (elsewhere.image_side, elsewhere.fusion_checkpoint) == (224, checkpoint.resolve())
    assert (elsewhere.device, elsewhere.batch_size) == ("cuda", 64), "how it runs stays local"
    with pytest.raises(ValueError, match="not part of a model's recipe: device"):
        ModelProfile().following({"device": "cpu"})


def test_a_card_keeps_its_recipe_and_reads_cards_written_before_a_field_existed():
    card = CollectionCard(ModelCard.of(ModelProfile(image_side=320), "m1"), "live")
    raw = card.to_dict()
    assert raw["model"] == {"model_version": "m1", **ModelProfile(image_side=320).recipe()}
    assert CollectionCard.from_dict(raw) == card

    old = CollectionCard.from_dict(BEFORE_IMAGE_SIDE)
    assert old.model.recipe["image_side"] is None, "the backbone's own side, as it meant"
    assert old.model.profile(ModelProfile()).image_pooling == "avg"
    assert old.to_dict()["model"] == {**BEFORE_IMAGE_SIDE["model"], "image_side": None}

    broken = {**BEFORE_IMAGE_SIDE, "model": {**BEFORE_IMAGE_SIDE["model"]}}
    del broken["model"]["text_backbone"]
    with pytest.raises(CardError, match="lacks text_backbone"):
        CollectionCard.from_dict(broken)
