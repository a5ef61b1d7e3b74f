"""Loupe on a three-node Qdrant cluster (real peers on loopback), one peer SIGKILLed while
products and searches flow, then restarted.

The collection is created with 3 shards, each on 2 peers, a write acknowledged by 1: with one
peer down every shard still has a replica. Two cases: another peer dies (the cluster carries
on; Loupe should not even notice), and the peer Loupe talks to dies (every call fails until it
is back: Loupe retries, says so on /readyz, and goes on). Asserted: nothing lost, no stale
product (each point holds its product's last version, deleted products are gone), every search
answered exactly once, nothing dead-lettered (an index error is retried, never a product's
fault), and the collection is sharded and replicated as configured.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime

import pytest
from kafka import KafkaConsumer, KafkaProducer

from loupe.consumers.index.interface import point_id
from loupe.consumers.service.app import build_catalog
from loupe.consumers.settings import Settings
from loupe.consumers.workers.live_model import open_collection
from loupe.dev.catalog import load_catalog, upserted_event
from loupe.dev.drive import SearchLoad, loupe_process, serve_env
from loupe.dev.kafka import free_loopback_port
from loupe.dev.qdrant import LocalQdrant, find_qdrant
from loupe.encoders.fused import FusedEncoder
from tests.integration.processes import committed, service_topics, wait_for

pytestmark = pytest.mark.integration

PRODUCTS = 16
EVENTS = 64  # upserts with growing versions, and some deletes, over the products


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    binary = find_qdrant(os.environ.get("LOUPE_QDRANT_BIN"))
    peers = LocalQdrant(tmp_path_factory.mktemp("cluster"), binary).start(3)
    try:
        yield peers
    finally:
        peers.stop()


def _events(catalog, rng: random.Random) -> tuple[list[tuple[bytes, bytes]], dict]:
    """Product events in order, and each product's expected last version (None: deleted)."""
    images = {
        n: base64.b64encode(catalog[n * 12].image_path.read_bytes()).decode()
        for n in range(PRODUCTS)
    }
    version: Counter[int] = Counter()
    expected: dict[str, int | None] = {}
    events = []
    for n in range(EVENTS):
        index = n % PRODUCTS if n < PRODUCTS else rng.randrange(PRODUCTS)
        pid = f"p{index}"
        version[index] += 1
        if n >= PRODUCTS and rng.random() < 0.15:
            event = {
                "type": "product.deleted",
                "event_id": f"e{n}",
                "occurred_at": datetime.now(UTC).isoformat(),
                "merchant_id": "m",
                "product_id": pid,
                "version": version[index],
            }
            expected[pid] = None
        else:
            image = {"data": images[index], "media_type": "image/jpeg"}
            event = upserted_event(
                catalog[index * 12],
                image,
                merchant_id="m",
                product_id=pid,
                event_id=f"e{n}",
                version=version[index],
            )
            expected[pid] = version[index]
        events.append((f"m/{pid}".encode(), json.dumps(event).encode()))
    return events, expected


def _ready(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


@pytest.mark.parametrize(
    ("peer", "down_s"),
    [("node2", None), ("node0", 8.0)],
    ids=["another peer", "the peer Loupe talks to"],
)
def test_a_peer_killed_mid_stream_loses_nothing_and_answers_once(
    peer, down_s, cluster, bootstrap_servers, make_topic, group_id, tmp_path, index_prefix
):
    topics = service_topics(make_topic)
    index = {
        "index_url": cluster.url,  # the first peer; the one killed is another
        "index_prefix": index_prefix,
        "index_shards": "3",
        "index_replication_factor": "2",
        "index_write_consistency": "1",
    }
    port = free_loopback_port()
    env = serve_env(
        bootstrap_servers,
        topics,
        group=group_id,
        state_dir=tmp_path / "state",
        metrics_port=port,
        max_poll_records="4",
        search_max_poll_records="4",
        **index,
    )
    events, expected = _events(load_catalog(), random.Random(3))
    serve_log = tmp_path / "serve.log"
    service = loupe_process(["serve"], env, serve_log)
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=5)
    reasons: list[str] = []
    try:
        wait_for(lambda: _ready(port)[0] == 200, "the service ready", 180, [service], [serve_log])
        with SearchLoad(
            bootstrap_servers,
            topics["requests"],
            topics["responses"],
            lambda n: {"text": "diamond ring", "top_k": 5},
            every_s=0.4,
        ) as shopper:
            half = len(events) // 2
            for key, value in events[:half]:
                producer.send(topics["products"], key=key, value=value)
            producer.flush()
            wait_for(
                lambda: committed(bootstrap_servers, group_id + ".ingest") >= half // 4,
                "the first products indexed",
                180,
                [service],
                [serve_log],
            )
            cluster.kill(peer)  # mid-stream: half the events not even sent yet
            for key, value in events[half:]:
                producer.send(topics["products"], key=key, value=value)
            producer.flush()
            # Another peer: the cluster carries on, so products are indexed meanwhile. The
            # entry peer: nothing can be, for down_s, and the service must say what it waits for.
            written_while_down = half + len(events) // 4
            deadline = time.monotonic() + (down_s or 180)
            while (
                time.monotonic() < deadline
                if down_s
                else committed(bootstrap_servers, group_id + ".ingest") < written_while_down
            ):
                assert down_s or time.monotonic() < deadline, "no progress with one peer down"
                assert service.poll() is None, serve_log.read_text()[-4000:]
                status, body = _ready(port)  # what the service says meanwhile
                if status != 200:
                    reasons.append(body)
                time.sleep(0.5)
            cluster.restart(peer)
            cluster.wait_for_peers(3)
            wait_for(
                lambda: committed(bootstrap_servers, group_id + ".ingest") == len(events),
                "every product event committed",
                240,
                [service],
                [serve_log],
            )
            shopper.stop_sending()
            assert shopper.wait_for_answers(120), "every search gets an answer"
            answers = dict(shopper.answers)
    finally:
        producer.close()
        service.send_signal(signal.SIGTERM)
        exited = service.wait(timeout=60)
    log_text = serve_log.read_text()
    assert exited == 0, log_text[-4000:]
    assert all(len(items) == 1 for items in answers.values()), "each search answered once"
    assert all(items[0][1]["status"] == "ok" for items in answers.values()), "with hits"

    dead = KafkaConsumer(
        topics["deadletter"],
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        consumer_timeout_ms=3000,
    )
    assert [r.offset for r in dead] == [], "an index outage dead-letters nothing"
    dead.close()

    settings = Settings(state_dir=tmp_path / "state", **index)
    catalog = build_catalog(settings)
    encoder, collection = open_collection(
        catalog, catalog.live(), settings.model_profile(), FusedEncoder.from_profile
    )
    try:
        ids = {pid: point_id("m", pid) for pid in expected}
        stored = collection.stored_versions(list(ids.values()))
        info = collection.store.client.get_collection(collection.collection)
    finally:
        collection.close()
        encoder.close()
        catalog.close()
    found = {pid: stored.get(ids[pid]) for pid in expected if ids[pid] in stored}
    lost = [p for p, v in expected.items() if v is not None and p not in found]
    extra = [p for p in found if expected[p] is None]
    stale = [p for p, v in expected.items() if v is not None and found.get(p, v) != v]
    assert (lost, extra, stale) == ([], [], []), reasons[-3:]
    if down_s:
        assert any("index" in reason for reason in reasons), reasons[-3:]
    print(f"\n/readyz while a peer was down: {sorted(set(reasons))[:3] or 'ready throughout'}")
    retried = [line for line in log_text.splitlines() if "retrying" in line]
    print(f"index retries in the log: {len(retried)}; {retried[:2]}")
    params = info.config.params
    assert (params.shard_number, params.replication_factor) == (3, 2)
    assert params.write_consistency_factor == 1
