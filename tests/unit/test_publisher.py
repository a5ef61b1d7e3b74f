"""Publisher.flush: a failed send is re-sent and the error raised, never silently dropped."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, NotLeaderForPartitionError

from loupe.consumers.kafka_io import Backoff, Publisher
from loupe.consumers.metrics import LoupeMetrics


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error
        return "ack"


class _FlakyProducer:
    """Fails the first ``failures`` sends of each value, then acknowledges."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[bytes, int] = {}
        self.delivered: list[bytes] = []

    def send(self, topic, key=None, value=None, headers=None):
        count = self.attempts[value] = self.attempts.get(value, 0) + 1
        if count <= self.failures:
            return _Future(NotLeaderForPartitionError("leader moved"))
        self.delivered.append(value)
        return _Future(None)

    def flush(self, timeout=None):
        pass


def test_failed_sends_are_resent_until_acknowledged():
    producer = _FlakyProducer(failures=2)
    publisher = Publisher(producer, "dlq", LoupeMetrics())
    for value in (b"a", b"b", b"c"):
        publisher.send("responses", value, value, [])
    Backoff(initial_s=0.001, cap_s=0.002).retry(
        "flush", publisher.flush, (NotLeaderForPartitionError,), should_stop=lambda: False
    )
    assert sorted(producer.delivered) == [b"a", b"b", b"c"]
    assert producer.attempts == {b"a": 3, b"b": 3, b"c": 3}


def test_a_flush_after_a_failure_is_not_a_silent_success():
    producer = _FlakyProducer(failures=1)
    publisher = Publisher(producer, "dlq", LoupeMetrics())
    publisher.send("responses", b"k", b"v", [])
    with pytest.raises(NotLeaderForPartitionError):
        publisher.flush()  # the failure is reported, never swallowed
    assert len(publisher._pending) == 1, "the record was sent again and is awaited"
    publisher.flush()  # what the caller's retry does: waits for the re-sent record
    assert publisher._pending == []
    assert producer.delivered == [b"v"]


def test_a_flush_that_times_out_keeps_its_pending_sends():
    class _SlowProducer(_FlakyProducer):
        def flush(self, timeout=None):
            raise KafkaTimeoutError("not flushed in time")

    publisher = Publisher(_SlowProducer(failures=0), "dlq", LoupeMetrics())
    publisher.send("responses", b"k", b"v", [])
    with pytest.raises(KafkaTimeoutError):
        publisher.flush()
    assert len(publisher._pending) == 1
