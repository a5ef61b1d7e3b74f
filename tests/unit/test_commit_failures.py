"""The failure policy of a batch's publish and commit: each of Kafka's classes of error, raised
where kafka-python raises it, ends as the policy says (retry, abort and replay, replace the
producer, or stop), and no record becomes visible twice.

The wrapped errors are made by kafka-python's own transaction manager, so that a change in how
the client words them fails here rather than in a broker outage."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kafka import errors as kafka_errors
from kafka.producer.transaction_manager import (
    AddOffsetsToTxnHandler,
    TransactionManager,
    TransactionState,
)
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import BatchAborted, CommitRetriable, PublisherFailed
from loupe.consumers.kafka.failures import Failure, classify, describe, root_cause
from loupe.consumers.kafka.io import Backoff
from loupe.consumers.kafka.publisher import MAX_FATAL_IN_A_ROW, Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.workers.batch import BatchWorker, WorkerBasics
from tests.fakes import FakeConsumer

TP = TopicPartition("requests", 0)
OFFSETS = {TP: OffsetAndMetadata(8, "", -1)}


def _client_failure(cause: Exception) -> tuple[Exception, Exception]:
    """What kafka-python raises when a transactional request fails with ``cause`` (as a request
    to a paused broker times out): the error of that call, and of the next call on the
    producer (its abort)."""
    manager = TransactionManager(transactional_id="t", transaction_timeout_ms=1000)
    manager._current_state = TransactionState.IN_TRANSACTION
    handler = AddOffsetsToTxnHandler(manager, ConsumerGroupMetadata(group_id="g"), OFFSETS)
    manager._in_flight_request_correlation_id = 1
    handler.on_complete(1, cause)
    with pytest.raises(kafka_errors.KafkaError) as next_call:
        manager.begin_abort()
    return handler.result.exception, next_call.value


TIMED_OUT, ABORT_REFUSED = _client_failure(kafka_errors.RequestTimedOutError("after 30000 ms"))


# --- classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (kafka_errors.RequestTimedOutError(), Failure.RETRIABLE),
        (kafka_errors.KafkaTimeoutError("Timeout expired"), Failure.RETRIABLE),
        (kafka_errors.NotCoordinatorError(), Failure.RETRIABLE),
        (kafka_errors.CoordinatorLoadInProgressError(), Failure.RETRIABLE),
        (kafka_errors.KafkaConnectionError("socket disconnected"), Failure.RETRIABLE),
        (ConnectionResetError(104, "reset"), Failure.RETRIABLE),
        (kafka_errors.CommitFailedError(), Failure.ABORTABLE),
        (kafka_errors.GroupAuthorizationFailedError("g"), Failure.ABORTABLE),
        (kafka_errors.KafkaError("something new"), Failure.ABORTABLE),
        (kafka_errors.ProducerFencedError(), Failure.FATAL),
        (kafka_errors.InvalidProducerEpochError(), Failure.FATAL),
        (kafka_errors.TransactionalIdAuthorizationFailedError(), Failure.FATAL),
        (kafka_errors.KafkaError(kafka_errors.InvalidTxnStateError()), Failure.FATAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.value,
)
def test_each_error_falls_in_kafkas_class(error, expected):
    assert classify(error) is expected


def test_a_timeout_wrapped_by_the_client_is_a_timeout():
    # The trace: a bare KafkaError naming "[Error 7] RequestTimedOutError".
    assert type(TIMED_OUT) is kafka_errors.KafkaError
    assert isinstance(root_cause(TIMED_OUT), kafka_errors.RequestTimedOutError)
    assert classify(TIMED_OUT) is Failure.RETRIABLE
    # ... and so is the error of the next call on that producer, which wraps the wrapper.
    assert isinstance(root_cause(ABORT_REFUSED), kafka_errors.RequestTimedOutError)
    assert describe(ABORT_REFUSED) == "[Error 7] RequestTimedOutError: after 30000 ms"


def test_an_explicit_cause_wins():
    try:
        try:
            raise kafka_errors.ProducerFencedError()
        except kafka_errors.KafkaError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert classify(outer) is Failure.FATAL


# --- the transactional path ---------------------------------------------------------------


class _Broker:
    """What a read_committed reader sees, and the group's committed offsets, across producers."""

    def __init__(self) -> None:
        self.visible: list[bytes] = []
        self.committed: dict[TopicPartition, int] = {}


@dataclass
class _Fail:
    at: str  # "offsets" or "commit"
    error: Exception
    fatal: bool = False  # leaves the producer unable to abort (kafka-python's fatal state)
    lands: bool = False  # the transaction commits on the broker all the same (a lost answer)


class _Producer:
    def __init__(self, broker: _Broker, failures: list[_Fail] | None = None) -> None:
        self.broker = broker
        self.failures = failures or []
        self.calls: list[str] = []
        self.closed = False
        self._open: list[bytes] = []
        self._offsets: dict = {}
        self._fatal: Exception | None = None

    def begin_transaction(self):
        self.calls.append("begin")
        self._open, self._offsets = [], {}

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        self._open.append(value)

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self._offsets = offsets
        self._maybe_fail("offsets")

    def commit_transaction(self):
        self._maybe_fail("commit")
        self._land()
        self.calls.append("commit")

    def abort_transaction(self):
        if self._fatal is not None:
            raise ABORT_REFUSED
        self.calls.append("abort")

    def close(self, timeout=None):
        self.closed = True

    def _maybe_fail(self, at: str) -> None:
        if self.failures and self.failures[0].at == at:
            failure = self.failures.pop(0)
            if failure.lands:
                self._land()
            if failure.fatal:
                self._fatal = failure.error
            raise failure.error

    def _land(self) -> None:
        self.broker.visible += self._open
        for tp, meta in self._offsets.items():
            self.broker.committed[tp] = meta.offset


class _Factory:
    """Makes replacement producers; ``refusals`` are raised by the next makes, in order."""

    def __init__(self, broker: _Broker, refusals: list[Exception] | None = None) -> None:
        self.broker, self.refusals, self.made = broker, refusals or [], []

    def __call__(self) -> _Producer:
        if self.refusals:
            raise self.refusals.pop(0)
        producer = _Producer(self.broker)
        self.made.append(producer)
        return producer


def _publisher(broker, failures, refusals=None) -> tuple[Publisher, _Producer, _Factory]:
    producer, factory = _Producer(broker, failures), _Factory(broker, refusals)
    publisher = Publisher(
        producer, "dlq", LoupeMetrics(), transactional=True, make_producer=factory, name="t"
    )
    publisher.send("responses", b"r1", b"answer", [])
    return publisher, producer, factory


def test_a_retriable_error_with_the_transaction_aborted_retries_the_same_records():
    broker = _Broker()
    failure = _Fail("commit", kafka_errors.NotCoordinatorError())
    publisher, producer, factory = _publisher(broker, [failure])
    with pytest.raises(CommitRetriable) as raised:
        publisher.commit(OFFSETS, FakeConsumer())
    assert raised.value.failure is Failure.RETRIABLE and producer.calls[-1] == "abort"
    assert not publisher.unsettled and factory.made == []
    publisher.commit(OFFSETS, FakeConsumer())  # what the worker's retry does
    assert broker.visible == [b"answer"] and broker.committed == {TP: 8}


@pytest.mark.parametrize("at", ["offsets", "commit"])
def test_a_timed_out_request_replaces_the_producer_and_leaves_the_answer_to_the_offsets(at):
    broker = _Broker()
    publisher, producer, factory = _publisher(broker, [_Fail(at, TIMED_OUT, fatal=True)])
    with pytest.raises(BatchAborted) as raised:
        publisher.commit(OFFSETS, FakeConsumer())
    assert raised.value.failure is Failure.RETRIABLE
    assert producer.closed and len(factory.made) == 1 and publisher.producer is factory.made[0]
    assert publisher.unsettled, "only the committed offsets can say what happened"
    publisher.settle(published=False)
    publisher.send("responses", b"r1", b"answer", [])  # the batch handled again
    publisher.commit(OFFSETS, FakeConsumer())
    assert broker.visible == [b"answer"]


def test_a_replacement_that_waits_for_the_broker_is_retried_then_settles():
    broker = _Broker()
    down = kafka_errors.KafkaTimeoutError("Timeout expired while initializing transactional state")
    publisher, _, factory = _publisher(broker, [_Fail("commit", TIMED_OUT, fatal=True)], [down])
    with pytest.raises(CommitRetriable):
        publisher.commit(OFFSETS, FakeConsumer())  # the broker is away: no producer yet
    assert publisher.producer is None and publisher.unsettled
    with pytest.raises(BatchAborted):  # back: a new producer, and the offsets to be read
        publisher.commit(OFFSETS, FakeConsumer())
    assert len(factory.made) == 1 and broker.visible == []


def test_a_fenced_producer_is_replaced():
    broker = _Broker()
    fenced = _Fail("offsets", kafka_errors.ProducerFencedError(), fatal=True)
    publisher, producer, factory = _publisher(broker, [fenced])
    with pytest.raises(BatchAborted) as raised:
        publisher.commit(OFFSETS, FakeConsumer())
    assert raised.value.failure is Failure.FATAL and producer.closed and len(factory.made) == 1


def test_a_replacement_refused_stops_with_the_reason():
    broker = _Broker()
    refused = kafka_errors.TransactionalIdAuthorizationFailedError()
    fenced = _Fail("offsets", kafka_errors.ProducerFencedError(), fatal=True)
    publisher, _, _ = _publisher(broker, [fenced], [refused])
    with pytest.raises(PublisherFailed, match="TransactionalIdAuthorizationFailed"):
        publisher.commit(OFFSETS, FakeConsumer())


def test_fatal_errors_that_keep_coming_stop_the_publisher():
    broker = _Broker()
    publisher, _, factory = _publisher(broker, [])
    for n in range(MAX_FATAL_IN_A_ROW + 1):
        publisher.producer.failures = [
            _Fail("offsets", kafka_errors.InvalidProducerEpochError(), fatal=True)
        ]
        if n < MAX_FATAL_IN_A_ROW:
            with pytest.raises(BatchAborted):
                publisher.commit(OFFSETS, FakeConsumer())
            publisher.settle(published=False)
        else:
            with pytest.raises(PublisherFailed, match="in a row"):
                publisher.commit(OFFSETS, FakeConsumer())
    assert len(factory.made) == MAX_FATAL_IN_A_ROW


def test_an_abortable_error_aborts_without_replacing():
    broker = _Broker()
    moved = _Fail("offsets", kafka_errors.CommitFailedError())
    publisher, producer, factory = _publisher(broker, [moved])
    with pytest.raises(BatchAborted) as raised:
        publisher.commit(OFFSETS, FakeConsumer())
    assert raised.value.failure is Failure.ABORTABLE
    assert producer.calls[-1] == "abort" and factory.made == [] and not publisher.unsettled


def test_without_a_factory_a_lost_producer_stops_the_publisher():
    broker = _Broker()
    producer = _Producer(broker, [_Fail("commit", TIMED_OUT, fatal=True)])
    publisher = Publisher(producer, "dlq", LoupeMetrics(), transactional=True)
    with pytest.raises(PublisherFailed, match="cannot be replaced"):
        publisher.commit(OFFSETS, FakeConsumer())


# --- the at-least-once path ----------------------------------------------------------------


class _Future:
    def __init__(self, error=None) -> None:
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error


class _PlainProducer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.sent, self.closed = error, [], False

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        error, self.error = self.error, None
        if error is None:
            self.sent.append(value)
        return _Future(error)

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        self.closed = True


def test_at_least_once_a_fatal_send_replaces_the_producer_and_sends_again():
    first = _PlainProducer(kafka_errors.OutOfOrderSequenceNumberError())
    second = _PlainProducer()
    publisher = Publisher(first, "dlq", LoupeMetrics(), make_producer=lambda: second)
    publisher.send("responses", b"r1", b"answer", [])
    consumer = FakeConsumer()
    with pytest.raises(CommitRetriable):
        publisher.commit(OFFSETS, consumer)
    assert first.closed and publisher.producer is second
    publisher.commit(OFFSETS, consumer)
    assert second.sent == [b"answer"] and consumer.commits == [OFFSETS]


def test_at_least_once_a_group_that_moved_on_aborts_the_batch():
    publisher = Publisher(_PlainProducer(), "dlq", LoupeMetrics())
    with pytest.raises(BatchAborted):
        publisher.commit(OFFSETS, FakeConsumer(commit_errors=[kafka_errors.CommitFailedError()]))


# --- the worker: the committed offsets decide -----------------------------------------------


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes = b"k"
    value: bytes = b"v"
    headers: tuple = ()


class _Answering(BatchWorker):
    """Answers each record with its value, as the search service answers a request."""

    role = "search"

    def __init__(self, basics: WorkerBasics, **kwargs) -> None:
        super().__init__(basics, **kwargs)
        self.handled: list[int] = []

    def handle(self, records):
        for record in records:
            self.handled.append(record.offset)
            self.publisher.send("responses", record.key, record.value, [])


@pytest.mark.parametrize("lands", [False, True], ids=["not committed", "committed after all"])
def test_a_commit_lost_with_its_producer_is_answered_exactly_once(lands):
    broker = _Broker()
    records = [_Record("requests", 0, n, value=f"answer {n}".encode()) for n in range(3)]
    consumer = FakeConsumer(records, committed=broker.committed)
    lost = _Fail("commit", TIMED_OUT, fatal=True, lands=lands)
    producer = _Producer(broker, [lost])
    publisher = Publisher(
        producer, "dlq", LoupeMetrics(), transactional=True, make_producer=_Factory(broker)
    )
    worker = _Answering(
        WorkerBasics(
            publisher=publisher,
            metrics=LoupeMetrics(),
            backoff=Backoff(initial_s=0.001, cap_s=0.002),
        ),
        consumer=consumer,
        topic="requests",
    )
    first = worker.process_once()
    assert first == (3 if lands else 0)
    worker.process_once()  # the batch again, or nothing new
    assert broker.visible == [b"answer 0", b"answer 1", b"answer 2"], "each answer once"
    assert broker.committed == {TP: 3}
    assert worker.handled == [0, 1, 2] if lands else [0, 1, 2, 0, 1, 2]
    assert worker.waiting_on is None


def test_a_topic_the_acls_refuse_stops_the_worker_instead_of_replaying_for_ever():
    """Replaying a batch cannot cure a missing ACL: the worker stops, naming what was refused."""
    broker = _Broker()
    records = [_Record("requests", 0, 0)]
    refusal = kafka_errors.TopicAuthorizationFailedError({"responses"})
    producer = _Producer(broker, [_Fail("commit", refusal)])
    publisher = Publisher(
        producer, "dlq", LoupeMetrics(), transactional=True, make_producer=_Factory(broker)
    )
    worker = _Answering(
        WorkerBasics(
            publisher=publisher,
            metrics=LoupeMetrics(),
            backoff=Backoff(initial_s=0.001, cap_s=0.002),
        ),
        consumer=FakeConsumer(records, committed=broker.committed),
        topic="requests",
    )
    with pytest.raises(PublisherFailed, match=r"TopicAuthorizationFailedError.*grant the ACLs"):
        worker.process_once()
    assert broker.visible == [] and producer.calls[-1] == "abort"
