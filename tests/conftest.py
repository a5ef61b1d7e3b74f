"""Shared fixtures: one real Kafka broker per test session, fresh topics and groups per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loupe.dev.kafka import BrokerState, LocalKafkaBroker
from loupe.dev.qdrant import LocalQdrant, find_qdrant


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerState]:
    """A real Apache Kafka broker (KRaft, loopback) for the whole session.

    Set LOUPE_TEST_BOOTSTRAP_SERVERS to run against a broker you started yourself.
    """
    external = os.environ.get("LOUPE_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield BrokerState(0, external, 0, "", "external", 0.0)
        return
    broker = LocalKafkaBroker(state_dir=tmp_path_factory.mktemp("kafka"), die_with_parent=True)
    state = broker.start()
    try:
        yield state
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def qdrant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalQdrant]:
    """A real Qdrant server (one node, loopback, its own storage) for the whole session. The
    binary: LOUPE_QDRANT_BIN, else `qdrant` on the PATH, else `make qdrant`'s; none is an
    error, never a skip. Tests keep apart by giving their index a prefix of their own."""
    binary = find_qdrant(os.environ.get("LOUPE_QDRANT_BIN"))
    server = LocalQdrant(tmp_path_factory.mktemp("qdrant"), binary).start(1)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def index_prefix() -> str:
    """An alias prefix no other test uses: its collections on a shared server are its own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bootstrap_servers(kafka_broker: BrokerState) -> str:
    return kafka_broker.bootstrap_servers


@pytest.fixture
def make_topic(bootstrap_servers: str) -> Iterator[Callable[..., str]]:
    """Factory: ``make_topic(partitions=3)`` creates a uniquely named topic for this test."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="loupe-tests")
    created: list[str] = []

    def _make(prefix: str = "test", partitions: int = 1) -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        created.append(name)
        return name

    yield _make
    if created:
        admin.delete_topics(created)
    admin.close()


@pytest.fixture
def group_id() -> str:
    """A consumer group id no other test uses."""
    return f"loupe-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
