"""A broker that goes silent in the middle of a transactional commit does not stop the service.

A real Kafka broker of this module's own (the test pauses it with SIGSTOP, so it cannot be the
session's), and the whole service in this process, as `loupe serve` builds it. The pause is
made to land inside a commit, deterministically: the producer's commit call is wrapped to
pause the broker just before it goes out. The commit then times out (kafka-python puts the
producer in its fatal state for that), the service replaces the producer, reads the committed
offsets and goes on. Asserted: the service never stops, /readyz says why while the broker is
away, every product is indexed once and every request answered exactly once
(``read_committed``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer

from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.service.lifecycle import LoupeService
from loupe.consumers.settings import Settings
from loupe.dev.catalog import load_catalog
from loupe.dev.kafka import BrokerState, LocalKafkaBroker
from loupe.schemas.search import parse_search_response
from tests.integration.processes import committed, upserted

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_MS = 3_000  # the producers notice a silent broker after this
PAUSE_S = REQUEST_TIMEOUT_MS / 1000 + 3  # long enough for the commit to time out


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[BrokerState]:
    local = LocalKafkaBroker(
        state_dir=tmp_path_factory.mktemp("paused-kafka"), die_with_parent=True
    )
    state = local.start()
    try:
        yield state
    finally:
        os.kill(state.pid, signal.SIGCONT)  # whatever happened, never leave it stopped
        local.stop()


class _PauseDuring:
    """Wraps one producer method: its next call pauses the broker first, and a timer resumes it
    ``PAUSE_S`` later. ``paused``/``resumed`` are set as that happens."""

    def __init__(self, producer, method: str, broker_pid: int) -> None:
        self.paused, self.resumed = threading.Event(), threading.Event()
        original = getattr(producer, method)

        def pause_then_call(*args, **kwargs):
            if not self.paused.is_set():
                os.kill(broker_pid, signal.SIGSTOP)
                self.paused.set()
                threading.Timer(PAUSE_S, self._resume, args=(broker_pid,)).start()
            return original(*args, **kwargs)

        setattr(producer, method, pause_then_call)

    def _resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.resumed.set()


def _topics(bootstrap: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    topics = {name: f"outage.{name}.{suffix}" for name in ("products", "requests", "responses")}
    topics["deadletter"] = f"outage.deadletter.{suffix}"
    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        admin.create_missing([TopicSpec(t, 2, 1) for t in topics.values()])
    return topics


def _answers(bootstrap: str, topic: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )


def _wait(condition, what: str, timeout_s: float, service: LoupeService) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert service.failure is None, f"the service stopped: {service.failure}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_broker_paused_mid_commit_neither_stops_nor_duplicates(broker, tmp_path):
    bootstrap = broker.bootstrap_servers
    topics = _topics(bootstrap)
    settings = Settings(
        bootstrap_servers=bootstrap,
        products_topic=topics["products"],
        search_requests_topic=topics["requests"],
        search_responses_topic=topics["responses"],
        deadletter_topic=topics["deadletter"],
        group_id=f"outage-{uuid.uuid4().hex[:8]}",
        state_dir=tmp_path / "state",
        metrics_port=0,
        producer_request_timeout_ms=REQUEST_TIMEOUT_MS,
        transaction_timeout_ms=60_000,  # the broker must not settle it for us
    )
    service = LoupeService(settings).start()
    ingest, search = service.app.publishers
    runner = threading.Thread(target=service.run, name="service")
    runner.start()
    try:
        _wait(lambda: service.ready()[0], "the service to be ready", 120, service)

        # 1. The broker pauses as the ingest commits its transaction: the EndTxn request waits
        # in the paused broker's socket and may well be carried out when it wakes, after the
        # client gave up. Only the committed offsets can tell; nothing may be indexed twice.
        pause = _PauseDuring(ingest.producer, "commit_transaction", broker.pid)
        catalog = load_catalog()[::24]  # 10 products, every category
        ids = [f"p{n}" for n in range(len(catalog))]
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for product, pid in zip(catalog, ids, strict=True):
            producer.send(topics["products"], key=f"m/{pid}".encode(), value=upserted(product, pid))
        producer.flush()
        _wait(pause.paused.is_set, "the ingest's commit", 120, service)
        reasons = []
        _wait(
            lambda: reasons.append(service.ready()) or not reasons[-1][0],
            "/readyz to report the outage",
            30,
            service,
        )
        assert "broker unreachable" in reasons[-1][1]
        _wait(pause.resumed.is_set, "the broker to resume", 30, service)
        _wait(lambda: service.index.count() == len(ids), "every product indexed", 120, service)

        # 2. The broker pauses as the search adds its offsets to the transaction (the issue's
        # trace): the answers must still appear exactly once.
        pause = _PauseDuring(search.producer, "send_offsets_to_transaction", broker.pid)
        request_ids = [f"q{n}" for n in range(6)]
        for rid in request_ids:
            body = {"type": "search.requested", "request_id": rid, "occurred_at": _now()}
            body["text"] = "gold ring"
            producer.send(topics["requests"], key=rid.encode(), value=json.dumps(body).encode())
        producer.flush()
        producer.close()
        _wait(pause.resumed.is_set, "the search's commit and the pause", 120, service)

        reader, answers = _answers(bootstrap, topics["responses"]), Counter()

        def all_answered() -> bool:
            for batch in reader.poll(timeout_ms=200).values():
                for record in batch:
                    answers[parse_search_response(record.value).request_id] += 1
            return set(answers) >= set(request_ids)

        _wait(all_answered, "every request answered", 120, service)
        settle = time.monotonic() + 3  # a duplicate would arrive now
        while time.monotonic() < settle:
            all_answered()
        reader.close()

        assert runner.is_alive() and service.failure is None, "the service kept running"
        assert {rid: n for rid, n in answers.items() if n != 1} == {}, "answered exactly once"
        assert service.index.count() == len(ids), "each product indexed once"
        _wait(
            lambda: committed(bootstrap, KafkaNames.of(settings).ingest_group()) == len(ids),
            "the ingest to commit every product",
            60,
            service,
        )
        replaced = service.metrics.registry.get_sample_value("loupe_producer_replacements_total")
        assert replaced >= 2, "both commits timed out, and both producers were replaced"
        assert service.ready() == (True, "ready")
    finally:
        service.stop()
        runner.join(timeout=60)
    assert service.failure is None


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()
