"""Every engine behind one interface, held to the same tests: qdrant-client's local mode
(QdrantIndex on a path), Qdrant Edge (EdgeIndex) and a real Qdrant server (QdrantIndex on a URL,
the session's server process: these cases are marked integration). The same data and queries
return the same hits (all search exactly at this size), the same versions, deletes, filters,
alias and errors; int8 storage rescored returns the exact hits too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loupe.consumers.index.edge import EdgeIndex
from loupe.consumers.index.interface import IndexPoint, IndexQuery
from loupe.schemas.search import SearchFilters
from tests.conftest import EMBEDDED_ENGINES, ENGINE_NAMES, SERVER_ENGINES

DIMS = {"image": 8, "text": 4, "fused": 12}
ENGINES = [*EMBEDDED_ENGINES, *SERVER_ENGINES]


@pytest.fixture
def engines(index_engines) -> dict:
    """Engine name -> ``make(path, version)``: a handle owning its store."""
    return {
        name: (lambda path, version="m1", name=name: index_engines.handle(name, path, version))
        for name in ENGINES
    }


def _points(count: int = 90, seed: int = 5) -> list[IndexPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for n in range(count):
        merchant = ("a", "b")[n % 2]
        points.append(
            IndexPoint(
                merchant_id=merchant,
                product_id=f"p{n}",
                vectors={v: rng.standard_normal(d).astype(np.float32) for v, d in DIMS.items()},
                payload={
                    "merchant_id": merchant,
                    "product_id": f"p{n}",
                    "category": ("ring", "bangle", "pendant")[n % 3],
                    "material": ("gold", "silver")[n % 2],
                    "price": float(100 * n),
                    "currency": "INR",
                    "attributes": {"stone": ("ruby", "pearl")[n % 2], "carat": n % 4},
                    "version": 1,
                },
                version=1,
            )
        )
    return points


QUERIES = [
    ("image", 5, None, SearchFilters()),
    ("text", 7, "a", SearchFilters()),
    ("fused", 6, None, SearchFilters(category=["Ring", "pendant"])),
    ("image", 10, "b", SearchFilters(price_min=1000, price_max=5000)),
    ("text", 4, None, SearchFilters(currency="INR", attributes={"stone": "pearl", "carat": 1})),
    ("fused", 3, "a", SearchFilters(material=["gold"], attributes={"carat": 2.5})),
]


def _queries(seed: int = 9) -> list[IndexQuery]:
    rng = np.random.default_rng(seed)
    return [
        IndexQuery(
            view, rng.standard_normal(DIMS[view]).astype(np.float32), k, merchant, f, ("image",)
        )
        for view, k, merchant, f in QUERIES
    ]


@pytest.fixture(params=ENGINE_NAMES)
def index(request, tmp_path, engines):
    idx = engines[request.param](str(tmp_path / "index"))
    idx.ensure_collection(DIMS)
    idx.upsert(_points())
    yield idx
    idx.close()


@pytest.mark.integration
def test_every_engine_returns_the_same_hits(tmp_path, engines):
    results = {}
    for name, make in engines.items():
        idx = make(str(tmp_path / name))
        idx.ensure_collection(DIMS)
        idx.upsert(_points())
        results[name] = [
            [(h.id, round(h.score, 5)) for h in hits] for hits in idx.search_batch(_queries())
        ]
        idx.close()
    assert results["edge"] == results["qdrant-local"]
    assert results["edge-int8"] == results["qdrant-local"]
    assert results["server"] == results["qdrant-local"]
    assert results["server-int8"] == results["qdrant-local"]
    assert [len(hits) for hits in results["edge"]][:3] == [5, 7, 6]


def test_filters_scope_and_vectors(index):
    batched = index.search_batch(_queries())
    assert {h.payload["merchant_id"] for h in batched[1]} == {"a"}
    assert {h.payload["category"] for h in batched[2]} <= {"ring", "pendant"}
    assert all(1000 <= h.payload["price"] <= 5000 for h in batched[3])
    assert all(h.payload["attributes"]["stone"] == "pearl" for h in batched[4])
    assert batched[5] == [], "no carat is 2.5"
    assert all(set(h.vectors) == {"image"} for hits in batched for h in hits)
    for hits in batched:
        for hit in hits:
            assert np.isclose(np.linalg.norm(hit.vectors["image"]), 1.0, atol=1e-4)


def test_versions_deletes_and_counts(index):
    points = _points()
    assert index.count() == 90
    assert index.stored_versions([points[0].id, "00000000-0000-0000-0000-000000000000"]) == {
        points[0].id: 1
    }
    index.delete([points[0].id, points[1].id])
    assert index.count() == 88
    assert index.stored_versions([points[0].id]) == {}
    index.upsert(_points(2))  # a replay: the same ids again, one point each
    assert index.count() == 90


def test_an_unknown_view_is_a_value_error(index):
    bad = IndexQuery("colour", np.zeros(3, dtype=np.float32), 1, None, SearchFilters())
    with pytest.raises(ValueError, match="unknown view 'colour'"):
        index.search_batch([bad])


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_the_alias_follows_the_newest_model_version(engine, tmp_path, engines):
    path = str(tmp_path / "index")
    for version in ("m1", "m2"):
        idx = engines[engine](path, version)
        idx.ensure_collection(DIMS)
        idx.store.switch_alias(idx.collection)  # what the Catalog does to make one live
        idx.close()
    if engine.startswith("edge"):
        aliases = json.loads((tmp_path / "index" / "aliases.json").read_text())
        assert aliases == {"loupe": "loupe__m2"}
    elif engine.startswith("server"):
        idx = engines[engine](path, "m2")
        store = idx.store
        assert store.live_collection() == f"{store.alias}__m2"
        live = {a.alias_name: a.collection_name for a in store.client.get_aliases().aliases}
        idx.close()
        assert live[store.alias] == f"{store.alias}__m2"
    else:
        from qdrant_client import QdrantClient

        client = QdrantClient(path=path)
        live = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        client.close()
        assert live == {"loupe": "loupe__m2"}


def test_an_int8_shard_finds_the_exact_neighbours(tmp_path):
    """The int8 copies rank the candidates and the float32 vectors on disk rescore them: the
    top ten is still the exact one (recall@10 against numpy >= 0.98) for queries that are
    noisy copies of stored points, as a shopper's photo is. (The million-point build is
    ``bench.index_scale --quantization int8``.)"""
    rng = np.random.default_rng(3)
    dims = {"image": 64, "text": 16, "fused": 80}
    count, groups = 6000, rng.integers(0, 120, 6000)
    centres = {v: rng.standard_normal((120, d)) for v, d in dims.items()}
    vectors = {
        v: (centres[v][groups] + 0.8 * rng.standard_normal((count, d))).astype(np.float32)
        for v, d in dims.items()
    }
    unit = vectors["image"] / np.linalg.norm(vectors["image"], axis=1, keepdims=True)
    index = EdgeIndex(model_version="q", path=str(tmp_path), quantization="int8")
    try:
        index.ensure_collection(dims)
        for start in range(0, count, 1000):
            index.upsert(
                [
                    IndexPoint(
                        merchant_id="m",
                        product_id=f"p{i}",
                        vectors={v: vectors[v][i] for v in dims},
                        payload={"merchant_id": "m", "product_id": f"p{i}", "n": i},
                    )
                    for i in range(start, start + 1000)
                ]
            )
        index.optimize()
        picks = rng.integers(0, count, 40)
        queries = unit[picks] + 0.3 * rng.standard_normal((40, 64)).astype(np.float32) / 8
        found = index.search_batch(
            [IndexQuery("image", q, 10, "m", SearchFilters()) for q in queries]
        )
    finally:
        index.close()
    exact = np.argsort(-(queries @ unit.T), axis=1)[:, :10]
    recall = np.mean(
        [
            len({h.payload["n"] for h in hits} & set(e)) / 10
            for hits, e in zip(found, exact, strict=True)
        ]
    )
    assert recall >= 0.98, recall
