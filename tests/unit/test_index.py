"""The index layer without a server: ids, filters, and an unreachable server's error policy."""

from __future__ import annotations

import pytest

from loupe.consumers.index.interface import collection_name, point_id
from loupe.consumers.index.qdrant import build_filter
from loupe.schemas.search import SearchFilters


def test_point_ids_are_deterministic_and_unambiguous():
    assert point_id("giva", "R1") == point_id("giva", "R1")
    assert point_id("a/b", "c") != point_id("a", "b/c")
    assert point_id("giva", "R1") != point_id("other", "R1")


def test_collection_names_are_safe():
    assert collection_name("loupe", "m1 v2/x") == "loupe__m1_v2_x"


def test_filters_become_qdrant_conditions():
    flt = build_filter(
        "giva",
        SearchFilters(
            category=["Ring", "earring"],
            price_max=5000,
            currency="INR",
            attributes={"plating": "rose gold", "adjustable": True},
        ),
    )
    conditions = {c.key: c for c in flt.must}
    assert conditions["merchant_id"].match.value == "giva"
    assert conditions["category"].match.any == ["ring", "earring"], "matched lower-case"
    assert conditions["price"].range.lte == 5000 and conditions["price"].range.gte is None
    assert conditions["currency"].match.value == "INR"
    assert conditions["attributes.plating"].match.value == "rose gold"
    assert conditions["attributes.adjustable"].match.value is True
    assert build_filter(None, SearchFilters()) is None


def test_an_unreachable_qdrant_server_is_index_unavailable():
    """The retry policy's trigger: a server URL that refuses (a closed loopback port)."""
    from loupe.consumers.errors import IndexUnavailable
    from loupe.consumers.index.qdrant import QdrantIndex
    from loupe.dev.kafka import free_loopback_port

    index = QdrantIndex(
        model_version="m1", url=f"http://127.0.0.1:{free_loopback_port()}", timeout_s=2
    )
    with pytest.raises(IndexUnavailable, match="Qdrant count failed"):
        index.count()
    with pytest.raises(IndexUnavailable):
        index.ensure_collection({"image": 4, "text": 3, "fused": 7})
    index.close()


@pytest.mark.parametrize("engine", ["edge", "qdrant-local"])
def test_how_the_graph_is_searched_reaches_every_collection_of_the_index(engine, tmp_path):
    from pydantic import ValidationError

    from loupe.consumers.service.app import build_catalog
    from loupe.consumers.settings import Settings

    settings = Settings(
        state_dir=tmp_path,
        index_engine=engine,
        index_hnsw_ef=300,
        index_acorn=False,
        index_quantization="int8",
    )
    catalog = build_catalog(settings)
    try:
        for model_version in ("m1", "m2"):
            store = catalog.open(model_version).store
            assert (store.hnsw_ef, store.acorn, store.quantization) == (300, False, "int8")
    finally:
        catalog.close()
    with pytest.raises(ValidationError, match="index_hnsw_ef"):
        Settings(state_dir=tmp_path, index_hnsw_ef=0)
    with pytest.raises(ValidationError, match="index_quantization"):
        Settings(state_dir=tmp_path, index_quantization="int4")


def test_a_payload_round_trips_and_an_older_one_reads_with_its_gaps_empty():
    from loupe.consumers.index.interface import ProductPayload

    payload = ProductPayload(
        merchant_id="m", product_id="p", title="Ring", description="", attributes={"k": 1},
        category="ring", subcategory=None, material="gold", price=9.5, price_amount="9.50",
        currency="EUR", image_url="https://cdn.example/p.jpg", version=3, model_version="v",
        event_id="e", indexed_at="2026-12-03T00:00:00+00:00",
    )  # fmt: skip
    assert ProductPayload.from_dict(payload.to_dict()) == payload
    old = ProductPayload.from_dict({"merchant_id": "m", "product_id": "p", "extra": 1})
    assert (old.title, old.attributes, old.price, old.version) == ("", {}, None, None)


def test_the_version_rule():
    from loupe.schemas.products import is_stale

    assert is_stale(1, 2) and not is_stale(2, 2) and not is_stale(3, 2)
    assert not is_stale(None, 2) and not is_stale(1, None), "unversioned follows Kafka's order"
