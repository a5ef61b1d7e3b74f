"""Where a reindex stands in the products topics (``ReindexTracker``: done and total events,
the rate, whether it has caught up) and whether its point count agrees with the live
collection's (``counts_agree``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.errors import ConfigError
from loupe.consumers.index.catalog import Catalog, offset_key
from loupe.consumers.index.interface import Collection
from loupe.consumers.kafka.io import read_to_end
from loupe.consumers.kafka.products_topics import ProductsTopics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    done: int  # events applied (offsets past the start of the topic)
    total: int  # events in the topic now
    rate: float  # events per second, this run
    eta_s: float | None
    points: int

    def line(self, collection: str) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        eta = f"ETA {self.eta_s:.0f} s" if self.eta_s is not None else "ETA unknown"
        return (
            f"reindex {collection}: {self.done}/{self.total} events ({share:.0f}%), "
            f"{self.rate:.1f} events/s, {eta}, {self.points} points"
        )


FIND_TOPICS_S = 5.0  # per merchant: how often a reindex looks for new merchant topics


class ReindexTracker:
    """Where the reindex stands in the topics it reads (``products``: the products topics, or
    for a reindex from a vectors topic that one topic): done and total events, and whether it
    caught up. Per merchant, a merchant topic made during the reindex joins the count when the
    consumer's subscription finds it."""

    def __init__(self, consumer: KafkaConsumer, products: ProductsTopics) -> None:
        self.consumer = consumer
        self.products = products
        self.partitions: list[TopicPartition] = []
        self.begin: dict[TopicPartition, int] = {}
        self._end: dict[TopicPartition, int] = {}
        self._find_partitions()
        if not self.partitions and not products.per_merchant:
            raise ConfigError(f"topic {products.base} does not exist (or has no partitions)")
        self._started_at = time.monotonic()
        self._start_done = self._done(self.positions())  # a resumed run starts past zero

    def _find_partitions(self) -> None:
        """The partitions of the products topics the broker has now, assigned or not."""
        topics = self.products.among(self.consumer.topics())
        found = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(self.consumer.partitions_for_topic(topic) or ())
        ]
        self._found_at = time.monotonic()
        new = [tp for tp in found if tp not in self.begin]
        if new:
            self.begin.update(self.consumer.beginning_offsets(new))
            self._end.update(self.consumer.end_offsets(new))
        self.partitions = found

    def positions(self) -> dict[TopicPartition, int]:
        assigned = self.consumer.assignment()
        found = {}
        for tp in self.partitions:
            if tp in assigned:
                found[tp] = self.consumer.position(tp)
            else:
                committed = self.consumer.committed(tp)
                found[tp] = committed if committed is not None else self.begin[tp]
        return found

    def measure(self, index: Collection) -> Progress:
        if self.products.per_merchant and time.monotonic() - self._found_at > FIND_TOPICS_S:
            self._find_partitions()
        self._end = self.consumer.end_offsets(self.partitions) if self.partitions else {}
        done = self._done(self.positions())
        total = sum(self._end[tp] - self.begin[tp] for tp in self.partitions)
        elapsed = max(time.monotonic() - self._started_at, 1e-6)
        rate = (done - self._start_done) / elapsed
        eta = (total - done) / rate if rate > 0 else None
        return Progress(done, total, rate, eta, index.count(exact=True))

    def done_this_run(self) -> int:
        return self._done(self.positions()) - self._start_done

    def _done(self, positions: dict[TopicPartition, int]) -> int:
        return sum(positions[tp] - self.begin[tp] for tp in self.partitions)

    def caught_up(self) -> bool:
        """Every partition of the products topics assigned to us and read to its end (as of the
        last measure); a partition assigned before it was found is not."""
        partitions = set(self.partitions) | set(self.consumer.assignment())
        return read_to_end(self.consumer, partitions, self._end)


def counts_agree(
    catalog: Catalog,
    live: str | None,
    points: int,
    applied: Mapping[TopicPartition, int],
    allowed: int,
    begin: Mapping[TopicPartition, int] | None = None,
) -> tuple[bool, str]:
    """Whether the new collection's ``points`` agree with the live collection's count.

    The live service's ingest reports its exact count together with the offsets it had
    committed (consumers/workers/ingest.py). Each event changes a count by at most one, so the two
    collections may differ by at most the events one has applied and the other had not (the
    distance between ``applied``, how far into each products partition the new collection
    reaches, and the reported offsets), plus ``allowed``. ``begin``: where each partition
    starts, for one the report does not name (default 0)."""
    if live is None:
        return True, f"{points} points (no live collection to compare with)"
    card = catalog.card(live)
    if card is None or card.points is None:
        log.warning(
            "%s has no point-count report (no service has ingested into it since this version "
            "of Loupe): the counts are not compared",
            live,
        )
        return True, f"{points} points ({live} reported no count)"
    begin = begin or {}
    slack = 0
    for tp, offset in applied.items():
        reported = card.points_offsets.get(offset_key(tp.topic, tp.partition), begin.get(tp, 0))
        slack += abs(offset - reported)
    difference = abs(points - card.points)
    detail = (
        f"{points} points here, {card.points} in {live} (difference {difference}, "
        f"events between the two: {slack}, allowed: {allowed})"
    )
    return difference <= slack + allowed, detail
