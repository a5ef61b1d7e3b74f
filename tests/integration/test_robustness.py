"""Nothing takes a worker down: hostile photos fail alone, ingest and search share one process
under a concurrent stream, every request is answered exactly once, and a worker that dies for
a reason that is not one item's stops the service instead of leaving a zombie.

Against a real broker and a real `loupe serve` process (ingest + search, embedded Qdrant).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime

import pytest
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from loupe.dev.catalog import load_catalog, upserted_event
from loupe.dev.drive import serve_env
from loupe.dev.kafka import free_loopback_port
from loupe.evaluation.simulators import phone_photo
from loupe.schemas.deadletter import DeadLetter
from loupe.schemas.search import parse_search_response
from tests.integration.processes import committed

pytestmark = pytest.mark.integration


def _strip_png() -> bytes:
    """A 2,000,000 x 8 greyscale PNG: 16 MP (under the pixel limit), a few KB on the wire.
    Padding it to a square before resizing would have asked for 12 TB."""
    out = io.BytesIO()
    Image.new("L", (2_000_000, 8), 200).save(out, "PNG", optimize=True)
    return out.getvalue()


def _inline(data: bytes, media_type: str) -> dict:
    return {"data": base64.b64encode(data).decode(), "media_type": media_type}


def _request(request_id: str, **body) -> dict:
    return {
        "type": "search.requested",
        "request_id": request_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        **body,
    }


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _read(bootstrap: str, topic: str, until, timeout_s: float = 120) -> list:
    """Records of ``topic`` (read_committed) until ``until(records)`` holds, then 2 s more
    (a duplicate would arrive there)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while not until(records):
            assert time.monotonic() < deadline, f"{len(records)} records on {topic} so far"
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        settle = time.monotonic() + 2
        while time.monotonic() < settle:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


@pytest.fixture(scope="module")
def served(kafka_broker, tmp_path_factory):
    """One `loupe serve` (both roles) for the module, on its own topics and group."""
    tmp = tmp_path_factory.mktemp("serve")
    suffix = os.urandom(4).hex()
    topics = {
        name: f"robust.{name}.{suffix}"
        for name in ("products", "requests", "responses", "deadletter")
    }
    port = free_loopback_port()
    env = serve_env(
        kafka_broker.bootstrap_servers,
        topics,
        group=f"robust-{suffix}",
        state_dir=tmp / "state",
        metrics_port=port,
        max_poll_records="16",
    )
    log_path = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loupe", "serve", "--create-topics"],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while _readyz_or_none(port) != 200:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "loupe serve did not become ready"
        time.sleep(0.5)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, linger_ms=5)
    yield {
        "bootstrap": kafka_broker.bootstrap_servers,
        "topics": topics,
        "group": env["LOUPE_GROUP_ID"],
        "port": port,
        "proc": proc,
        "log": log_path,
        "producer": producer,
    }
    producer.close()
    proc.terminate()
    assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    assert "died" not in log_path.read_text(), "no worker may have died"


def _readyz_or_none(port: int) -> int | None:
    try:
        return _readyz(port)
    except OSError:
        return None


def _send(served, topic: str, key: str, value: dict) -> None:
    served["producer"].send(
        served["topics"][topic], key=key.encode(), value=json.dumps(value).encode()
    )


def test_a_strip_photo_fails_alone_as_a_search_and_as_a_product(served):
    catalog = load_catalog()[:3]
    strip = _inline(_strip_png(), "image/png")
    bad_product = upserted_event(catalog[0], strip, product_id="strip-1", event_id="e-strip")
    _send(served, "products", "giva/strip-1", bad_product)
    for product in catalog:
        photo = _inline(product.image_path.read_bytes(), "image/jpeg")
        _send(served, "products", f"giva/{product.product_id}", upserted_event(product, photo))
    _send(served, "requests", "r-strip", _request("r-strip", image=strip))
    shopper = phone_photo(catalog[1].image_path.read_bytes(), seed=3)
    _send(served, "requests", "r-good", _request("r-good", image=_inline(shopper, "image/jpeg")))
    served["producer"].flush()

    answers = {
        parse_search_response(r.value).request_id: parse_search_response(r.value)
        for r in _read(
            served["bootstrap"],
            served["topics"]["responses"],
            lambda rs: {r.key for r in rs} >= {b"r-strip", b"r-good"},
        )
    }
    assert answers["r-strip"].status == "error"
    assert answers["r-strip"].error.code == "image_invalid"
    assert "20:1" in answers["r-strip"].error.message
    assert answers["r-good"].status == "ok"
    letters = [
        DeadLetter.from_record(r.key, r.value, r.headers)
        for r in _read(
            served["bootstrap"],
            served["topics"]["deadletter"],
            lambda rs: any(r.key == b"giva/strip-1" for r in rs),
        )
    ]
    strip_letter = next(letter for letter in letters if letter.key == b"giva/strip-1")
    assert strip_letter.error_code == "image_invalid" and strip_letter.stage == "decode"
    assert _readyz(served["port"]) == 200
    deadline = time.monotonic() + 30
    search_group = served["group"] + ".search"
    while committed(served["bootstrap"], search_group) < 2:
        assert time.monotonic() < deadline, "the search offsets must move past both requests"
        time.sleep(0.5)


def test_a_concurrent_stream_answers_every_request_exactly_once(served):
    """Hundreds of upserts, deletes and searches at once into one process: the embedded index
    under a writer and a reader, and one answer per request."""
    catalog = load_catalog()
    rng = random.Random(7)
    photos = {p.product_id: _inline(p.image_path.read_bytes(), "image/jpeg") for p in catalog}
    request_ids = [f"c-{n}" for n in range(150)]

    def products() -> None:
        for n in range(300):
            product = catalog[n % len(catalog)]
            key = f"giva/{product.product_id}"
            if n % 5 == 4:
                event = {
                    "type": "product.deleted",
                    "event_id": f"d-{n}",
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "merchant_id": "giva",
                    "product_id": product.product_id,
                }
            else:
                event = upserted_event(product, photos[product.product_id], event_id=f"u-{n}")
            _send(served, "products", key, event)

    def searches() -> None:
        for n, request_id in enumerate(request_ids):
            kind = n % 3
            body = {}
            if kind != 1:
                body["image"] = photos[rng.choice(catalog).product_id]
            if kind != 0:
                body["text"] = rng.choice(["gold ring", "pearl earrings", "diamond bangle"])
            _send(served, "requests", request_id, _request(request_id, top_k=5, **body))

    threads = [threading.Thread(target=products), threading.Thread(target=searches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served["producer"].flush()

    wanted = {rid.encode() for rid in request_ids}
    records = _read(
        served["bootstrap"],
        served["topics"]["responses"],
        lambda rs: {r.key for r in rs} >= wanted,
        timeout_s=600,
    )
    counts = Counter(r.key for r in records if r.key in wanted)
    assert set(counts) == wanted
    assert [k for k, c in counts.items() if c > 1] == [], "every request answered exactly once"
    statuses = Counter(parse_search_response(r.value).status for r in records if r.key in wanted)
    assert statuses == {"ok": len(request_ids)}
    assert served["proc"].poll() is None and _readyz(served["port"]) == 200


def test_a_worker_that_dies_stops_the_service_instead_of_leaving_a_zombie(
    bootstrap_servers, make_topic, group_id, tmp_path
):
    """A fault that is not one item's (injected: the search worker's batch handler raises)
    turns /readyz 503, stops the other worker, and `loupe serve` exits 1 with one line."""
    port = free_loopback_port()
    names = ("products", "requests", "responses", "deadletter")
    topics = {name: make_topic(name) for name in names}
    env = serve_env(
        bootstrap_servers, topics, group=group_id, state_dir=tmp_path / "state", metrics_port=port
    )
    # The fault: the first search batch raises outside any item, and /readyz is sampled from
    # inside the process the moment the service has noticed (before it closes its server).
    inject = (
        "import sys, urllib.request, urllib.error\n"
        "from loupe.consumers.service import lifecycle as service\n"
        "from loupe.consumers.workers import search as search_service\n"
        "def broken(self, records):\n"
        "    raise RuntimeError('injected fault outside any item')\n"
        "search_service.SearchService.handle = broken\n"
        "original = service.LoupeService._supervised\n"
        "def watched(self, worker):\n"
        "    original(self, worker)\n"
        "    if self.failure is not None and worker.role == 'search':\n"
        "        try:\n"
        "            urllib.request.urlopen(f'http://127.0.0.1:{self.health.port}/readyz')\n"
        "        except urllib.error.HTTPError as exc:\n"
        "            print('READYZ', exc.code, exc.read().decode().strip(), flush=True)\n"
        "service.LoupeService._supervised = watched\n"
        "from loupe.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers)
    request = json.dumps(_request("r1", text="ring")).encode()
    producer.send(topics["requests"], key=b"r1", value=request)
    producer.flush()
    producer.close()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", inject], env=env, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "READYZ 503 not serving: the search worker died: RuntimeError" in output
    assert output.count("Traceback") == 1, "the traceback is logged once"
    assert "loupe serve: the search worker died" in done.stderr
    assert "stopped cleanly" not in output
    assert time.monotonic() - started < 200
