"""Ingest and search through the real Kafka broker into embedded Qdrant, with real photos."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from kafka import KafkaConsumer, KafkaProducer

from loupe.consumers.index.interface import point_id
from loupe.consumers.service.app import Application, fixed_model
from loupe.consumers.settings import Settings
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher
from loupe.consumers.workers.live_model import ModelInUse
from loupe.dev.catalog import load_catalog
from loupe.encoders.fused import FusedEncoder
from loupe.evaluation.scenes import scene_photo
from loupe.evaluation.simulators import phone_photo
from loupe.schemas.deadletter import DeadLetter
from loupe.schemas.search import CORRELATION_HEADER, parse_search_response

pytestmark = pytest.mark.integration

MERCHANT = "giva"


@pytest.fixture(scope="module")
def encoder():
    """The CPU's model, with the GPU's two-stage pipeline on (each micro-batch prepared in the
    stage thread, its results returned a step later), so ingest runs as it does on a GPU."""
    cpu = FusedEncoder.from_profile(Settings().model_profile())
    model = cpu.with_options(
        acceleration=dataclasses.replace(cpu.acceleration, overlap_batches=True), batch_size=4
    )
    yield model
    model.close()
    cpu.close()


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()[::20]  # 12 products, two of each category


class _Photos(BaseHTTPRequestHandler):
    """A merchant CDN stand-in on loopback: photos, a 404, a slow one, an HTML page."""

    photos: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        if name == "slow.jpg":
            time.sleep(3)
        if name == "page.jpg":
            return self._send(200, b"<html>hi</html>", "text/html")
        if name == "huge.jpg":
            return self._send(200, b"\xff" * (3 * 1024 * 1024), "image/jpeg")
        if name in self.photos:
            return self._send(200, self.photos[name], "image/jpeg")
        return self._send(404, b"missing", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def cdn(catalog):
    _Photos.photos = {p.image_path.name: p.image_path.read_bytes() for p in catalog}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Photos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def overflow_on_zebra(encoder):
    """Fault injection into the real text tower: any text with the word "zebra" comes out as
    NaN, as an fp16 overflow would. Everything else runs unchanged."""
    zebra = encoder.text_encoder.tokenizer.convert_tokens_to_ids("zebra")

    def hook(module, args, kwargs, out):
        rows = (kwargs["input_ids"] == zebra).any(dim=1)  # (B,)
        return out.masked_fill(rows[:, None], float("nan"))

    handle = encoder.text_encoder.register_forward_hook(hook, with_kwargs=True)
    yield "zebra"
    handle.remove()


def _resolver(host, port, type=0):
    """A stub for one made-up name that must be refused; it never connects anywhere."""
    if host == "metadata.loupe.test":
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
    return socket.getaddrinfo(host, port, type=type)


@pytest.fixture
def service(bootstrap_servers, make_topic, group_id, tmp_path, encoder):
    topics = {
        "products": make_topic("products", partitions=3),
        "requests": make_topic("requests", partitions=2),
        "responses": make_topic("responses"),
        "deadletter": make_topic("deadletter"),
    }
    settings = Settings(
        bootstrap_servers=bootstrap_servers,
        max_poll_records=50,
        group_id=group_id,
        products_topic=topics["products"],
        search_requests_topic=topics["requests"],
        search_responses_topic=topics["responses"],
        deadletter_topic=topics["deadletter"],
        state_dir=tmp_path,
        index_engine="qdrant-local",
    )
    fetcher = ImageFetcher(
        FetchPolicy(
            allow_loopback=True,
            total_timeout_s=2,
            read_timeout_s=1,
            max_image_bytes=2 * 1024 * 1024,
        ),
        resolver=_resolver,
    )
    # Wired as `loupe serve` wires them (each worker publishes through its own transactional
    # producer), with the module's encoder and a fetcher that may reach the loopback CDN.
    app = Application(settings, fetcher=fetcher, load_encoder=lambda profile: encoder)
    catalog = app.open_catalog()
    index = catalog.open(encoder.model_version)
    index.ensure_collection(encoder.dims)
    live = fixed_model(encoder, index)
    metrics = app.metrics
    indexer = app.ingest_worker(live)
    searcher = app.search_worker(live)
    yield {
        "topics": topics,
        "metrics": metrics,
        "index": index,
        "indexer": indexer,
        "searcher": searcher,
        "settings": settings,
        "bootstrap": bootstrap_servers,
    }
    indexer.close()
    searcher.close()
    app.close_publishers()
    index.close()
    catalog.close()


def _event(product, version=1, cdn=None, inline=False, **override) -> dict:
    image = (
        {
            "data": base64.b64encode(product.image_path.read_bytes()).decode(),
            "media_type": "image/jpeg",
        }
        if inline
        else {"url": f"{cdn}/{product.image_path.name}"}
    )
    body = {
        "type": "product.upserted",
        "event_id": uuid.uuid4().hex,
        "occurred_at": datetime.now(UTC).isoformat(),
        "merchant_id": MERCHANT,
        "product_id": product.product_id,
        "title": product.title,
        "description": product.description,
        "attributes": product.attributes(),
        "price": {"amount": product.price_inr, "currency": "INR"},
        "image": image,
        "version": version,
    }
    body.update(override)
    return body


def _send(bootstrap, topic, values, key=lambda v: None):
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for value in values:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        k = key(value)
        producer.send(topic, key=k.encode() if k else None, value=raw)
    producer.flush()
    producer.close()


def _drain(worker, expected: int, timeout_s: float = 120) -> int:
    done, deadline = 0, time.monotonic() + timeout_s
    while done < expected:
        assert time.monotonic() < deadline, f"processed {done} of {expected} records"
        done += worker.process_once()
    return done


def _read_all(bootstrap, topic, expected: int, timeout_s: float = 30):
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",  # as shopper apps read answers
    )
    records, deadline = [], time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    # Anything beyond the expected count would be a duplicate answer: look a little longer.
    for batch in consumer.poll(timeout_ms=1000).values():
        records.extend(batch)
    consumer.close()
    return records


def _product_key(value):
    return (
        None
        if isinstance(value, bytes)
        else f"{value.get('merchant_id')}/{value.get('product_id')}"
    )


def test_ingest_search_poison_replay_update_delete(service, catalog, cdn, overflow_on_zebra):
    bootstrap, topics, index = service["bootstrap"], service["topics"], service["index"]
    events = [_event(p, cdn=cdn, inline=i % 3 == 0) for i, p in enumerate(catalog)]
    poison = [
        b"{not json",
        json.dumps({**events[0], "product_id": ""}).encode(),  # contract violation
        _event(
            catalog[1],
            product_id="bad-inline",
            image={
                "data": base64.b64encode(b"definitely not a jpeg").decode(),
                "media_type": "image/jpeg",
            },
        ),
        _event(catalog[1], product_id="url-404", image={"url": f"{cdn}/missing.jpg"}),
        _event(catalog[1], product_id="url-slow", image={"url": f"{cdn}/slow.jpg"}),
        _event(catalog[1], product_id="url-huge", image={"url": f"{cdn}/huge.jpg"}),
        _event(catalog[1], product_id="url-html", image={"url": f"{cdn}/page.jpg"}),
        _event(
            catalog[1],
            product_id="url-metadata",
            image={"url": "http://metadata.loupe.test/latest/meta-data"},
        ),
        _event(catalog[1], cdn=cdn, product_id="nan-vector", title=f"{overflow_on_zebra} bangle"),
    ]
    _send(
        bootstrap,
        topics["products"],
        poison[:4] + events[:6] + poison[4:] + events[6:],
        key=_product_key,
    )
    _drain(service["indexer"], len(events) + len(poison))

    assert index.count() == len(events)
    point = index.store.client.retrieve(
        index.collection, ids=[point_id(MERCHANT, catalog[0].product_id)], with_payload=True
    )[0]
    assert point.payload["title"] == catalog[0].title
    assert point.payload["category"] == catalog[0].category
    assert point.payload["model_version"] == service["indexer"].encoder.model_version
    assert point.payload["version"] == 1

    letters = [
        DeadLetter.from_record(r.key, r.value, r.headers)
        for r in _read_all(bootstrap, topics["deadletter"], len(poison))
    ]
    assert len(letters) == len(poison)
    codes = [(letter.error_code.value, letter.stage) for letter in letters]
    assert sorted(codes) == sorted(
        [
            ("invalid_json", "parse"),
            ("invalid_event", "parse"),
            ("image_invalid", "decode"),
            ("image_fetch_failed", "fetch"),
            ("image_fetch_failed", "fetch"),
            ("image_too_large", "fetch"),
            ("image_invalid", "fetch"),
            ("image_forbidden", "fetch"),
            ("encoder_failed", "encode"),
        ]
    )  # sorted: order across partitions is not defined
    by_code = {letter.error_code.value: letter for letter in letters}
    assert by_code["invalid_json"].value == b"{not json", "the original bytes are kept"
    assert by_code["invalid_json"].source_topic == topics["products"]
    assert "169.254.169.254 is link-local" in by_code["image_forbidden"].error_message

    # Replay: the same events again leave the same points.
    _send(bootstrap, topics["products"], events, key=_product_key)
    _drain(service["indexer"], len(events))
    assert index.count() == len(events)

    # Update, stale version, delete.
    target = catalog[2]
    _send(
        bootstrap,
        topics["products"],
        [
            _event(target, version=5, cdn=cdn, title="Renamed Bangle"),
            _event(target, version=4, cdn=cdn, title="Older Name"),
        ],
        key=_product_key,
    )
    _drain(service["indexer"], 2)
    stored = index.store.client.retrieve(
        index.collection, ids=[point_id(MERCHANT, target.product_id)], with_payload=True
    )[0]
    assert (stored.payload["title"], stored.payload["version"]) == ("Renamed Bangle", 5)
    _send(
        bootstrap,
        topics["products"],
        [_event(target, version=3, cdn=cdn, title="Late")],
        key=_product_key,
    )
    _drain(service["indexer"], 1)
    stored = index.store.client.retrieve(
        index.collection, ids=[point_id(MERCHANT, target.product_id)], with_payload=True
    )[0]
    assert stored.payload["title"] == "Renamed Bangle", "an older event must not overwrite"
    gone = catalog[3]
    _send(
        bootstrap,
        topics["products"],
        [
            {
                "type": "product.deleted",
                "event_id": "del-1",
                "occurred_at": datetime.now(UTC).isoformat(),
                "merchant_id": MERCHANT,
                "product_id": gone.product_id,
                "version": 9,
            }
        ],
        key=_product_key,
    )
    _drain(service["indexer"], 1)
    assert index.count() == len(events) - 1
    assert not index.store.client.retrieve(
        index.collection, ids=[point_id(MERCHANT, gone.product_id)]
    )

    # Metrics moved with the events.
    sample = service["metrics"].registry.get_sample_value
    assert sample("loupe_events_total", {"topic": topics["products"], "outcome": "indexed"}) >= 24
    assert sample("loupe_events_total", {"topic": topics["products"], "outcome": "stale"}) >= 1
    assert sample("loupe_dead_letters_total", {"reason": "image_fetch_failed"}) == 2

    # --- search ---------------------------------------------------------------------------
    photo_of = catalog[4]
    shopper_photo = phone_photo(photo_of.image_path.read_bytes(), seed=7)
    scene_of = catalog[8]
    scene = scene_photo(scene_of.image_path.read_bytes(), seed=3)  # on a surface, 30-70% of it
    now = datetime.now(UTC).isoformat()
    reply_topic = topics["responses"]

    def request(rid, **body):
        return {"type": "search.requested", "request_id": rid, "occurred_at": now, **body}

    requests = [
        request(
            "r-photo",
            image={"data": base64.b64encode(shopper_photo).decode(), "media_type": "image/jpeg"},
            top_k=5,
        ),
        request(
            "r-scene",
            image={"data": base64.b64encode(scene).decode(), "media_type": "image/jpeg"},
            top_k=5,
        ),
        request("r-text", text=f"{catalog[6].title}", top_k=3),
        request(
            "r-both",
            image={"url": f"{cdn}/{catalog[5].image_path.name}"},
            text=catalog[5].title,
            top_k=3,
        ),
        request(
            "r-filter",
            text="diamond jewellery",
            top_k=10,
            filters={"category": ["ring"], "price_max": 1e12},
        ),
        request("r-other-merchant", text="ring", merchant_id="someone-else"),
        request("r-404", image={"url": f"{cdn}/nope.jpg"}),
        request("r-nan", text=f"{overflow_on_zebra} ring"),
    ]
    raw_requests = [json.dumps(r).encode() for r in requests] + [b"\x00garbage"]
    _send(
        bootstrap,
        topics["requests"],
        raw_requests,
        key=lambda v: json.loads(v)["request_id"] if v[:1] == b"{" else "r-garbage",
    )
    _drain(service["searcher"], len(raw_requests))

    records = _read_all(bootstrap, reply_topic, len(raw_requests))
    responses = {}
    for record in records:
        response = parse_search_response(record.value)
        assert response.request_id not in responses, "exactly one answer per request"
        assert record.key == response.request_id.encode()
        assert dict(record.headers)[CORRELATION_HEADER] == response.request_id.encode()
        responses[response.request_id] = response
    assert set(responses) == {r["request_id"] for r in requests} | {"r-garbage"}

    photo = responses["r-photo"]
    assert photo.status == "ok" and photo.hits[0].product_id == photo_of.product_id
    assert photo.hits[0].scores.image == photo.hits[0].score and photo.hits[0].scores.text is None
    in_scene = responses["r-scene"]
    assert in_scene.hits[0].product_id == scene_of.product_id
    assert in_scene.hits[0].region is not None, "found by a part of the photo, which it says"
    scores = [h.score for h in in_scene.hits]
    assert scores == sorted(scores, reverse=True), "each product at its closest part's score"
    for where in (h.region for h in in_scene.hits if h.region is not None):
        assert where.left >= 0 and where.left + where.width <= 1 + 1e-6 and where.width > 0
        assert where.top >= 0 and where.top + where.height <= 1 + 1e-6 and where.height > 0
    text = responses["r-text"]
    assert text.hits[0].product_id == catalog[6].product_id
    both = responses["r-both"]
    assert both.hits[0].product_id == catalog[5].product_id
    top = both.hits[0].scores
    assert None not in (top.image, top.text, top.fused)
    assert abs(top.fused - (0.5 * top.image + 0.5 * top.text)) < 1e-3, "untrained fusion"
    assert {h.attributes["category"] for h in responses["r-filter"].hits} == {"ring"}
    assert responses["r-filter"].hits, "rings exist in the catalog sample"
    assert responses["r-other-merchant"].hits == []
    assert responses["r-404"].status == "error"
    assert responses["r-404"].error.code == "image_fetch_failed"
    assert responses["r-garbage"].error.code == "invalid_json"
    assert responses["r-nan"].error.code == "encoder_failed"
    assert "non-finite text/fused" not in responses["r-nan"].error.message  # text-only query
    assert "non-finite text vector" in responses["r-nan"].error.message
    search_letters = _read_all(bootstrap, topics["deadletter"], len(poison) + 3)
    assert len(search_letters) == len(poison) + 3
    assert service["metrics"].registry.get_sample_value(
        "loupe_search_request_latency_seconds_count"
    ) == len(requests)


class _FlakyIndex:
    """The real index behind a switch: while ``down``, writes fail like an unreachable server."""

    def __init__(self, real) -> None:
        self.real = real
        self.down = True
        self.attempts = 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def upsert(self, points):
        from loupe.consumers.errors import IndexUnavailable

        self.attempts += 1
        if self.down:
            raise IndexUnavailable("connection refused (test)")
        return self.real.upsert(points)


def _committed(service, group_suffix="-ingest"):
    from kafka.structs import TopicPartition

    consumer = service["indexer"].consumer
    topic = service["topics"]["products"]
    return {p: consumer.committed(TopicPartition(topic, p)) for p in range(3)}


def test_index_outage_is_retried_without_committing(service, catalog, cdn):
    from loupe.consumers.kafka.io import Backoff

    indexer = service["indexer"]
    flaky = _FlakyIndex(service["index"])
    indexer.switch_model(ModelInUse(indexer.encoder, flaky))
    indexer.backoff = Backoff(initial_s=0.05, cap_s=0.2)
    _send(
        service["bootstrap"],
        service["topics"]["products"],
        [_event(p, cdn=cdn) for p in catalog[:3]],
        key=_product_key,
    )

    # The index comes back after a few failed attempts: the batch is applied, then committed.
    def recover():
        while flaky.attempts < 4:
            time.sleep(0.02)
        flaky.down = False

    threading.Thread(target=recover, daemon=True).start()
    _drain(indexer, 3)
    assert flaky.attempts >= 5
    assert service["index"].count() == 3
    assert sum(v or 0 for v in _committed(service).values()) == 3
    assert (
        service["metrics"].registry.get_sample_value(
            "loupe_retries_total", {"stage": "index_write"}
        )
        >= 4
    )

    # Shutdown during an outage: the batch is abandoned and nothing more is committed.
    flaky.down = True
    before = _committed(service)
    _send(
        service["bootstrap"],
        service["topics"]["products"],
        [_event(p, cdn=cdn, version=2) for p in catalog[3:5]],
        key=_product_key,
    )
    threading.Timer(1.0, indexer.stop_event.set).start()
    deadline = time.monotonic() + 30
    while not indexer.stop_event.is_set() and time.monotonic() < deadline:
        assert indexer.process_once() == 0
    assert _committed(service) == before
    assert service["index"].count() == 3


def test_a_photo_alone_can_keep_the_best_matchs_kind(service, catalog):
    """LOUPE_PHOTO_KIND_WEIGHT through the real index and broker: the best match stays, and the
    hits after it are of its kind more often than the image view alone ranks them."""
    bootstrap, topics = service["bootstrap"], service["topics"]
    _send(
        bootstrap, topics["products"], [_event(p, inline=True) for p in catalog], key=_product_key
    )
    _drain(service["indexer"], len(catalog))
    now = datetime.now(UTC).isoformat()

    def ask(weight: float) -> dict:
        service["searcher"].photo_kind_weight = weight
        requests = [
            {
                "type": "search.requested",
                "request_id": f"r-{weight}-{i}",
                "occurred_at": now,
                "image": {
                    "data": base64.b64encode(
                        phone_photo(p.image_path.read_bytes(), seed=i)
                    ).decode(),
                    "media_type": "image/jpeg",
                },
                "top_k": 3,
            }
            for i, p in enumerate(catalog)
        ]
        _send(bootstrap, topics["requests"], requests, key=lambda v: v["request_id"])
        _drain(service["searcher"], len(requests))
        return {
            r["request_id"].rsplit("-", 1)[1]: r
            for r in (
                parse_search_response(record.value).model_dump()
                for record in _read_all(bootstrap, topics["responses"], 2 * len(requests))
            )
            if r["request_id"].startswith(f"r-{weight}-")
        }

    by_look, by_kind = ask(0.0), ask(1.0)
    assert len(by_look) == len(by_kind) == len(catalog)
    category = {p.product_id: p.category for p in catalog}
    same_kind = {"look": 0, "kind": 0}
    for i in range(len(catalog)):
        look, kind = by_look[str(i)]["hits"], by_kind[str(i)]["hits"]
        assert len(look) == len(kind) == 3
        assert kind[0]["product_id"] == look[0]["product_id"], "the best match stays first"
        for name, hits in (("look", look), ("kind", kind)):
            same_kind[name] += sum(
                category[h["product_id"]] == category[hits[0]["product_id"]] for h in hits[1:]
            )
        assert all(h["score"] == h["scores"]["image"] for h in kind), "image cosines, as before"
    # Two products of each category: the best match's twin is among the next two far more often.
    assert same_kind["kind"] > same_kind["look"], same_kind


def test_publish_and_search_commands(service, catalog, cdn, monkeypatch, tmp_path, capsys):
    """`loupe publish FILE.jsonl` then `loupe search --image ...`, as a user runs them."""
    from loupe.cli import main

    topics = service["topics"]
    monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", service["bootstrap"])
    monkeypatch.setenv("LOUPE_PRODUCTS_TOPIC", topics["products"])
    monkeypatch.setenv("LOUPE_SEARCH_REQUESTS_TOPIC", topics["requests"])
    monkeypatch.setenv("LOUPE_SEARCH_RESPONSES_TOPIC", topics["responses"])
    lines = [json.dumps(_event(p, cdn=cdn)) for p in catalog[:4]] + ['{"type": "product.upserted"}']
    jsonl = tmp_path / "products.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    assert main(["publish", str(jsonl)]) == 1  # one invalid line: reported, not sent
    out = capsys.readouterr()
    assert "sent 4 product events and 0 search requests; 1 invalid lines skipped" in out.out
    assert f"{jsonl}:5: not sent: invalid product event" in out.err
    _drain(service["indexer"], 4)

    searcher = service["searcher"]
    worker = threading.Thread(target=searcher.run, daemon=True)
    worker.start()
    photo = tmp_path / "shopper.jpg"
    photo.write_bytes(phone_photo(catalog[2].image_path.read_bytes(), seed=5))
    try:
        assert main(["search", "--image", str(photo), "--top-k", "3", "--timeout", "60"]) == 0
        table = capsys.readouterr().out
        assert "3 hits in" in table
        first_row = table.splitlines()[2]
        assert catalog[2].title in first_row, table
        assert main(["search", "--text", "ring", "--filter", "category=ring", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["status"] == "ok"
        assert {h["attributes"]["category"] for h in answer["hits"]} <= {"ring"}
    finally:
        searcher.stop_event.set()
        worker.join(30)


def test_a_reply_to_topic_that_does_not_exist_does_not_jam_search(service):
    topics = service["topics"]
    now = datetime.now(UTC).isoformat()
    requests = [
        {
            "type": "search.requested",
            "request_id": "r-nowhere",
            "occurred_at": now,
            "text": "ring",
            "reply_to": "no.such.topic",
        },
        {"type": "search.requested", "request_id": "r-next", "occurred_at": now, "text": "ring"},
    ]
    started = time.monotonic()
    _send(
        service["bootstrap"],
        topics["requests"],
        [json.dumps(r).encode() for r in requests],
        key=lambda v: json.loads(v)["request_id"],
    )
    _drain(service["searcher"], 2, timeout_s=60)
    assert time.monotonic() - started < 30, "must not wait for a metadata timeout"
    answers = {
        parse_search_response(r.value).request_id: parse_search_response(r.value)
        for r in _read_all(service["bootstrap"], topics["responses"], 2)
    }
    assert answers["r-next"].status == "ok"
    nowhere = answers["r-nowhere"]
    assert nowhere.status == "error" and nowhere.error.code == "reply_to_refused"
    assert "reply_to 'no.such.topic' is not a reply topic" in nowhere.error.message
    letters = _read_all(service["bootstrap"], topics["deadletter"], 1)
    assert (
        DeadLetter.from_record(letters[0].key, letters[0].value, letters[0].headers).stage
        == "publish"
    )


@pytest.fixture
def compacted_topics(bootstrap_servers):
    """``make(name)``: a compacted topic of that name (one record per key survives the cleaner),
    deleted after the test."""
    from loupe.consumers.kafka.admin import COMPACTED, KafkaAdmin, TopicSpec

    admin = KafkaAdmin({"bootstrap_servers": bootstrap_servers}, client_id="loupe-tests")
    made: list[str] = []

    def make(name: str) -> str:
        admin.create_missing([TopicSpec(name, 1, 1, COMPACTED)])
        made.append(name)
        return name

    yield make
    if made:
        admin.delete_topics(made)
    admin.close()


def test_a_search_request_cannot_write_into_the_products_or_a_vectors_topic(
    service, catalog, cdn, compacted_topics
):
    """The attack: a request whose id is a product's key and whose reply_to names the compacted
    products topic (or a vectors topic, or a compacted topic the pattern allows) would, once the
    cleaner ran, replace that product for good. Every one is answered on the default topic, and
    the compacted topics hold only what Loupe ingested."""
    bootstrap, topics = service["bootstrap"], service["topics"]
    product = catalog[0]
    _send(bootstrap, topics["products"], [_event(product, cdn=cdn)], key=_product_key)
    _drain(service["indexer"], 1)
    suffix = uuid.uuid4().hex[:8]
    vectors = compacted_topics(f"loupe.vectors.loupe_m_{suffix}")
    kept_replies = compacted_topics(f"loupe.search.responses.kept-{suffix}")
    product_key = f"{MERCHANT}/{product.product_id}"
    now = datetime.now(UTC).isoformat()
    hostile = {
        "products": topics["products"],
        "requests": topics["requests"],
        "deadletter": topics["deadletter"],
        "vectors": vectors,
        "compacted": kept_replies,
        "internal": "__consumer_offsets",
    }
    requests = [
        {
            "type": "search.requested",
            "request_id": f"{product_key}" if name == "products" else f"{product_key}/{name}",
            "occurred_at": now,
            "text": "ring",
            "reply_to": topic,
        }
        for name, topic in hostile.items()
    ]
    _send(
        bootstrap,
        topics["requests"],
        [json.dumps(r).encode() for r in requests],
        key=lambda v: json.loads(v)["request_id"],
    )
    _drain(service["searcher"], len(requests), timeout_s=60)

    answers = [
        parse_search_response(r.value)
        for r in _read_all(bootstrap, topics["responses"], len(requests))
    ]
    assert sorted(a.request_id for a in answers) == sorted(r["request_id"] for r in requests)
    assert {a.error.code for a in answers} == {"reply_to_refused"}
    # The products topic holds the product event alone; the others hold nothing Loupe did not
    # put there (the dead letters of the refused requests, with their own keys).
    (only,) = _read_all(bootstrap, topics["products"], 1)
    assert only.key == product_key.encode() and json.loads(only.value)["type"] == "product.upserted"
    assert _read_all(bootstrap, vectors, 0, timeout_s=2) == []
    assert _read_all(bootstrap, kept_replies, 0, timeout_s=2) == []
    assert len(_read_all(bootstrap, topics["requests"], len(requests))) == len(requests)
    letters = _read_all(bootstrap, topics["deadletter"], len(requests))
    assert all(dict(r.headers)["loupe.error.code"] == b"reply_to_refused" for r in letters)
    sample = service["metrics"].registry.get_sample_value
    assert sample("loupe_reply_to_refused_total", {"reason": "loupe_topic"}) == 4
    assert sample("loupe_reply_to_refused_total", {"reason": "compacted"}) == 1
    assert sample("loupe_reply_to_refused_total", {"reason": "internal"}) == 1


def test_a_tombstone_deletes_its_product_and_one_without_a_product_key_is_dead_lettered(
    service, catalog, cdn
):
    """The products topic is compacted: a null value under a product's key is how a merchant
    lets compaction forget it, and Loupe reads it as that product's delete."""
    bootstrap, topics, index = service["bootstrap"], service["topics"], service["index"]
    kept, gone = catalog[0], catalog[1]
    _send(
        bootstrap,
        topics["products"],
        [_event(kept, cdn=cdn), _event(gone, cdn=cdn)],
        key=_product_key,
    )
    _drain(service["indexer"], 2)
    assert index.count() == 2
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topics["products"], key=f"{MERCHANT}/{gone.product_id}".encode(), value=None)
    producer.send(topics["products"], key=b"no-product-here", value=None)
    producer.flush()
    producer.close()
    _drain(service["indexer"], 2)
    assert index.count() == 1
    assert index.stored_versions([point_id(MERCHANT, gone.product_id)]) == {}
    (dead,) = _read_all(bootstrap, topics["deadletter"], expected=1)
    letter = DeadLetter.from_record(dead.key, dead.value, dead.headers)
    assert (letter.key, letter.value, letter.stage) == (b"no-product-here", None, "parse")
    assert "tombstone" in letter.error_message
    assert "<merchant_id>/<product_id>" in letter.error_message
