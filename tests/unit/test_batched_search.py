"""A poll of search requests is handled as one batch: one encode call, one index call, every
request answered, and a request that fails does so alone. Fakes for the model, the index and
Kafka; the real ones are in tests/integration."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest
from kafka import errors as kafka_errors

from loupe.consumers.errors import ImageFetchError, PublisherFailed
from loupe.consumers.index.interface import IndexHit
from loupe.consumers.kafka.reply_topics import DEFAULT_REPLY_TO_PATTERN, ReplyTopics
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.app import fixed_model
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.live_model import ModelInUse
from loupe.consumers.workers.search import SearchService
from loupe.encoders.fused import Encoded
from loupe.encoders.items import Region
from loupe.schemas.errors import ErrorCode
from loupe.schemas.search import parse_search_response
from tests.fakes import FakeConsumer

DIMS = {"image": 4, "text": 3, "fused": 7}


class _Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.letters: list[tuple] = []

    def send(self, topic, key, value, headers) -> None:
        self.sent.append((topic, key, value))

    def dead_letter(self, record, code, message, stage) -> None:
        self.letters.append((record.key, code, stage))


class _Encoder:
    model_version = "m1"
    fit = "pad"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode_queries(self, items):
        self.calls.append(len(items))
        out = []
        for item in items:
            vectors = {}
            if item.image is not None:
                vectors["image"] = np.ones(DIMS["image"], dtype=np.float32) / 2
            if item.text:
                vectors["text"] = np.ones(DIMS["text"], dtype=np.float32) / np.sqrt(3)
            if item.image is not None and item.text:
                vectors["fused"] = np.ones(DIMS["fused"], dtype=np.float32) / np.sqrt(7)
            out.append(Encoded(vectors=vectors))
        return out


class _Index:
    def __init__(self, poison_top_k: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.poison_top_k = poison_top_k

    def search_batch(self, queries):
        self.batches.append([q.view for q in queries])
        if any(q.top_k == self.poison_top_k for q in queries):
            raise RuntimeError("a query the index chokes on")
        return [
            [
                IndexHit(
                    id="p1",
                    score=0.9,
                    payload={"product_id": "p1", "merchant_id": "m", "title": f"hit for {q.view}"},
                )
            ]
            for q in queries
        ]


class _Fetcher:
    def load(self, image):
        if image.url is not None and "missing" in image.url:
            raise ImageFetchError(ErrorCode.IMAGE_FETCH_FAILED, f"GET {image.url}: HTTP 404")
        return (image.decoded() if image.data else b"jpeg bytes"), "image/jpeg"


def _record(offset: int, request_id: str, **body) -> SimpleNamespace:
    value = {
        "type": "search.requested",
        "request_id": request_id,
        "occurred_at": "2026-11-28T00:00:00Z",
        **body,
    }
    return SimpleNamespace(
        topic="requests",
        partition=0,
        offset=offset,
        key=request_id.encode(),
        value=json.dumps(value).encode(),
        headers=[],
    )


@pytest.fixture
def parts():
    publisher, encoder, index = _Publisher(), _Encoder(), _Index(poison_top_k=7)
    service = SearchService(
        WorkerBasics(publisher=publisher, live=fixed_model(encoder, index), metrics=LoupeMetrics()),
        consumer=FakeConsumer(),
        fetcher=_Fetcher(),
        topic="requests",
        response_topic="responses",
    )
    yield SimpleNamespace(service=service, publisher=publisher, encoder=encoder, index=index)
    service._fetch_pool.shutdown()


def _answers(publisher: _Publisher) -> dict[str, object]:
    return {key.decode(): parse_search_response(value) for _, key, value in publisher.sent}


PHOTO = {"data": base64.b64encode(b"\xff\xd8 a photo").decode(), "media_type": "image/jpeg"}


def test_a_burst_is_encoded_in_one_call_and_searched_in_one_index_call(parts):
    records = [
        _record(0, "r-photo", image=PHOTO),
        _record(1, "r-text", text="gold ring"),
        _record(2, "r-both", image={"url": "https://cdn.example/ring.jpg"}, text="ring"),
    ]
    parts.service.handle(records)
    assert parts.encoder.calls == [3]
    # photo + text: the fused view, and the image view's best match (ranked first)
    assert parts.index.batches == [["image", "text", "fused", "image"]]
    answers = _answers(parts.publisher)
    assert [a.status for a in answers.values()] == ["ok", "ok", "ok"]
    assert [h.title for h in answers["r-both"].hits] == ["hit for image"]


def test_a_request_that_fails_does_so_alone(parts):
    records = [
        _record(0, "r-ok", text="ring"),
        _record(1, "r-404", image={"url": "https://cdn.example/missing.jpg"}),
        _record(2, "r-poison", text="ring", top_k=7),
        _record(3, "r-bad", text=""),
    ]
    parts.service.handle(records)
    answers = _answers(parts.publisher)
    assert answers["r-ok"].status == "ok"
    assert answers["r-404"].error.code == "image_fetch_failed"
    assert answers["r-poison"].error.code == "internal_error"
    assert answers["r-bad"].error.code == "invalid_event"
    assert parts.encoder.calls == [2], "the failed fetch is not encoded"
    # The batch failed on the poison query, then each query was searched alone.
    assert parts.index.batches == [["text", "text"], ["text"], ["text"]]
    assert {key for key, _, _ in parts.publisher.letters} == {b"r-404", b"r-poison", b"r-bad"}


class _TwoViews:
    """The image view's best match (pA) is second in the fused view, behind a look-alike."""

    def __init__(self) -> None:
        self.fused_of = {p: np.full(DIMS["fused"], s, dtype=np.float32) for p, s in
                         (("pA", 0.2), ("pB", 0.3), ("pC", 0.1))}  # fmt: skip

    def search_batch(self, queries):
        def hit(product, score, query):
            vectors = {"fused": self.fused_of[product]} if "fused" in query.with_vectors else {}
            payload = {"product_id": product, "merchant_id": "m", "title": product}
            return IndexHit(id=product, score=score, payload=payload, vectors=vectors)

        ranked = {"image": [("pA", 0.95)], "fused": [("pB", 0.8), ("pA", 0.7), ("pC", 0.6)]}
        return [[hit(p, s, q) for p, s in ranked[q.view][: q.top_k]] for q in queries]


def test_a_photo_and_text_answer_starts_with_the_image_views_best_match(parts):
    parts.service.switch_model(ModelInUse(parts.encoder, _TwoViews()))
    parts.service.handle([_record(0, "r-both", image=PHOTO, text="ring", top_k=3)])
    hits = _answers(parts.publisher)["r-both"].hits
    assert [h.product_id for h in hits] == ["pA", "pB", "pC"]
    fused_query = np.ones(DIMS["fused"], dtype=np.float32) / np.sqrt(7)
    expected = float(np.dot(fused_query, parts.service.index.fused_of["pA"]))
    assert hits[0].score == pytest.approx(expected), "scored in the fused view, as the others"
    assert hits[0].scores.image == pytest.approx(0.95)


class _PhotoCandidates:
    """The image view ranks a chain (pB) second, ahead of a ring like the best match (pC)."""

    def __init__(self) -> None:
        self.queries = []
        self.fused_of = {"pA": [1.0, 0.0], "pB": [0.0, 1.0], "pC": [0.95, 0.05]}

    def search_batch(self, queries):
        self.queries.extend(queries)

        def hit(product, score, query):
            vectors = {}
            if "fused" in query.with_vectors:
                vectors["fused"] = np.array(self.fused_of[product], dtype=np.float32)
            payload = {"product_id": product, "merchant_id": "m", "title": product}
            return IndexHit(id=product, score=score, payload=payload, vectors=vectors)

        ranked = [("pA", 0.9), ("pB", 0.85), ("pC", 0.8)]
        return [[hit(p, s, q) for p, s in ranked[: q.top_k]] for q in queries]


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_a_photo_alone_keeps_the_best_matchs_kind_when_asked_to(parts, weight):
    parts.service.photo_kind_weight = weight
    index = _PhotoCandidates()
    parts.service.switch_model(ModelInUse(parts.encoder, index))
    parts.service.handle([_record(0, "r-photo", image=PHOTO, top_k=2)])
    hits = _answers(parts.publisher)["r-photo"].hits
    (lookup,) = index.queries
    assert lookup.view == "image"
    if weight:
        assert lookup.top_k == 50 and list(lookup.with_vectors) == ["fused"]
        assert [h.product_id for h in hits] == ["pA", "pC"], "the ring of the best match's kind"
    else:
        assert lookup.top_k == 2 and not lookup.with_vectors
        assert [h.product_id for h in hits] == ["pA", "pB"], "the image view's order"
    assert [h.score for h in hits] == [h.scores.image for h in hits], "image cosines, as before"
    assert all(h.scores.fused is None for h in hits), "a photo alone has no fused score"


def _guarded_service(publisher: _Publisher, policies: dict[str, str]) -> SearchService:
    """A service whose reply topics are the defaults', on a broker with ``policies``' topics."""
    topics = ReplyTopics.of(
        "responses", DEFAULT_REPLY_TO_PATTERN, own=["products", "requests", "dlq"]
    )
    return SearchService(
        WorkerBasics(
            publisher=publisher, live=fixed_model(_Encoder(), _Index()), metrics=LoupeMetrics()
        ),
        consumer=FakeConsumer(topics=set(policies) | {"products", "requests", "responses"}),
        fetcher=_Fetcher(),
        topic="requests",
        response_topic="responses",
        reply_topics=topics,
        cleanup_policy=policies.__getitem__,
    )


def test_a_reply_to_that_is_not_a_reply_topic_is_answered_on_the_default_one():
    publisher = _Publisher()
    service = _guarded_service(
        publisher,
        {"loupe.search.responses.app": "delete", "loupe.search.responses.kept": "compact"},
    )
    try:
        service.handle(
            [
                # The attack: a product's key as the request id, the products topic as reply_to.
                _record(0, "m1/ring-42", text="ring", reply_to="products"),
                _record(1, "r-internal", text="ring", reply_to="__consumer_offsets"),
                _record(2, "r-compacted", text="ring", reply_to="loupe.search.responses.kept"),
                _record(3, "r-elsewhere", text="ring", reply_to="orders"),
                _record(4, "r-app", text="ring", reply_to="loupe.search.responses.app"),
            ]
        )
    finally:
        service._fetch_pool.shutdown()
    where = {key.decode(): topic for topic, key, _ in publisher.sent}
    assert where == {
        "m1/ring-42": "responses",
        "r-internal": "responses",
        "r-compacted": "responses",
        "r-elsewhere": "responses",
        "r-app": "loupe.search.responses.app",
    }
    answers = _answers(publisher)
    for refused in ("m1/ring-42", "r-internal", "r-compacted", "r-elsewhere"):
        assert answers[refused].error.code == "reply_to_refused", refused
    assert "one of Loupe's own topics" in answers["m1/ring-42"].error.message
    assert "compacted" in answers["r-compacted"].error.message
    assert answers["r-app"].status == "ok"
    sample = service.metrics.registry.get_sample_value
    assert sample("loupe_reply_to_refused_total", {"reason": "loupe_topic"}) == 1
    assert sample("loupe_reply_to_refused_total", {"reason": "internal"}) == 1
    assert sample("loupe_reply_to_refused_total", {"reason": "compacted"}) == 1
    assert sample("loupe_reply_to_refused_total", {"reason": "not_allowed"}) == 1


def test_a_reply_topic_the_broker_will_not_let_loupe_write_is_refused_on_the_replay():
    """An ACL refuses the write: the batch is aborted, and when it is handled again the request
    is answered on the default topic, instead of failing again for ever."""
    publisher = _Publisher()
    service = _guarded_service(publisher, {"loupe.search.responses.acl": "delete"})
    records = [_record(0, "r-acl", text="ring", reply_to="loupe.search.responses.acl")]
    try:
        service.handle(records)
        assert publisher.sent[0][0] == "loupe.search.responses.acl"
        publisher.sent.clear()
        refused = kafka_errors.TopicAuthorizationFailedError({"loupe.search.responses.acl"})
        service.on_aborted(records, refused)
        service.handle(records)  # the replay
    finally:
        service._fetch_pool.shutdown()
    ((topic, _, value),) = publisher.sent
    assert topic == "responses"
    assert parse_search_response(value).error.code == "reply_to_refused"


def test_a_refused_write_to_the_default_topic_stops_the_service_naming_the_acl():
    publisher = _Publisher()
    service = _guarded_service(publisher, {})
    records = [_record(0, "r-1", text="ring")]
    try:
        with pytest.raises(PublisherFailed, match=r"refused this principal.*ACLs"):
            service.on_aborted(records, kafka_errors.TopicAuthorizationFailedError({"responses"}))
        service.on_aborted(records, kafka_errors.NotCoordinatorError())  # not a refusal: replay
    finally:
        service._fetch_pool.shutdown()


class _PartEncoder(_Encoder):
    """A photo whose whole looks like the table (pT), whose larger part like nothing in the
    index, and whose smaller part like the ring (pR)."""

    def encode_queries(self, items):
        out = super().encode_queries(items)
        for item, result in zip(items, out, strict=True):
            if item.image is not None:
                result.vectors["image"] = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
                nothing = np.array([0.0, 0.0, 1.0, 0.0], dtype=np.float32)
                ring = np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32)
                result.regions = [
                    Region((0.1, 0.2, 0.6, 0.6), nothing),
                    Region((0.25, 0.5, 0.4, 0.4), ring),
                ]
        return out


class _ByCosine:
    """The image view holds a table-like product and a ring; the fused view the ring first."""

    def __init__(self) -> None:
        self.products = {"pT": [0.8, 0.6, 0.0, 0.0], "pR": [0.1, 0.99, 0.0, 0.0]}
        self.queries = []

    def search_batch(self, queries):
        self.queries.extend(queries)
        answers = []
        for q in queries:
            scored = []
            for product, vector in self.products.items():
                score = float(np.dot(q.vector, vector)) if q.view == "image" else 0.5
                payload = {"product_id": product, "merchant_id": "m", "title": product}
                scored.append(IndexHit(id=product, score=score, payload=payload))
            answers.append(sorted(scored, key=lambda h: -h.score)[: q.top_k])
        return answers


def _square_photo() -> dict:
    from io import BytesIO

    from PIL import Image

    data = BytesIO()
    Image.new("RGB", (400, 300), "white").save(data, "JPEG")
    return {"data": base64.b64encode(data.getvalue()).decode(), "media_type": "image/jpeg"}


def test_a_photo_is_answered_by_the_part_where_its_product_is_when_that_matches_closer(parts):
    index = _ByCosine()
    parts.service.switch_model(ModelInUse(_PartEncoder(), index))
    photo = _square_photo()
    parts.service.handle(
        [
            _record(0, "r-photo", image=photo, top_k=2),
            _record(1, "r-both", image=photo, text="ring", top_k=2),
            _record(2, "r-text", text="ring", top_k=2),
        ]
    )
    answers = _answers(parts.publisher)
    photo_hits = answers["r-photo"].hits
    assert [h.product_id for h in photo_hits] == ["pR", "pT"], "the closest part answers"
    assert photo_hits[0].score == pytest.approx(0.99)
    # The box was found in the 400 x 300 photo padded to a square: its shares of the photo,
    # clipped at the photo's bottom edge.
    region = photo_hits[0].region
    assert (region.left, region.width) == pytest.approx((0.25, 0.4))
    assert (region.top, region.height) == pytest.approx(((0.5 - 0.125) / 0.75, 0.5))
    assert photo_hits[1].score == pytest.approx(0.8), "the next at its closest part: the whole"
    assert photo_hits[1].region is None
    assert answers["r-both"].hits[0].product_id == "pR", "the anchor from the part too"
    assert answers["r-text"].hits[0].region is None
    views = [q.view for q in index.queries]
    assert views.count("image") == 6, "whole and parts for the photo, and for the anchor"


def test_a_photo_whose_whole_matches_closer_keeps_its_own_answer(parts):
    index = _ByCosine()
    index.products = {"pT": [0.99, 0.1, 0.0, 0.0], "pR": [0.0, 0.6, 0.8, 0.0]}
    parts.service.switch_model(ModelInUse(_PartEncoder(), index))
    parts.service.handle([_record(0, "r-photo", image=_square_photo(), top_k=2)])
    hits = _answers(parts.publisher)["r-photo"].hits
    assert [h.product_id for h in hits] == ["pT", "pR"]
    assert hits[0].region is None, "the whole photo found the first"
    # The second is ranked at its closest part's score (the first part, 0.8; the whole: 0.0),
    # and says where it matched.
    assert hits[1].score == pytest.approx(0.8)
    assert (hits[1].region.left, hits[1].region.width) == pytest.approx((0.1, 0.6))
