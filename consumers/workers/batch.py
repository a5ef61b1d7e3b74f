"""The loop both consumers share: poll a batch, handle it, commit what was handled.

Subclasses implement ``handle(records)``; it either completes (every side effect applied and
every send acknowledged) or raises ``Abandoned``. Offsets are committed only after ``handle``
returns, only for partitions this worker still owns, and never backwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import (
    CommitFailedError,
    GroupAuthorizationFailedError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
)
from kafka.structs import TopicPartition

from loupe.consumers.errors import BatchAborted, CommitRetriable, PublisherFailed
from loupe.consumers.index.interface import Collection
from loupe.consumers.kafka.failures import describe, root_cause
from loupe.consumers.kafka.io import (
    TRANSIENT_KAFKA,
    Abandoned,
    Backoff,
    forget_lag,
    next_offsets,
    read_to_end,
    rewind,
    rewind_to_committed,
    update_lag,
)
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.workers.live_model import LiveModel, ModelInUse

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 1.0
# While one batch is handled, the consumer polls (paused) at least this often, so that no
# record, however slow, holds it past max_poll_interval_ms and out of its group.
KEEP_ALIVE_INTERVAL_S = 5.0
SLOW_BATCH_S = 5.0  # a batch slower than this is logged (its records held the worker)
# Refusals that replaying a batch cannot cure (the transactional id's and the cluster's are
# fatal already: the publisher stops when a replacement producer is refused too).
AUTHORIZATION_ERRORS = (TopicAuthorizationFailedError, GroupAuthorizationFailedError)


def _subscribe(consumer: KafkaConsumer, topic: str | ProductsTopics, listener) -> str:
    """Subscribe ``consumer`` to a topic or to the products topics (per merchant: a pattern);
    returns how logs and metrics name what it reads.

    The topic's partitions are looked up first. kafka-python joins the group on the first poll,
    often before its metadata names a topic just subscribed to; the leader then assigns nothing
    ("No partition metadata for topic") and should rejoin once the metadata arrives, but that
    check races with the assignment: twice in one CI run a lone search worker stayed without
    partitions until it was stopped (tests/integration/test_monitoring.py, test_reindex.py).
    With the partitions known before the join, the first assignment is whole."""
    if isinstance(topic, ProductsTopics):
        if not topic.per_merchant:
            consumer.partitions_for_topic(topic.base)
        topic.subscribe(consumer, listener)
        return topic.label
    consumer.partitions_for_topic(topic)
    consumer.subscribe([topic], listener=listener)
    return topic


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: BatchWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("%s: partitions revoked: %s", self.worker.role, sorted(map(tuple, revoked)))
            self.worker.lost.update(revoked)
            forget_lag(self.worker.metrics, revoked)

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            log.info("%s: partitions assigned: %s", self.worker.role, sorted(map(tuple, assigned)))
            self.worker.on_assigned(set(assigned))


@dataclass(frozen=True)
class WorkerBasics:
    """What every worker's loop is given besides its consumer and topic, the same for all of
    them: where its records and dead letters go (``publisher``), its ``metrics``, the model it
    follows (``live``; None for a worker without one, the tests'), how long a poll waits, how a
    retry backs off, and what stops it (``stop_event``: set to stop, between batches and
    between a retry's attempts; one of the worker's own unless given, e.g. a reindex's, set by
    its signal handler)."""

    publisher: Publisher
    metrics: LoupeMetrics
    live: LiveModel | None = None
    poll_timeout_ms: int = 500
    backoff: Backoff | None = None
    stop_event: threading.Event | None = None


class BatchWorker:
    role = "worker"

    def __init__(
        self, basics: WorkerBasics, *, consumer: KafkaConsumer, topic: str | ProductsTopics
    ) -> None:
        self.consumer = consumer
        self.publisher = basics.publisher
        self.metrics = basics.metrics
        self.poll_timeout_ms = basics.poll_timeout_ms
        self.backoff = basics.backoff or Backoff()
        self.stop_event = basics.stop_event or threading.Event()
        self.lost: set[TopicPartition] = set()  # revoked while a batch was in flight
        self._committed: dict[TopicPartition, int] = {}
        # What a retry is waiting for (a broker away, Qdrant down), for /readyz; None when not.
        self.waiting_on: str | None = None
        self._lag_updated_at = float("-inf")
        self._polled_at = time.monotonic()
        # Set once a poll found nothing new on any partition this worker owns: it has read its
        # topic to the end at least once (a replica serves searches only from then on).
        self.caught_up = threading.Event()
        # When the last poll started that found the worker at the end of its topic (monotonic
        # seconds): it had read everything visible then.
        self.at_end_as_of = float("-inf")
        # The model and collection this worker uses: ``live``'s pair, adopted between batches
        # (a reindex's switch), so that a batch never mixes models. None: a worker without a
        # model (the tests' own).
        self.live = basics.live
        self.in_use = self.live.current() if self.live is not None else None
        self._read(consumer, topic)

    def handle(self, records: list[Any]) -> None:
        raise NotImplementedError

    @property
    def encoder(self) -> Any:
        """The encoder of the pair in use (a ``FusedEncoder``)."""
        return self.in_use.encoder

    @property
    def index(self) -> Collection:
        """The collection of the pair in use."""
        return self.in_use.index

    def switch_model(self, in_use: ModelInUse) -> None:
        """Use another model and collection from the next batch on (the live model moved)."""
        self.in_use = in_use

    def replace_consumer(self, consumer: KafkaConsumer, topic: str | ProductsTopics) -> None:
        """Between batches: go on with ``consumer`` on ``topic`` (after a switch, for a worker
        whose group or topic is per collection). The old one leaves its group uncommitted."""
        forget_lag(self.metrics, self.consumer.assignment())
        self.consumer.close(autocommit=False)
        self._committed, self.lost = {}, set()  # the old consumer's
        self._read(consumer, topic)

    def _read(self, consumer: KafkaConsumer, topic: str | ProductsTopics) -> None:
        self.consumer, self.source = consumer, topic  # a topic, or the products topics
        self.topic = _subscribe(consumer, topic, _Rebalance(self))
        self.metrics.register_worker(self.role, self.topic)
        group = getattr(consumer, "config", {}).get("group_id")
        log.info("%s: now reading %s in group %s", self.role, self.topic, group)

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        """Called inside ``poll`` when the group hands this worker partitions."""

    def after_poll(self, records: list[Any]) -> list[Any]:
        """The records to handle out of a poll (a subclass may rewind some partitions)."""
        return records

    def commit_metadata(self) -> str:
        """Stored with each committed offset (the ingest names the collection it wrote)."""
        return ""

    def follow_live_model(self) -> None:
        """Between two batches: adopt the live model if it moved since the last batch."""
        if self.live is None:
            return
        current = self.live.current()
        if current.generation != self.in_use.generation:
            log.info("%s: switching to %s", self.role, current.collection)
            self.switch_model(current)
        self.live.adopted(self.role, self.in_use.generation)

    def run(self, until: Callable[[int], bool] | None = None) -> None:
        """Process batches until ``stop_event`` (or until ``until(records committed)`` says so
        after a batch: a reindex's stop condition); an exception here is not one item's (those
        are handled inside ``handle``): it ends the worker, and the service stops with it."""
        log.info("%s consumer running on %s", self.role, self.topic)
        self.metrics.worker_up.labels(role=self.role).set(1)
        try:
            while not self.stop_event.is_set():
                self.follow_live_model()
                handled = self.process_once()
                if until is not None and until(handled):
                    break
        finally:
            self.metrics.worker_up.labels(role=self.role).set(0)
            self.close()

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    def process_once(self) -> int:
        """Poll one batch and process it fully; returns how many records it committed."""
        self.lost.clear()
        poll_started = time.monotonic()
        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
        self._polled_at = time.monotonic()
        records = self.after_poll([r for batch in polled.values() for r in batch])
        if not records:
            # Until caught up, every empty poll reads the lag: an empty poll alone does not say
            # the worker is at the end (a fetch may still be on its way); a zero lag does.
            ends = self._update_lag(force=not self.caught_up.is_set()) or {}
            if read_to_end(self.consumer, ends, ends):  # every assigned partition
                self.at_end_as_of = poll_started
                self._mark_caught_up()
            return 0
        self.metrics.batch_size.labels(role=self.role).observe(len(records))
        started = time.monotonic()
        offsets = {}
        try:
            self.handle(records)  # side effects done; answers and dead letters held back
            offsets = next_offsets(records, self._committed, self.commit_metadata())
            with self.metrics.timer("commit"):
                self.retry("publish and commit", lambda: self._commit(offsets), (CommitRetriable,))
        except (Abandoned, CommitFailedError, RebalanceInProgressError) as exc:
            # Shutdown mid-retry, or the group moved on while we worked: nothing of the batch
            # is published or committed. Lost partitions are re-read by their new owner, ours
            # after the rewind; replays are idempotent and their answers published once.
            log.warning("%s batch of %d not committed: %s", self.role, len(records), exc)
            self.publisher.discard()
            if self.publisher.unsettled and not self.stop_event.is_set():
                return self._settle(records, offsets)
            rewind(self.consumer, records)
            return 0
        except BatchAborted as exc:
            log.warning(
                "%s batch of %d aborted (%s): %s", self.role, len(records), exc.failure.value, exc
            )
            self.on_aborted(records, root_cause(exc))
            return self._settle(records, offsets)
        self._committed_batch(records, offsets, started)
        return len(records)

    def _committed_batch(self, records: list[Any], offsets, started: float) -> None:
        for tp, meta in offsets.items():
            self._committed[tp] = meta.offset
        took = time.monotonic() - started
        if took > SLOW_BATCH_S:
            log.info("%s: slow batch: %d records in %.1f s", self.role, len(records), took)
        self._update_lag()
        self.after_commit(records)

    def _settle(self, records: list[Any], offsets) -> int:
        """After an aborted batch: the committed offsets say whether its transaction committed
        after all (a producer lost mid-commit) and where to read on; the consumer is rewound to
        them. Returns the records committed (the batch's, or none)."""
        try:
            positions = self.retry(
                "read the committed offsets",
                lambda: rewind_to_committed(self.consumer, records),
                TRANSIENT_KAFKA,
            )
        except Abandoned:
            return 0  # stopping: whoever reads these partitions next starts at the committed
        published = bool(offsets) and all(
            positions.get(tp, -1) >= meta.offset for tp, meta in offsets.items()
        )
        self.publisher.settle(published=published)
        if published:
            log.info("%s: the batch of %d was committed after all", self.role, len(records))
            self._committed_batch(records, offsets, time.monotonic())
            return len(records)
        self._committed.update(positions)  # where the group stands: the broker's word
        return 0

    def _commit(self, offsets) -> None:
        if self.lost:  # answers for partitions another instance now owns must not appear
            moved = sorted(map(tuple, self.lost))
            raise Abandoned(f"partitions moved to another instance: {moved}")
        self.publisher.commit(offsets, self.consumer)

    def _mark_caught_up(self) -> None:
        if not self.caught_up.is_set():
            log.info("%s: caught up with %s", self.role, self.topic)
            self.caught_up.set()

    def _update_lag(self, force: bool = False) -> dict[TopicPartition, int] | None:
        """End offsets, lag exported (None: not read); a request, so once per LAG_INTERVAL_S."""
        now = time.monotonic()
        if not force and now - self._lag_updated_at < LAG_INTERVAL_S:
            return None
        self._lag_updated_at = now
        return update_lag(self.consumer, self.metrics)

    def after_commit(self, records: list[Any]) -> None:
        """Hook for bookkeeping once a batch is committed."""

    def on_aborted(self, records: list[Any], cause: BaseException) -> None:
        """After a batch was aborted and rewound, with the error at its root: an ACL's refusal
        would come back on every replay, so it stops the worker (``refused``)."""
        refused(self.role, cause)

    def retry(self, what: str, fn, transient, *, stage: str = "publish"):
        """``fn()``, retried with backoff on ``transient`` errors; while it is retried,
        ``waiting_on`` says what for (``/readyz`` shows it)."""
        result = self.backoff.retry(
            what,
            fn,
            transient,
            should_stop=self.stop_event.is_set,
            keep_alive=self._keep_alive,
            on_retry=lambda exc: self._retrying(what, exc, stage),
        )
        self.waiting_on = None
        return result

    def _retrying(self, what: str, exc: BaseException, stage: str) -> None:
        self.metrics.retries.labels(stage=stage).inc()
        self.waiting_on = f"{what}: retrying after {describe(exc)}"

    def keep_alive_if_due(self) -> None:
        """Call between the items of a long batch: polls (paused) once KEEP_ALIVE_INTERVAL_S
        have passed since the last poll."""
        if time.monotonic() - self._polled_at >= KEEP_ALIVE_INTERVAL_S:
            self._keep_alive()

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
            self._polled_at = time.monotonic()


def refused(role: str, cause: BaseException) -> None:
    """Raise ``PublisherFailed`` naming the refusal if ``cause`` is the broker refusing this
    principal (an ACL the operator must add); return for any other cause."""
    if isinstance(cause, AUTHORIZATION_ERRORS):
        raise PublisherFailed(
            f"{role}: the broker refused this principal ({type(cause).__name__}: {cause}); "
            f"grant the ACLs deploy/README.md lists for the {role} role"
        ) from cause
