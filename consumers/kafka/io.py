"""Kafka plumbing shared by both consumers: clients, backoff, offsets, lag, the broker probe.

What a batch publishes, and the failure policy of its commit, is ``publisher.Publisher``."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import BrokerAuthenticationFailed, BrokerUnreachable
from loupe.consumers.kafka import eof as kafka_eof
from loupe.consumers.kafka.admin import KafkaAdmin
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.settings import Settings

log = logging.getLogger(__name__)

kafka_eof.install()  # a broker's last words before it closes reach kafka-python (kafka_eof.py)


def checksums_in_c() -> bool:
    """Whether kafka-python checksums record batches in C (the ``crc32c`` package, its
    ``crc32c`` extra, a dependency of Loupe). Without it every batch produced or fetched is
    checksummed in pure Python, which costs a burst of photo queries seconds of CPU at each end
    (docs/architecture.md has the rate, measured with ``bench.search --burst``)."""
    from kafka.record import util

    return util.crc32c_c is not None


def record_time(record: Any) -> datetime:
    """A Kafka record's timestamp (a tombstone's only 'occurred at')."""
    return datetime.fromtimestamp(max(0, record.timestamp) / 1000, UTC)


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> KafkaConsumer:
    """A consumer in ``group_id`` with auto-commit off; the worker subscribes it."""
    config = {
        **settings.kafka_client_config(),
        "group_id": group_id,
        "enable_auto_commit": False,  # offsets move only after the side effect
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.max_poll_records,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "fetch_max_bytes": 52_428_800,
        "max_partition_fetch_bytes": 2 * 1024 * 1024,
        "client_id": f"loupe-{group_id}",
        # Never act on records of a transaction that was aborted (a producer's, or ours).
        "isolation_level": "read_committed",
        **overrides,
    }
    return KafkaConsumer(**config)


def reader_at_end(settings: Settings, topic: str) -> KafkaConsumer:
    """A group-less consumer of ``topic`` positioned at its current end, before anything is
    asked. ``seek_to_end`` alone is lazy: answers written before the first poll would be
    skipped, so each position is resolved now."""
    reader = KafkaConsumer(
        **settings.kafka_client_config(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",  # answers of an aborted transaction are not answers
    )
    partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or {0}]
    reader.assign(partitions)
    reader.seek_to_end(*partitions)
    for partition in partitions:
        reader.position(partition)
    return reader


def make_transactional_producer(settings: Settings, role: str) -> KafkaProducer:
    """A producer whose sends and offset commits form one transaction per batch (KIP-98), its
    zombies fenced by the consumer group's generation (KIP-447)."""
    producer = KafkaProducer(
        **settings.kafka_client_config(),
        transactional_id=KafkaNames.of(settings).transactional_id(role),
        acks="all",
        linger_ms=5,
        max_request_size=2 * 1024 * 1024,
        # A transaction spans one batch's publish, not its processing: seconds at most. A
        # process killed inside one blocks read_committed readers until this expires.
        transaction_timeout_ms=settings.transaction_timeout_ms,
        request_timeout_ms=settings.producer_request_timeout_ms,
        max_block_ms=settings.producer_request_timeout_ms,  # init_transactions, metadata
        client_id=f"loupe-{role}-producer",
    )
    producer.init_transactions()
    return producer


def make_producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(
        **settings.kafka_client_config(),
        acks="all",
        linger_ms=5,
        max_request_size=2 * 1024 * 1024,
        request_timeout_ms=settings.producer_request_timeout_ms,
        max_block_ms=settings.producer_request_timeout_ms,
        client_id="loupe-producer",
    )


class Backoff:
    """Capped exponential backoff that keeps the consumer in its group while it waits."""

    def __init__(self, initial_s: float = 0.2, cap_s: float = 10.0) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s

    def retry(
        self,
        what: str,
        fn: Callable[[], Any],
        transient: tuple[type[BaseException], ...],
        *,
        should_stop: Callable[[], bool],
        keep_alive: Callable[[], None] = lambda: None,
        on_retry: Callable[[BaseException], None] = lambda exc: None,
    ) -> Any:
        delay = self.initial_s
        while True:
            try:
                return fn()
            except transient as exc:
                if getattr(exc, "retriable", True) is False:
                    raise  # e.g. MessageSizeTooLarge, authorization: retrying cannot help
                if should_stop():
                    raise Abandoned(f"{what}: stopping while retrying ({exc})") from exc
                on_retry(exc)
                log.warning("%s failed, retrying in %.1f s: %s", what, delay, exc)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not should_stop():
                    keep_alive()
                    time.sleep(min(0.2, delay))
                delay = min(delay * 2, self.cap_s)


class Abandoned(Exception):
    """A batch left unfinished (shutdown or lost partitions): nothing of it is committed."""


def next_offsets(
    records: Sequence[Any], committed: dict[TopicPartition, int], metadata: str = ""
) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offset after the last record of each partition; refuses to move one backwards."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        next_offset = record.offset + 1
        if next_offset > offsets.get(tp, OffsetAndMetadata(-1, "", -1)).offset:
            offsets[tp] = OffsetAndMetadata(next_offset, metadata, -1)
    for tp, meta in offsets.items():
        if meta.offset < committed.get(tp, -1):
            raise RuntimeError(
                f"refusing to commit {tp} backwards: {meta.offset} < {committed[tp]}"
            )
    return offsets


def update_lag(consumer: KafkaConsumer, metrics: LoupeMetrics) -> dict[TopicPartition, int] | None:
    """Export the lag of each assigned partition (its end offset minus our position); returns
    the end offsets read, or None when they were not (no partitions yet, or the broker did not
    answer)."""
    try:
        assigned = list(consumer.assignment())
        if not assigned:
            return None
        ends = consumer.end_offsets(assigned)
        for tp in assigned:
            lag = max(0, ends.get(tp, 0) - consumer.position(tp))
            metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
    except KafkaError as exc:
        log.debug("lag not updated: %s", exc)
        return None
    return ends


def forget_lag(metrics: LoupeMetrics, partitions: Iterable[TopicPartition]) -> None:
    """Drop the lag of partitions this instance no longer reads (revoked, or a consumer it
    replaced): another instance reports them now, and a sum over instances (a dashboard, an
    autoscaler) must not count a stale value twice."""
    for tp in partitions:
        with contextlib.suppress(KeyError):  # never reported
            metrics.consumer_lag.remove(tp.topic, str(tp.partition))


def read_to_end(
    consumer: KafkaConsumer,
    partitions: Iterable[TopicPartition],
    ends: Mapping[TopicPartition, int],
) -> bool:
    """Loupe's one meaning of "caught up": every one of ``partitions`` is assigned to
    ``consumer``, and its position has reached its end offset in ``ends`` (read from the broker
    after the poll that came back empty). A partition whose end is not known is not read to its
    end. A worker's ``caught_up`` (a replica's readiness, ``service.CatchUp``, encode-once) asks
    it of the partitions it was assigned; the reindex (``reindex_progress.ReindexTracker``), of
    every partition of the products topics: a group that shares them has not caught up alone."""
    partitions = list(partitions)
    assigned = consumer.assignment()
    return bool(partitions) and all(
        tp in assigned and tp in ends and consumer.position(tp) >= ends[tp] for tp in partitions
    )


def rewind(consumer: KafkaConsumer, records: Sequence[Any]) -> None:
    """Seek back to the first record of each partition so an abandoned batch is re-read."""
    assigned = consumer.assignment()
    for tp, offset in _first_offsets(records).items():
        if tp in assigned:
            consumer.seek(tp, offset)


def rewind_to_committed(
    consumer: KafkaConsumer, records: Sequence[Any], timeout_ms: int = 10_000
) -> dict[TopicPartition, int]:
    """Seek each partition of ``records`` this consumer still owns to the group's committed
    offset, as the coordinator has it now, and return those offsets.

    After a transaction whose outcome the client does not know (its producer was lost), this is
    the truth: the offsets were part of it. A ``read_committed`` consumer asks for stable
    offsets, so a transaction still open is waited for, not read half-done. Raises a retriable
    ``KafkaError`` when the coordinator does not answer within ``timeout_ms``."""
    assigned = consumer.assignment()
    positions: dict[TopicPartition, int] = {}
    for tp, first in _first_offsets(records).items():
        if tp not in assigned:
            continue  # another instance owns it now and starts from the same committed offset
        committed = consumer.committed(tp, timeout_ms=timeout_ms)
        positions[tp] = first if committed is None else committed
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    return positions


def _first_offsets(records: Sequence[Any]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    return first


# Retried with backoff unless the error says it is not retriable (kafka-python's ``retriable``).
TRANSIENT_KAFKA = (KafkaError,)


def answers_metadata(client_config: dict[str, Any], timeout_s: float = 2.0) -> bool:
    """True if the cluster answers a metadata request now, with the same connection and security
    options as the consumers (``Settings.kafka_client_config()``): a SASL/TLS cluster is probed
    the way it is used. Raises ``BrokerAuthenticationFailed`` when the broker answers but refuses
    the credentials: waiting cannot fix that."""
    from kafka.errors import KafkaConfigurationError

    first = client_config["bootstrap_servers"][0]
    host, _, port = first.rpartition(":")
    try:
        # A plain TCP connect first: cheap, and kafka-python logs refused connections as errors.
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    timeout_ms = int(timeout_s * 1000)
    refusals = _Refusals()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(refusals)
    try:
        admin = KafkaAdmin(
            client_config,
            "loupe-probe",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    except KafkaConfigurationError:
        raise  # a bug in this probe or a bad setting, not "broker not up yet"
    except (KafkaError, OSError):
        if refusals.seen is not None:
            raise BrokerAuthenticationFailed(_refusal(client_config, refusals.seen)) from None
        return False
    finally:
        kafka_log.removeHandler(refusals)
    with admin:
        return admin.answers()


class _Refusals(logging.Handler):
    """Notices a refused authentication while a client bootstraps. kafka-python retries a
    bootstrap connection the broker refused until its timeout and then reports only "unable to
    bootstrap"; the refusal itself it passes to its log, as the exception object. (Its 3.0
    internals: where they change, nothing is noticed and the probe says "unreachable".)"""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        from kafka.errors import SaslAuthenticationFailedError

        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, SaslAuthenticationFailedError):
                self.seen = arg


def _refusal(client_config: dict[str, Any], failure: BaseException) -> str:
    user = client_config.get("sasl_plain_username")
    mechanism = client_config.get("sasl_mechanism")
    return (
        f"Kafka at {','.join(client_config['bootstrap_servers'])} refused Loupe's credentials "
        f"(user {user!r}, {mechanism}): check LOUPE_SASL_PLAIN_USERNAME and "
        f"LOUPE_SASL_PLAIN_PASSWORD, and that the user exists on the cluster "
        f"({type(failure).__name__})"
    )


def require_broker(settings: Settings, wait_s: float = 0.0) -> None:
    """Return once a broker answers at ``settings.bootstrap_servers``; after ``wait_s`` seconds
    of trying, raise ``BrokerUnreachable`` naming the setting and the address."""
    deadline = time.monotonic() + wait_s
    config = settings.kafka_client_config()
    while not answers_metadata(config, timeout_s=2.0):
        if time.monotonic() >= deadline:
            raise BrokerUnreachable(
                f"no Kafka broker answers at {settings.bootstrap_servers} "
                f"(LOUPE_BOOTSTRAP_SERVERS, security protocol {settings.security_protocol}); "
                "start one (`loupe kafka start`) or point LOUPE_BOOTSTRAP_SERVERS at yours"
            )
        time.sleep(0.5)
