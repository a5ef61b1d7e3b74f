"""The fused model's entry point on real jewelry photos (default profile, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.errors import Rejection
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.preprocess import compose_product_text
from loupe.evaluation.photos import nearest_category_accuracy

TOLERANCE = 1e-4  # batch composition changes CPU kernel blocking, not results beyond this


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def encoder():
    model = FusedEncoder.from_profile(ModelProfile(batch_size=32))
    yield model
    model.close()


_product = encode_input


def test_products_get_three_unit_vectors_of_the_reported_sizes(encoder, catalog):
    results = encoder.encode_products([_product(p) for p in catalog[:3]])
    for result in results:
        assert result.ok
        assert {k: v.shape[0] for k, v in result.vectors.items()} == encoder.dims
        for vector in result.vectors.values():
            assert vector.dtype == np.float32
            assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_one_bad_image_fails_only_its_item(encoder, catalog):
    items = [_product(p) for p in catalog[:4]]
    items.insert(2, EncodeInput(image=b"\xff\xd8\xff truncated", media_type="image/jpeg", text="x"))
    results = encoder.encode_products(items)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert results[2].error.reason == Rejection.IMAGE_INVALID
    assert results[2].vectors == {}


def test_an_item_alone_equals_the_same_item_in_a_batch_of_32(encoder, catalog):
    items = [_product(p) for p in catalog[:32]]
    batched = encoder.encode_products(items)
    alone = encoder.encode_products([items[17]])
    for view in ("image", "text", "fused"):
        np.testing.assert_allclose(
            alone[0].vectors[view], batched[17].vectors[view], atol=TOLERANCE
        )


def test_batches_larger_than_the_batch_size_keep_order(catalog):
    small = FusedEncoder.from_profile(ModelProfile(batch_size=3))
    items = [_product(p) for p in catalog[:7]]
    split = small.encode_products(items)
    whole = FusedEncoder.from_profile(ModelProfile(batch_size=32)).encode_products(items)
    for a, b in zip(split, whole, strict=True):
        np.testing.assert_allclose(a.vectors["fused"], b.vectors["fused"], atol=TOLERANCE)
    small.close()


def test_queries_get_the_views_their_modalities_allow(encoder, catalog):
    photo = catalog[0].image_path.read_bytes()
    results = encoder.encode_queries(
        [
            EncodeInput(image=photo),
            EncodeInput(text="rose gold ring"),
            EncodeInput(photo, None, "ring"),
        ]
    )
    assert [sorted(r.vectors) for r in results] == [["image"], ["text"], ["fused", "image", "text"]]


def test_encoding_is_deterministic(encoder, catalog):
    first = encoder.encode_products([_product(catalog[5])])[0]
    second = encoder.encode_products([_product(catalog[5])])[0]
    for view in first.vectors:
        assert np.array_equal(first.vectors[view], second.vectors[view])


def test_inputs_without_what_they_need_are_refused(encoder):
    with pytest.raises(ValueError, match="product 0 needs both an image and text"):
        encoder.encode_products([EncodeInput(text="no photo")])
    with pytest.raises(ValueError, match="query 0 has neither"):
        encoder.encode_queries([EncodeInput()])


def test_model_version_names_weights_and_preprocessing(encoder):
    assert encoder.model_version.startswith("efficientnet-lite0-57934424.all-minilm-l6-v2-")
    assert ".pad288-gem-t128.fusion-" in encoder.model_version
    same = FusedEncoder.from_profile(ModelProfile(batch_size=32))
    assert same.model_version == encoder.model_version, "a restart must not change the version"
    same.close()
    other = FusedEncoder.from_profile(ModelProfile(fit="center_crop", image_weight=0.7))
    assert other.model_version != encoder.model_version
    assert ".center_crop288-" in other.model_version
    other.close()
    averaged = FusedEncoder.from_profile(ModelProfile(image_pooling="avg"))
    assert ".pad288-avg-t128." in averaged.model_version
    assert averaged.base_version != encoder.base_version
    averaged.close()
    backbones_own = FusedEncoder.from_profile(ModelProfile(image_side=None))
    assert ".pad224-gem-t128." in backbones_own.model_version, "EfficientNet-Lite0's 224"
    assert backbones_own.preprocessor.side == 224
    backbones_own.close()
    with pytest.raises(ValueError, match="multiple of 32"):
        FusedEncoder.from_profile(ModelProfile(image_side=300))


def test_product_text_puts_the_title_first():
    text = compose_product_text("Gold Ring", {"stone": ["ruby", "pearl"], "weight_g": 2}, "Nice.")
    assert text == "Gold Ring. stone: ruby, pearl; weight g: 2. Nice."


@pytest.mark.slow  # a full-catalog evaluation: the quality floor, not a unit's behaviour
def test_pretrained_weights_beat_random_ones_by_a_wide_margin(encoder, catalog):
    """Image-only nearest neighbour by category, leave-one-out, on the 236 real photos."""
    labels = [p.category for p in catalog]
    queries = [EncodeInput(image=p.image_path.read_bytes()) for p in catalog]
    pretrained = np.stack([r.vectors["image"] for r in encoder.encode_queries(queries)])
    random_model = FusedEncoder.from_profile(ModelProfile(image_weights="random"))
    random_vectors = np.stack([r.vectors["image"] for r in random_model.encode_queries(queries)])
    random_model.close()
    accuracy = nearest_category_accuracy(pretrained, labels)
    baseline = nearest_category_accuracy(random_vectors, labels)
    print(f"LOO category accuracy: pretrained {accuracy:.1%}, random {baseline:.1%}")
    assert accuracy >= 0.85
    # Random CNN features already sort white-backdrop silhouettes (about 70% here, chance is
    # 17%), so the margin is stated in errors: pretrained must make at most half as many.
    assert (1 - accuracy) <= 0.5 * (1 - baseline)


def test_embed_cli_prints_views_and_version(catalog, capsys):
    from loupe.cli import main

    photo = str(catalog[0].image_path)
    assert main(["embed", "--image", photo, "--text", "gold bangle"]) == 0
    out = capsys.readouterr().out
    assert "model version: efficientnet-lite0-" in out
    for view, dim in (("image", 1280), ("text", 384), ("fused", 1664)):
        assert f"{view:<6} dim {dim:>5}  norm 1.0000" in out


def test_embed_cli_reports_a_bad_image(tmp_path, capsys):
    from loupe.cli import main

    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    assert main(["embed", "--image", str(bad)]) == 1
    assert "error image_invalid: not a JPEG, PNG or WebP image" in capsys.readouterr().out


def test_texts_are_batched_by_length_and_answered_in_order(encoder, catalog):
    """Training encodes a product's description among a dozen short queries: batched as they
    come, every micro-batch would be padded to the description's length."""
    small = encoder.with_options(batch_size=4)
    long_text = _product(catalog[0]).text
    items = [
        EncodeInput(text=long_text if i % 4 == 0 else f"ring {i}", query=True) for i in range(8)
    ]
    widths: list[int] = []
    hook = small.text_encoder.register_forward_hook(
        lambda module, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    try:
        batched = small.encode_queries(items)
    finally:
        hook.remove()
        small.close()
    assert len(widths) == 2 and min(widths) <= 8 < max(widths), widths
    alone = [encoder.encode_queries([item])[0] for item in items]
    for one, other in zip(alone, batched, strict=True):
        np.testing.assert_allclose(one.vectors["text"], other.vectors["text"], atol=TOLERANCE)
