"""Encode once, index many, piece by piece: the vector record, the index writer on a real Edge
collection, the encoder's records and where its groups start. The whole hop runs against the
real broker in tests/integration (test_replicas.py, test_reindex.py)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.index.catalog import Catalog, CollectionCard, ModelCard
from loupe.consumers.index.edge import EdgeStore
from loupe.consumers.index.interface import IndexPoint, point_id
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.kafka.products_topics import MAX_TOPIC_NAME, ProductsTopics
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.lifecycle import CatchUp
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.encode import EncodeWorker
from loupe.consumers.workers.handover import HandOver
from loupe.consumers.workers.index_writer import IndexWorker
from loupe.consumers.workers.live_model import LiveModel, ModelInUse
from loupe.consumers.workers.product_stage import ProductStage
from loupe.consumers.workers.vectors import VectorsOut
from loupe.encoders.profile import ModelProfile
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.vectors import (
    MAX_VECTOR_RECORD_BYTES,
    SourcePosition,
    VectorRecord,
    parse_vector_record,
)
from tests.fakes import FakeConsumer

DIMS = {"image": 8, "text": 4, "fused": 12}
rng = np.random.default_rng(7)


def _vectors(dims=DIMS) -> dict[str, np.ndarray]:
    found = {}
    for view, n in dims.items():
        v = rng.standard_normal(n).astype(np.float32)
        found[view] = v / np.linalg.norm(v)
    return found


def _record(product: str, version: int | None, *, deleted=False, model="a", offset=0, dims=DIMS):
    return VectorRecord(
        collection=f"loupe__{model}",
        point_id=point_id("m", product),
        merchant_id="m",
        product_id=product,
        model_version=model,
        version=version,
        source=SourcePosition("products", offset % 2, offset),
        vectors=None if deleted else _vectors(dims),
        payload={} if deleted else {"title": f"ring {product}", "version": version},
    )


@dataclass(frozen=True)
class _Kafka:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: list = field(default_factory=list)


# --- the record ------------------------------------------------------------------------------


def test_a_vector_record_reads_back_exactly_in_the_shape_qdrants_sink_reads():
    record = _record("p1", 3, offset=41)
    raw = json.loads(record.to_json())
    assert set(raw) == {"collection_name", "id", "vector", "payload", "loupe"}
    assert raw["collection_name"] == "loupe__a" and raw["id"] == point_id("m", "p1")
    assert set(raw["vector"]) == {"image", "text", "fused"}  # named vectors
    back = parse_vector_record(record.to_json())
    for view, vector in record.vectors.items():
        assert np.array_equal(back.vectors[view], vector), "float32 round trip is exact"
    assert (back.version, back.source, back.payload) == (3, record.source, record.payload)
    gone = parse_vector_record(_record("p1", 4, deleted=True).to_json())
    assert gone.deleted and gone.version == 4 and "vector" not in json.loads(gone.to_json())


def _tampered(change) -> bytes:
    raw = json.loads(_record("p1", 1).to_json())
    change(raw)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("value", "code", "says"),
    [
        (b"", ErrorCode.INVALID_ENCODING, "empty"),
        (b"x" * (MAX_VECTOR_RECORD_BYTES + 1), ErrorCode.MESSAGE_TOO_LARGE, "exceeds"),
        (b"{not json", ErrorCode.INVALID_JSON, "not JSON"),
        (b'{"id": 1}', ErrorCode.INVALID_EVENT, "loupe"),
        (_tampered(lambda r: r["vector"].pop("text")), ErrorCode.INVALID_EVENT, "vector"),
        (
            _tampered(lambda r: r["vector"].update(image=["NaN"])),
            ErrorCode.INVALID_EVENT,
            "vector.image",
        ),
        (
            _tampered(lambda r: r["loupe"].update(version=True)),
            ErrorCode.INVALID_EVENT,
            "loupe.version",
        ),
        (_tampered(lambda r: r["loupe"].update(op="merge")), ErrorCode.INVALID_EVENT, "loupe.op"),
        (
            _tampered(lambda r: r["loupe"]["source"].update(offset=-1)),
            ErrorCode.INVALID_EVENT,
            "offset",
        ),
    ],
)
def test_a_bad_vector_record_is_refused_with_its_reason(value, code, says):
    with pytest.raises(InvalidEvent) as refused:
        parse_vector_record(value)
    assert refused.value.code == code and says in str(refused.value)


def test_non_finite_numbers_are_refused():
    value = _record("p1", 1).to_json().replace(b"[", b"[NaN,", 1)
    with pytest.raises(InvalidEvent, match="finite"):
        parse_vector_record(value)


def test_topic_and_group_names():
    names = KafkaNames.of(Settings(group_id="shop", replica_id="r1", vectors_topic="v"))
    assert names.vectors_topic("loupe__a") == "v.loupe__a"
    assert names.encode_group("loupe__a") == "shop.encode.loupe__a", "shared by replicas"
    assert names.index_group("loupe__a") == "shop.index.loupe__a.r1", "one per index"
    long_a, long_b = (names.vectors_topic("c" * 300 + s) for s in "ab")
    assert len(long_a) <= MAX_TOPIC_NAME and long_a != long_b
    with pytest.raises(ValueError):
        Settings(vectors_topic="no spaces")


# --- the index writer ------------------------------------------------------------------------


class _Publisher:
    def __init__(self) -> None:
        self.letters: list[tuple] = []
        self.sent: list[tuple] = []
        self.commits: list[dict] = []
        self.unsettled = False

    def dead_letter(self, record, code, message, stage) -> None:
        self.letters.append((record.offset, code, message))

    def send(self, topic, key, value, headers, reason=None, partition=None) -> None:
        self.sent.append((topic, key, value, partition))

    def commit(self, offsets, consumer) -> None:
        self.commits.append(offsets)

    def discard(self) -> None:
        self.sent = []


@dataclass
class _Encoder:
    model_version: str
    dims: dict = field(default_factory=lambda: dict(DIMS))
    batch_size: int = 8


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(EdgeStore(path=str(tmp_path / "index")))
    yield catalog
    catalog.close()


@pytest.fixture(params=["edge", pytest.param("server", marks=pytest.mark.integration)])
def any_catalog(request, tmp_path, index_engines):
    """The embedded engine, and a real Qdrant server (the index a shared writer group writes)."""
    catalog = Catalog(index_engines.store(request.param, str(tmp_path / "index")))
    yield catalog
    catalog.close()


def test_the_index_writer_applies_the_version_rule_and_letters_what_does_not_fit(any_catalog):
    catalog = any_catalog
    index = catalog.serve_first(_card("a").model, DIMS)
    stored = _vectors()
    index.upsert(
        [
            IndexPoint("m", "p3", stored, {"title": "old", "version": 1}, 1),
            IndexPoint("m", "p4", stored, {"title": "newer in the index", "version": 9}, 9),
        ]
    )
    newest = _record("p1", 2, offset=1)
    values = [
        newest.to_json(),
        _record("p1", 1, offset=3).to_json(),  # older than the one before it: dropped
        _record("p2", 1, offset=5).to_json(),
        _record("p3", 2, deleted=True, offset=7).to_json(),
        _record("p4", 5, offset=9).to_json(),  # the index holds version 9: stale
        _record("p5", 1, model="b", offset=11).to_json(),  # another model's record
        _record("p6", 1, dims={**DIMS, "text": 5}, offset=13).to_json(),  # wrong size
        b"\xff garbage",
    ]
    tp = TopicPartition("vectors", 0)
    consumer = FakeConsumer(_Kafka("vectors", 0, n, v) for n, v in enumerate(values))
    publisher = _Publisher()
    metrics = LoupeMetrics()
    writer = IndexWorker(
        WorkerBasics(
            publisher=publisher, live=LiveModel(ModelInUse(_Encoder("a"), index)), metrics=metrics
        ),
        make_consumer=lambda collection: (consumer, "vectors"),
        products=ProductsTopics("products"),
        hand_over=HandOver(catalog, ProductsTopics("products"), report_every_s=0.0),
    )
    assert writer.process_once() == len(values)
    versions = index.stored_versions([point_id("m", p) for p in ("p1", "p2", "p3", "p4")])
    assert versions == {point_id("m", "p1"): 2, point_id("m", "p2"): 1, point_id("m", "p4"): 9}
    [hit] = index.search_batch([_query(newest.vectors["fused"])])[0][:1]
    assert hit.id == point_id("m", "p1") and hit.score == pytest.approx(1.0, abs=1e-3)
    assert [(offset, code) for offset, code, _ in publisher.letters] == [
        (5, ErrorCode.INVALID_EVENT),
        (6, ErrorCode.INVALID_EVENT),
        (7, ErrorCode.INVALID_JSON),
    ]
    assert "in the topic of a" in publisher.letters[0][2]
    assert "5 numbers, the model makes 4" in publisher.letters[1][2]
    assert publisher.commits[-1][tp].offset == len(values)
    # The report names how far into the products topic the applied records reach.
    card = catalog.card(index.collection)
    assert card.points == index.count() == 3
    assert card.points_offsets == {"products:1": 10}
    index.close()


def _query(vector):
    from loupe.consumers.index.interface import IndexQuery
    from loupe.schemas.search import SearchFilters

    return IndexQuery("fused", vector, 1, None, SearchFilters())


def test_the_index_writer_moves_to_the_new_collections_topic_and_group_on_a_switch(catalog):
    a = catalog.serve_first(_card("a").model, DIMS)
    b = catalog.begin_build(_card("b").model, DIMS)
    consumers = {}

    def make_consumer(collection):
        consumers[collection] = FakeConsumer()
        return consumers[collection], f"vectors.{collection}"

    live = LiveModel(ModelInUse(_Encoder("a"), a))
    writer = IndexWorker(
        WorkerBasics(publisher=_Publisher(), live=live, metrics=LoupeMetrics()),
        make_consumer=make_consumer,
        products=ProductsTopics("products"),
    )
    assert writer.topic == "vectors.loupe__a"
    writer.switch_model(ModelInUse(_Encoder("b"), b))
    assert consumers["loupe__a"].closed, "the old group is left"
    assert writer.consumer is consumers["loupe__b"] and writer.topic == "vectors.loupe__b"
    a.close()
    b.close()


# --- the encoder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    topic: str
    partition: int
    offset: int


def test_the_encoder_publishes_each_products_vectors_to_its_partition():
    publisher = _Publisher()
    out = VectorsOut(publisher, "vectors.loupe__a", "loupe__a", partitions=2)
    point = IndexPoint("m", "p1", _vectors(), {"title": "ring"}, 4)
    out.upsert(_Source("products", 3, 17), point, "a")
    [(topic, key, value, partition)] = publisher.sent
    assert (topic, key, partition) == ("vectors.loupe__a", point.id.encode(), 1)
    record = parse_vector_record(value)
    assert (record.version, record.source) == (4, SourcePosition("products", 3, 17))


def _card(collection_version: str, **fields) -> CollectionCard:
    return CollectionCard(ModelCard.of(ModelProfile(), collection_version), "live", **fields)


@pytest.mark.parametrize("published", [True, False])
def test_a_new_encoders_group_starts_where_the_reindex_published_up_to(catalog, published):
    """A group that never committed starts at the card's applied offsets only if the reindex
    published those vectors; else from the beginning, so the vectors topic gets everything."""
    b = catalog.serve_first(_card("b").model, DIMS)
    catalog.write_card(
        b.collection,
        _card(
            "b",
            applied_offsets={"products:0": 30, "products:1": 40},
            vectors_topic="vectors.loupe__b" if published else None,
        ),
    )
    tp = [TopicPartition("products", p) for p in range(2)]
    consumer = FakeConsumer(
        [_Source("products", 0, 31), _Source("products", 1, 12)],
        committed={tp[0]: OffsetAndMetadata(31, "loupe__b", -1)},  # this one has its own
    )
    publisher = _Publisher()
    encoder = EncodeWorker(
        WorkerBasics(
            publisher=publisher,
            live=LiveModel(ModelInUse(_Encoder("b"), b)),
            metrics=LoupeMetrics(),
        ),
        make_consumer=lambda collection: consumer,
        make_vectors_out=lambda c: VectorsOut(_Publisher(), f"vectors.{c}", c, 2),
        catalog=catalog,
        stage=ProductStage(
            fetcher=None,
            publisher=publisher,
            metrics=LoupeMetrics(),
            source=ProductsTopics("products"),
        ),
        topic=ProductsTopics("products"),
    )
    encoder.on_assigned(set(tp))
    records = [_Source("products", 0, 31), _Source("products", 1, 12)]
    kept = encoder.after_poll(records)
    if published:
        assert consumer.seeks == {tp[1]: 40} and kept == records[:1]
        # Committed at once: the group's offsets say where it stands before any new event.
        assert publisher.commits == [{tp[1]: OffsetAndMetadata(40, "loupe__b", -1)}]
    else:
        assert consumer.seeks == {} and kept == records and publisher.commits == []
    encoder.close()
    b.close()


# --- a replica's catch-up --------------------------------------------------------------------


@dataclass
class _Worker:
    topic: str = "vectors"
    caught_up: threading.Event = field(default_factory=threading.Event)
    at_end_as_of: float = float("-inf")


def test_a_replica_with_encode_once_is_caught_up_once_its_writer_read_past_the_encoders_end():
    encoding, writing = _Worker("products"), _Worker()
    writing.caught_up.set()  # the vectors topic was empty at the start: not enough
    writing.at_end_as_of = time.monotonic()
    catch_up, stopped = CatchUp(writing, encoding), threading.Event()
    waiter = threading.Thread(target=catch_up.wait, args=(stopped,))
    waiter.start()
    time.sleep(0.5)
    assert not catch_up.done.is_set(), "the encoder has not caught up"
    encoding.caught_up.set()
    time.sleep(0.5)
    assert not catch_up.done.is_set(), "the writer has not read to the end since"
    writing.at_end_as_of = time.monotonic()
    waiter.join(timeout=5)
    assert catch_up.done.is_set() and catch_up.topic == "vectors"


def test_without_encode_once_the_ingest_alone_is_waited_for_and_a_stop_ends_the_wait():
    ingest, stopped = _Worker("products"), threading.Event()
    catch_up = CatchUp(ingest)
    stopped.set()
    assert catch_up.wait(stopped) is False and not catch_up.done.is_set()
    ingest.caught_up.set()
    assert catch_up.wait(threading.Event()) is True
