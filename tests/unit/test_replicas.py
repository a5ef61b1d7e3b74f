"""Replicas: instances that each keep an embedded index of their own. Each indexes every
product under an ingest group of its own, all share the search group, and a replica answers
searches only once its index has caught up with the products topic."""

from __future__ import annotations

import pytest
from kafka.structs import TopicPartition

from loupe.cli.main import main
from loupe.consumers.errors import ConfigError
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.lifecycle import LoupeService
from loupe.consumers.settings import Settings, load_settings
from loupe.consumers.workers.batch import BatchWorker, WorkerBasics
from tests.fakes import FakeConsumer

P0, P1 = TopicPartition("products", 0), TopicPartition("products", 1)


def test_each_replica_ingests_under_its_own_group_and_all_share_the_search_group():
    shared = KafkaNames.of(Settings(group_id="shop"))
    a, b = (KafkaNames.of(Settings(group_id="shop", replica_id=r)) for r in "ab")
    assert shared.ingest_group() == "shop.ingest"
    assert (a.ingest_group(), b.ingest_group()) == ("shop.ingest.a", "shop.ingest.b")
    assert shared.search_group() == a.search_group() == b.search_group() == "shop.search"
    # A reindex rebuilds the replica's own index: a group of its own too, or two replicas'
    # reindexes would split the topic's partitions between them.
    assert a.reindex_group("c1") == "shop.reindex.c1.a" != b.reindex_group("c1")
    assert shared.reindex_group("c1") == "shop.reindex.c1"


@pytest.mark.parametrize("bad", ["", "-a", "a b", "a/b", "x" * 65, "é"])
def test_a_replica_id_that_cannot_name_a_group_is_refused(monkeypatch, bad):
    monkeypatch.setenv("LOUPE_REPLICA_ID", bad)
    with pytest.raises(ConfigError, match="LOUPE_REPLICA_ID"):
        load_settings()


def test_a_replica_with_a_shared_index_server_is_refused(monkeypatch):
    monkeypatch.setenv("LOUPE_INDEX_URL", "http://127.0.0.1:6333")
    monkeypatch.setenv("LOUPE_REPLICA_ID", "a")
    with pytest.raises(ConfigError, match=r"LOUPE_REPLICA_ID: .*LOUPE_INDEX_URL"):
        load_settings()


@pytest.mark.parametrize("role", ["ingest", "search"])
def test_a_replica_runs_both_roles(role):
    with pytest.raises(ConfigError, match=f"--role all\\), not --role {role}"):
        LoupeService(Settings(replica_id="a"), role=role)


def test_loupe_serve_refuses_a_replica_role_before_it_looks_for_a_broker(monkeypatch, capsys):
    monkeypatch.setenv("LOUPE_REPLICA_ID", "a")
    monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    assert main(["serve", "--role", "search"]) == 2
    err = capsys.readouterr().err
    assert "LOUPE_REPLICA_ID=a" in err and "--role all" in err and "broker" not in err


class _Ingest(BatchWorker):
    role = "ingest"


def _worker(consumer) -> BatchWorker:
    return _Ingest(
        WorkerBasics(publisher=None, metrics=LoupeMetrics()), consumer=consumer, topic="products"
    )


def test_a_worker_is_caught_up_only_once_every_partition_is_read_to_its_end():
    consumer = FakeConsumer(positions={P0: 10, P1: 3}, ends={P0: 10, P1: 7})
    worker = _worker(consumer)
    worker.process_once()  # an empty poll, but partition 1 still has 4 events to come
    assert not worker.caught_up.is_set()
    consumer.positions[P1] = 7
    consumer.end_errors = 1  # the broker did not say: asked again after the next empty poll
    worker.process_once()
    assert not worker.caught_up.is_set()
    worker.process_once()
    assert worker.caught_up.is_set()


def test_a_worker_without_partitions_yet_is_not_caught_up():
    worker = _worker(FakeConsumer(positions={}, ends={}))
    worker.process_once()
    assert not worker.caught_up.is_set()
