"""Publisher.commit: a batch's records and offsets go out together, or not at all, and nothing
is dropped between a failure and the retry that follows."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import CommitRetriable
from loupe.consumers.kafka.io import Backoff, checksums_in_c
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.schemas.errors import ErrorCode
from tests.fakes import FakeConsumer

OFFSETS = {TopicPartition("requests", 0): OffsetAndMetadata(8, "", -1)}


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

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        count = self.attempts[value] = self.attempts.get(value, 0) + 1
        if count <= self.failures:
            return _Future(NotLeaderForPartitionError("leader moved"))
        self.delivered.append(value)
        return _Future(None)

    def flush(self, timeout=None):
        pass


def test_failed_sends_are_resent_until_acknowledged_then_offsets_commit():
    producer, consumer = _FlakyProducer(failures=2), FakeConsumer()
    publisher = Publisher(producer, "dlq", LoupeMetrics())
    for value in (b"a", b"b", b"c"):
        publisher.send("responses", value, value, [])
    Backoff(initial_s=0.001, cap_s=0.002).retry(
        "commit",
        lambda: publisher.commit(OFFSETS, consumer),
        (CommitRetriable,),
        should_stop=lambda: False,
    )
    assert sorted(producer.delivered) == [b"a", b"b", b"c"]
    assert producer.attempts == {b"a": 3, b"b": 3, b"c": 3}
    assert consumer.commits == [OFFSETS]


def test_a_failed_send_commits_no_offsets_and_keeps_the_batch():
    producer, consumer = _FlakyProducer(failures=1), FakeConsumer()
    publisher = Publisher(producer, "dlq", LoupeMetrics())
    publisher.send("responses", b"k", b"v", [])
    with pytest.raises(CommitRetriable) as failed:
        publisher.commit(OFFSETS, consumer)  # the failure is reported, never swallowed
    assert isinstance(failed.value.__cause__, NotLeaderForPartitionError)
    assert consumer.commits == []
    publisher.commit(OFFSETS, consumer)  # what the caller's retry does
    assert producer.delivered == [b"v"] and consumer.commits == [OFFSETS]


def test_a_flush_that_times_out_commits_nothing():
    class _SlowProducer(_FlakyProducer):
        def flush(self, timeout=None):
            raise KafkaTimeoutError("not flushed in time")

    consumer = FakeConsumer()
    publisher = Publisher(_SlowProducer(failures=0), "dlq", LoupeMetrics())
    publisher.send("responses", b"k", b"v", [])
    with pytest.raises(CommitRetriable):
        publisher.commit(OFFSETS, consumer)
    assert consumer.commits == []


class _TransactionalProducer:
    """Records the calls a transactional producer gets; ``fail_commits`` commits fail."""

    def __init__(self, fail_commits: int = 0) -> None:
        self.fail_commits = fail_commits
        self.calls: list[str] = []
        self.visible: list[bytes] = []  # what a read_committed reader would see
        self._open: list[bytes] = []

    def begin_transaction(self):
        self.calls.append("begin")
        self._open = []

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        self.calls.append(f"send {value.decode()}")
        self._open.append(value)

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self.calls.append(f"offsets {group_metadata}")

    def commit_transaction(self):
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaTimeoutError("coordinator did not answer")
        self.calls.append("commit")
        self.visible += self._open

    def abort_transaction(self):
        self.calls.append("abort")
        self._open = []


def test_a_transaction_holds_the_records_and_the_offsets():
    producer, metrics = _TransactionalProducer(), LoupeMetrics()
    publisher = Publisher(producer, "dlq", metrics, transactional=True)
    publisher.send("responses", b"r1", b"answer", [])
    publisher.send("dlq", b"r2", b"letter", [], reason=ErrorCode.IMAGE_INVALID)
    publisher.commit(OFFSETS, FakeConsumer())
    assert producer.calls == ["begin", "send answer", "send letter", "offsets group", "commit"]
    count = metrics.registry.get_sample_value(
        "loupe_dead_letters_total", {"reason": "image_invalid"}
    )
    assert count == 1


def test_a_failed_transaction_is_aborted_and_retried_whole_with_nothing_seen_twice():
    producer, metrics = _TransactionalProducer(fail_commits=1), LoupeMetrics()
    publisher = Publisher(producer, "dlq", metrics, transactional=True)
    publisher.send("responses", b"r1", b"answer", [])
    publisher.send("dlq", b"r2", b"letter", [], reason=ErrorCode.IMAGE_INVALID)
    with pytest.raises(CommitRetriable):
        publisher.commit(OFFSETS, FakeConsumer())
    assert producer.calls[-1] == "abort"
    count = metrics.registry.get_sample_value
    assert count("loupe_dead_letters_total", {"reason": "image_invalid"}) == 0
    publisher.commit(OFFSETS, FakeConsumer())
    assert producer.visible == [b"answer", b"letter"], "each record visible exactly once"
    assert count("loupe_dead_letters_total", {"reason": "image_invalid"}) == 1


def test_a_discarded_batch_publishes_nothing():
    producer = _TransactionalProducer()
    publisher = Publisher(producer, "dlq", LoupeMetrics(), transactional=True)
    publisher.send("responses", b"r1", b"answer", [])
    publisher.discard()
    publisher.commit({}, FakeConsumer())
    assert producer.visible == []


def test_record_checksums_run_in_c(monkeypatch):
    # In pure Python (kafka-python without its crc32c extra) a burst of 500 photo queries
    # spent seconds of CPU on checksums at each end of the topic (bench.search --burst).
    assert checksums_in_c(), "the crc32c package is missing: install kafka-python[crc32c]"
    from kafka.record import util

    monkeypatch.setattr(util, "crc32c_c", None)
    assert not checksums_in_c()
