"""One meaning of "caught up" (``kafka_io.read_to_end``): a worker's, which a replica's
readiness and encode-once wait for, asks it of its assigned partitions; the reindex asks it of
every partition of the products topics, since a group that shares them has not caught up
alone."""

from __future__ import annotations

from kafka.structs import TopicPartition

from loupe.consumers.kafka.io import read_to_end
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.service.reindex_progress import ReindexTracker
from loupe.consumers.workers.batch import WorkerBasics
from tests.fakes import FakeConsumer

P0, P1 = TopicPartition("products", 0), TopicPartition("products", 1)


def test_read_to_end_means_every_partition_assigned_and_at_its_end():
    consumer = FakeConsumer(positions={P0: 10, P1: 7})
    assert read_to_end(consumer, [P0, P1], {P0: 10, P1: 7})
    assert not read_to_end(consumer, [P0, P1], {P0: 10, P1: 8}), "one event still to come"
    assert not read_to_end(consumer, [P0, P1], {P0: 10}), "an end not read is not reached"
    assert not read_to_end(consumer, [], {}), "nothing assigned yet"
    only_p0 = FakeConsumer(positions={P0: 10}, assigned={P0})
    assert not read_to_end(only_p0, [P0, P1], {P0: 10, P1: 0}), "P1 is another's"


def test_the_reindex_is_caught_up_only_with_every_partition_of_the_products_topics():
    # A group that holds one of two partitions is at the end of what it reads, not caught up.
    half = FakeConsumer(assigned={P0}, positions={P0: 5}, ends={P0: 5, P1: 3})
    tracker = ReindexTracker(half, ProductsTopics("products"))
    tracker.measure(_NoIndex())
    assert not tracker.caught_up()

    whole = FakeConsumer(positions={P0: 5, P1: 3}, ends={P0: 5, P1: 3})
    tracker = ReindexTracker(whole, ProductsTopics("products"))
    tracker.measure(_NoIndex())
    assert tracker.caught_up()
    whole.ends[P1] = 4  # a new event arrives: measured again, no longer at the end
    tracker.measure(_NoIndex())
    assert not tracker.caught_up()


def test_a_merchant_topic_assigned_before_the_reindex_found_it_is_not_read_to_its_end():
    shop = TopicPartition("products.shop", 0)
    consumer = FakeConsumer(positions={shop: 2}, ends={shop: 2}, assigned=set())
    tracker = ReindexTracker(consumer, ProductsTopics("products", per_merchant=True))
    consumer._assigned = {shop}  # the subscription found it; the tracker has not looked yet
    assert not tracker.caught_up()


class _NoIndex:
    def count(self, exact: bool = False) -> int:
        return 0


def test_a_partition_no_longer_read_here_has_no_lag_reported_here():
    from loupe.consumers.metrics import LoupeMetrics
    from loupe.consumers.workers.batch import BatchWorker

    class _Ingest(BatchWorker):
        role = "ingest"

    metrics = LoupeMetrics()
    consumer = FakeConsumer(positions={P0: 4, P1: 3}, ends={P0: 10, P1: 7})
    worker = _Ingest(
        WorkerBasics(publisher=None, metrics=metrics), consumer=consumer, topic="products"
    )
    worker.process_once()

    def lag(tp: TopicPartition) -> float | None:
        labels = {"topic": tp.topic, "partition": str(tp.partition)}
        return metrics.registry.get_sample_value("loupe_consumer_lag", labels)

    assert (lag(P0), lag(P1)) == (6, 4)
    consumer.listener.on_partitions_revoked({P1})  # another instance reads it now
    assert (lag(P0), lag(P1)) == (6, None), "a sum over instances counts P1 once"
    worker.replace_consumer(FakeConsumer(), "products")  # after a switch: another group
    assert lag(P0) is None
