"""The loop both consumers share: poll a batch, handle it, commit what was handled.

Subclasses implement ``handle(records)``; it either completes (every side effect applied and
every send acknowledged) or raises ``Abandoned``. Offsets are committed only after ``handle``
returns, only for partitions this worker still owns, and never backwards.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.structs import TopicPartition

from loupe.consumers.kafka_io import (
    TRANSIENT_KAFKA,
    Abandoned,
    Backoff,
    Publisher,
    commit_batch,
    rewind,
    update_lag,
)
from loupe.consumers.metrics import LoupeMetrics

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 1.0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: BatchWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("%s: partitions revoked: %s", self.worker.role, sorted(map(tuple, revoked)))
            self.worker.lost.update(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            log.info("%s: partitions assigned: %s", self.worker.role, sorted(map(tuple, assigned)))


class BatchWorker:
    role = "worker"

    def __init__(
        self,
        *,
        consumer: KafkaConsumer,
        publisher: Publisher,
        metrics: LoupeMetrics,
        topic: str,
        poll_timeout_ms: int = 500,
        backoff: Backoff | None = None,
    ) -> None:
        self.consumer = consumer
        self.publisher = publisher
        self.metrics = metrics
        self.topic = topic
        self.poll_timeout_ms = poll_timeout_ms
        self.backoff = backoff or Backoff()
        self.stop_event = threading.Event()
        self.lost: set[TopicPartition] = set()  # revoked while a batch was in flight
        self._committed: dict[TopicPartition, int] = {}
        self._lag_updated_at = float("-inf")
        consumer.subscribe([topic], listener=_Rebalance(self))

    def handle(self, records: list[Any]) -> None:
        raise NotImplementedError

    def run(self) -> None:
        log.info("%s consumer running on %s", self.role, self.topic)
        try:
            while not self.stop_event.is_set():
                self.process_once()
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    def process_once(self) -> int:
        """Poll one batch and process it fully; returns how many records it committed."""
        self.lost.clear()
        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            self._update_lag()
            return 0
        self.metrics.batch_size.labels(role=self.role).observe(len(records))
        try:
            self.handle(records)
        except Abandoned as exc:
            log.warning("%s batch of %d abandoned, not committed: %s", self.role, len(records), exc)
            rewind(self.consumer, records)
            return 0
        # A rebalance during retries hands partitions to another instance, which re-reads them
        # from the last commit; replays are idempotent, so only what we still own is committed.
        owned = [r for r in records if TopicPartition(r.topic, r.partition) not in self.lost]
        try:
            with self.metrics.timer("commit"):
                self.retry(
                    "commit",
                    lambda: commit_batch(self.consumer, owned, self._committed),
                    TRANSIENT_KAFKA,
                )
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The group moved on while we worked: the partitions' new owner re-reads from the
            # last commit and replays are idempotent, so nothing is lost by not committing.
            log.warning("%s commit refused after a rebalance (%s); not committed", self.role, exc)
            return 0
        self._update_lag()
        self.after_commit(owned)
        return len(owned)

    def _update_lag(self) -> None:
        """Lag costs a request to the broker: at most once per LAG_INTERVAL_S, not per poll."""
        now = time.monotonic()
        if now - self._lag_updated_at >= LAG_INTERVAL_S:
            update_lag(self.consumer, self.metrics)
            self._lag_updated_at = now

    def after_commit(self, records: list[Any]) -> None:
        """Hook for bookkeeping once a batch is committed."""

    def retry(self, what: str, fn, transient, *, stage: str = "publish"):
        return self.backoff.retry(
            what,
            fn,
            transient,
            should_stop=self.stop_event.is_set,
            keep_alive=self._keep_alive,
            on_retry=lambda: self.metrics.retries.labels(stage=stage).inc(),
        )

    def _keep_alive(self) -> None:
        """Poll with every partition paused: heartbeats and max_poll_interval stay satisfied."""
        assigned = self.consumer.assignment()
        self.consumer.pause(*assigned)
        try:
            extra = self.consumer.poll(timeout_ms=0)
            if any(extra.values()):
                raise RuntimeError("a paused consumer returned records")  # they would be lost
        finally:
            self.consumer.resume(*self.consumer.paused())
