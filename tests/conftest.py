"""Shared fixtures: one real Kafka broker and one real Qdrant server per test session, fresh
topics, groups and index prefixes per test, and every index engine by name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loupe.dev.kafka import BrokerState, LocalKafkaBroker
from loupe.dev.qdrant import LocalQdrant, QdrantSecurity, find_qdrant
from loupe.dev.tls import make_certificates


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
    """A real Qdrant server (one node, loopback, its own storage) for the whole session, as
    production runs one: behind an API key, over TLS with a certificate made here (its
    ``settings()`` and ``store_options()`` carry the key and the CA). The binary:
    LOUPE_QDRANT_BIN, else `qdrant` on the PATH, else `make qdrant`'s; none is an error, never a
    skip. Tests keep apart by giving their index a prefix of their own."""
    binary = find_qdrant(os.environ.get("LOUPE_QDRANT_BIN"))
    root = tmp_path_factory.mktemp("qdrant")
    security = QdrantSecurity(uuid.uuid4().hex, make_certificates(root / "certs"))
    server = LocalQdrant(root / "server", binary, security).start(1)
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
    from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec

    admin = KafkaAdmin({"bootstrap_servers": bootstrap_servers}, client_id="loupe-tests")
    created: list[str] = []

    def _make(prefix: str = "test", partitions: int = 1) -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        admin.create_missing([TopicSpec(name, partitions, 1)])
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


# Every index engine the tests hold to one interface, by name. The embedded ones live in a
# directory; the server's (marked integration: they start the session's Qdrant server) are
# named after the test's own prefix and the directory's last part, so no two share one.
EMBEDDED_ENGINES = ("edge", "edge-int8", "qdrant-local")
SERVER_ENGINES = ("server", "server-int8")
ENGINE_NAMES = [
    *EMBEDDED_ENGINES,
    *(pytest.param(name, marks=pytest.mark.integration) for name in SERVER_ENGINES),
]


class IndexEngines:
    """``store(name, path)``: a ``CollectionStore`` of engine ``name``; ``handle(name, path,
    version)``: a handle on one collection that owns a store of its own (closing it closes
    everything it opened)."""

    def __init__(self, request: pytest.FixtureRequest, prefix: str) -> None:
        self.request, self.prefix = request, prefix

    def _options(self, name: str, path: str) -> tuple[str, dict]:
        if name in SERVER_ENGINES:
            server = self.request.getfixturevalue("qdrant_server")  # started only when asked
            quantization = "int8" if name.endswith("int8") else "none"
            prefix = f"{self.prefix}_{Path(path).name}"
            options = {"prefix": prefix, "quantization": quantization}
            return "qdrant", {**server.store_options(), **options}
        if name.startswith("edge"):
            return "edge", {"path": path, **({"quantization": "int8"} if "int8" in name else {})}
        return "qdrant", {"path": path}

    def store(self, name: str, path: str):
        from loupe.consumers.index.edge import EdgeStore
        from loupe.consumers.index.qdrant import QdrantStore

        kind, options = self._options(name, path)
        return (EdgeStore if kind == "edge" else QdrantStore)(**options)

    def handle(self, name: str, path: str, version: str = "m1"):
        from loupe.consumers.index.edge import EdgeIndex
        from loupe.consumers.index.qdrant import QdrantIndex

        kind, options = self._options(name, path)
        return (EdgeIndex if kind == "edge" else QdrantIndex)(model_version=version, **options)


@pytest.fixture
def index_engines(request: pytest.FixtureRequest, index_prefix: str) -> IndexEngines:
    return IndexEngines(request, index_prefix)
