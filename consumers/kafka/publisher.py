"""What a batch publishes (answers, dead letters), sent with the offsets that produced them, and
what happens when Kafka does not take them: the failure policy of ``kafka.failures``.

With a transactional producer the records and the offsets are one Kafka transaction: a
``read_committed`` reader sees each batch's records exactly once, whatever crashes, retries,
broker pauses or rebalances happen. Without one, records are sent and acknowledged before the
offsets are committed: at least once.

``Publisher.commit`` either succeeds or raises one of three errors, each with one policy:

- ``CommitRetriable``: nothing of the batch is visible; call ``commit`` again after a backoff
  (the same records, a new transaction);
- ``BatchAborted``: the batch's transaction is settled, committed or not, and the committed
  offsets say which: rewind the consumer to them and handle what they do not cover again;
- ``PublisherFailed``: the producer is unusable and could not be replaced: stop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import BatchAborted, CommitRetriable, PublisherFailed
from loupe.consumers.kafka.failures import Failure, classify, describe, is_refusal
from loupe.consumers.metrics import LoupeMetrics
from loupe.schemas.deadletter import Stage, deadletter_headers
from loupe.schemas.errors import ErrorCode

log = logging.getLogger(__name__)

# Fatal errors in a row, each followed by a replacement and none by a commit, before the
# service stops: a replacement that keeps being fenced or refused is not going to work.
MAX_FATAL_IN_A_ROW = 3


class Publisher:
    """A batch's outgoing records, published together with its offsets by ``commit``.

    ``make_producer`` builds a replacement with the same configuration (for a transactional
    producer: the same transactional id, and ``init_transactions`` done); without it a fatal
    error cannot be repaired and ``commit`` raises ``PublisherFailed``.
    """

    def __init__(
        self,
        producer: KafkaProducer,
        deadletter_topic: str,
        metrics: LoupeMetrics,
        *,
        transactional: bool = False,
        make_producer: Callable[[], KafkaProducer] | None = None,
        name: str = "publisher",
    ) -> None:
        self.producer: KafkaProducer | None = producer
        self.deadletter_topic = deadletter_topic
        self.metrics = metrics
        self.transactional = transactional
        self.name = name
        self._make_producer = make_producer
        self._pending: list[_Outgoing] = []
        self._fatal_in_a_row = 0
        # A producer was lost with a transaction in flight: until a new one has settled it,
        # only the committed offsets can tell whether the batch was published.
        self._unsettled = False

    @property
    def unsettled(self) -> bool:
        """Whether the last batch's fate is known only to the broker (see ``BatchAborted``)."""
        return self._unsettled

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        reason: ErrorCode | None = None,
        partition: int | None = None,
    ) -> None:
        self._pending.append(_Outgoing(topic, key, value, list(headers), reason, partition))

    def dead_letter(self, record: Any, code: ErrorCode, message: str, stage: Stage) -> None:
        headers = deadletter_headers(
            record.headers or [],
            code=code,
            message=message,
            stage=stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        log.warning(
            "dead-letter %s[%d]@%d %s: %s",
            record.topic,
            record.partition,
            record.offset,
            code,
            message,
        )
        self.send(self.deadletter_topic, record.key, record.value, headers, reason=code)

    def discard(self) -> None:
        """Forget the batch's records: it is abandoned and will be replayed."""
        self._pending = []

    def settle(self, *, published: bool) -> None:
        """After ``BatchAborted``: the committed offsets showed whether the batch's transaction
        committed (its records are out: count them) or not (they will be made again)."""
        if published:
            self._count_dead_letters()
        self._pending = []
        self._unsettled = False

    def commit(
        self,
        offsets: dict[TopicPartition, OffsetAndMetadata],
        consumer: KafkaConsumer,
        timeout_s: float = 30.0,
    ) -> None:
        """Publish the pending records and commit ``offsets``; see the module's three errors."""
        if self.producer is None:
            self._replace("a replacement is still due")  # raises CommitRetriable if it fails
            if self._unsettled:
                raise BatchAborted(
                    Failure.FATAL, "the producer was replaced with a transaction in flight"
                )
        if self.transactional:
            self._commit_transaction(offsets, consumer)
        else:
            self._send_then_commit(offsets, consumer, timeout_s)
        self._count_dead_letters()
        self._pending = []
        self._fatal_in_a_row = 0

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()

    def _count_dead_letters(self) -> None:
        for record in self._pending:
            if record.reason is not None:
                self.metrics.dead_letters.labels(reason=record.reason.value).inc()

    # --- the transactional path -------------------------------------------------------------

    def _commit_transaction(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], consumer: KafkaConsumer
    ) -> None:
        producer = self.producer
        try:
            producer.begin_transaction()
            for record in self._pending:
                record.send_with(producer)
            if offsets:
                producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
            producer.commit_transaction()
        except KafkaError as exc:
            self._transaction_failed(exc)
        self._unsettled = False

    def _transaction_failed(self, exc: KafkaError) -> None:
        """End the failed transaction one way or another, then raise the policy's error."""
        failure = self._record(exc)
        try:
            self.producer.abort_transaction()
        except KafkaError as abort_exc:
            # The producer is in a fatal state (kafka-python puts it there even for a request
            # that timed out): its transaction stays open on the broker until a producer with
            # the same transactional id settles it. That is the replacement.
            log.warning(
                "%s: the transaction cannot be aborted (%s): replacing the producer",
                self.name,
                describe(abort_exc),
            )
            self._unsettled = True
            self._replace(describe(exc), fatal=failure is Failure.FATAL)
            raise BatchAborted(failure, f"producer replaced after {describe(exc)}") from exc
        if failure is Failure.RETRIABLE:
            raise CommitRetriable(failure, describe(exc)) from exc
        if failure is Failure.FATAL:  # aborted after all, but the producer is not to be trusted
            self._replace(describe(exc), fatal=True)
        raise BatchAborted(failure, describe(exc)) from exc

    # --- the at-least-once path -------------------------------------------------------------

    def _send_then_commit(
        self,
        offsets: dict[TopicPartition, OffsetAndMetadata],
        consumer: KafkaConsumer,
        timeout_s: float,
    ) -> None:
        try:
            self._send_unacknowledged(timeout_s)
            if offsets:
                consumer.commit(offsets)
        except KafkaError as exc:
            failure = self._record(exc)
            if failure is Failure.FATAL:  # an idempotent producer's sequence or epoch broke
                self._replace(describe(exc), fatal=True)
                raise CommitRetriable(failure, f"producer replaced after {describe(exc)}") from exc
            if failure is Failure.RETRIABLE:
                raise CommitRetriable(failure, describe(exc)) from exc
            raise BatchAborted(failure, describe(exc)) from exc

    def _send_unacknowledged(self, timeout_s: float) -> None:
        unacked = [record for record in self._pending if not record.acked]
        futures = [(r, r.send_with(self.producer)) for r in unacked]
        self.producer.flush(timeout=timeout_s)
        first_error: KafkaError | None = None
        for record, future in futures:
            try:
                future.get(timeout=timeout_s)
                record.acked = True
            except KafkaError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error  # the unacknowledged records are sent again by the retry

    # --- failures and replacement -------------------------------------------------------------

    def _record(self, exc: KafkaError) -> Failure:
        failure = classify(exc)
        self.metrics.kafka_failures.labels(failure_class=failure.value).inc()
        log.warning(
            "%s: publish and commit failed (%s): %s", self.name, failure.value, describe(exc)
        )
        return failure

    def _replace(self, why: str, *, fatal: bool = False) -> None:
        """A new producer in place of the current one. Raises ``PublisherFailed`` when that is
        refused (or fatal errors keep coming), ``CommitRetriable`` when Kafka cannot be asked
        now (``commit`` tries again)."""
        if fatal:
            self._fatal_in_a_row += 1
        if self._make_producer is None:
            raise PublisherFailed(
                f"{self.name}: the producer failed ({why}) and cannot be replaced"
            )
        if self._fatal_in_a_row > MAX_FATAL_IN_A_ROW:
            raise PublisherFailed(
                f"{self.name}: {self._fatal_in_a_row} fatal producer errors in a row, each "
                f"after a replacement; the last: {why}"
            )
        old, self.producer = self.producer, None
        if old is not None:
            with contextlib.suppress(KafkaError):
                old.close(timeout=0)  # its sender may wait on a broker that is not answering
        try:
            self.producer = self._make_producer()
        except KafkaError as exc:
            if is_refusal(exc):
                raise PublisherFailed(
                    f"{self.name}: the producer failed ({why}) and its replacement was refused: "
                    f"{describe(exc)}"
                ) from exc
            raise CommitRetriable(
                classify(exc), f"replacing the producer: {describe(exc)}"
            ) from exc
        self.metrics.producer_replacements.inc()
        log.info("%s: a new producer replaced the one that failed (%s)", self.name, why)


@dataclass
class _Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: ErrorCode | None = None  # a dead letter's code, counted once it is published
    partition: int | None = None  # None: the producer's partitioner chooses by key
    acked: bool = False

    def send_with(self, producer: KafkaProducer) -> Any:
        return producer.send(
            self.topic,
            key=self.key,
            value=self.value,
            headers=self.headers,
            partition=self.partition,
        )
