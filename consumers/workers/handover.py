"""The ingest's part in a switch of the live collection: where to resume, what to record.

Each committed offset names the collection it was applied to. A partition whose committed
offset names another collection (the live one moved: a reindex switched the alias, or a
rollback) resumes from the offset up to which the live collection's card says it has applied
that partition, if that is earlier: the events in between went to the old collection only.
Replays are idempotent, so resuming early costs time, never correctness.

The ingest also reports its collection's exact point count with the offsets it is exact for, at
most every ``report_every_s`` and once idle; a reindex compares its own count with it before it
switches (``consumers/service/reindex.py``, ``counts_agree``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index.catalog import Catalog
from loupe.consumers.kafka.products_topics import ProductsTopics

log = logging.getLogger(__name__)


class HandOver:
    """One ingest worker's records in the catalog. Not thread-safe: the worker's thread only."""

    def __init__(self, catalog: Catalog, topics: ProductsTopics, report_every_s: float) -> None:
        self.catalog = catalog
        self.topics = topics
        self.report_every_s = report_every_s
        self._reported_at = float("-inf")
        self._unreported = False

    def leaving(
        self, collection: str, consumer: KafkaConsumer, committed: Mapping[TopicPartition, int]
    ) -> None:
        """Before the worker moves to another collection: record how far ``collection`` got,
        so that a rollback to it resumes from there."""
        applied = {}
        for tp in consumer.assignment():
            if tp in committed:
                applied[tp] = committed[tp]
            else:
                stored = consumer.committed(tp, metadata=True)
                if stored is not None and stored.metadata == collection:
                    applied[tp] = stored.offset
        self.catalog.record_applied(collection, applied)

    def rewinds(
        self, collection: str, consumer: KafkaConsumer, partitions: set[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The partitions of ``partitions`` that must be read again for ``collection`` (their
        committed offset names another collection, further on), and from where."""
        card = self.catalog.card(collection)
        applied = card.applied_offsets_in(self.topics) if card is not None else {}
        rewound: dict[TopicPartition, int] = {}
        for tp in sorted(partitions):
            committed = consumer.committed(tp, metadata=True)
            if committed is None or committed.metadata in ("", collection):
                continue  # nothing committed, or committed by this collection's own ingest
            target = applied.get(tp)
            if target is None:  # the card does not say: replay the partition from its start
                target = consumer.beginning_offsets([tp])[tp]
            if target < committed.offset:
                rewound[tp] = target
        return rewound

    def seek(
        self, collection: str, consumer: KafkaConsumer, rewound: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Move the consumer back to ``rewound``; returns the offsets to commit at once,
        naming ``collection``."""
        for tp, offset in rewound.items():
            consumer.seek(tp, offset)
        log.info(
            "ingest: %s resumes %s from where its own ingest stopped (events after it went to "
            "the previous collection only)",
            collection,
            ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(rewound.items())),
        )
        return {tp: OffsetAndMetadata(o, collection, -1) for tp, o in rewound.items()}

    # --- the point-count report ----------------------------------------------------------

    def due_after_commit(self) -> bool:
        """After a commit: whether a report is due now (else one is pending for when idle)."""
        self._unreported = True
        return time.monotonic() - self._reported_at >= self.report_every_s

    def due_when_idle(self) -> bool:
        return self._unreported

    def report(
        self,
        collection: str,
        count: Callable[[], int],
        committed: Mapping[TopicPartition, int],
    ) -> int:
        """Count exactly (nothing of this worker's is in flight) and report it with the offsets
        it is exact for; returns the count. A report is advice: a failed one is logged and the
        next one mends it."""
        self._reported_at = time.monotonic()
        self._unreported = False
        exact = count()
        offsets = {tp: o for tp, o in committed.items() if self.topics.holds(tp.topic)}
        try:
            self.catalog.report_points(collection, exact, offsets)
        except (IndexUnavailable, OSError) as exc:
            log.warning("could not report the point count: %s", exc)
        return exact
