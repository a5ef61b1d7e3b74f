"""In-memory stand-ins for the unit tests. The service's real parts are tested against the real
Kafka broker and Qdrant in tests/integration/; these let one policy be tested alone."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition


def _tp(record: Any) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


class FakeConsumer:
    """kafka-python's ``KafkaConsumer`` as Loupe's workers and publisher use it, in memory.

    ``records``: what ``poll`` returns, each partition from its position on (the first record's
    offset unless ``positions`` says otherwise). ``committed``: the group's committed offsets
    (ints or ``OffsetAndMetadata``; a dict the test may share with a fake broker). ``ends``: the
    partitions' end offsets (default: past their last record). ``commit_errors``: raised by
    the next commits, one each. ``end_errors``: how many ``end_offsets`` calls fail first.
    ``topics``: the topics the cluster has (``topics()``)."""

    def __init__(
        self,
        records: Iterable[Any] = (),
        *,
        assigned: Iterable[TopicPartition] | None = None,
        positions: Mapping[TopicPartition, int] | None = None,
        committed: dict[TopicPartition, Any] | None = None,
        ends: Mapping[TopicPartition, int] | None = None,
        begin: int = 0,
        commit_errors: Iterable[BaseException] = (),
        end_errors: int = 0,
        topics: Iterable[str] = (),
    ) -> None:
        self.records = list(records)
        self.cluster_topics = set(topics)
        self.positions = dict(positions or {})
        for record in self.records:
            self.positions.setdefault(_tp(record), record.offset)
        self.committed_offsets = committed if committed is not None else {}
        if assigned is None:
            assigned = {*self.positions, *self.committed_offsets}
        self._assigned = set(assigned)
        self.ends = dict(ends) if ends is not None else None
        self.begin = begin
        self.commit_errors = list(commit_errors)
        self.end_errors = end_errors
        self.commits: list[dict] = []
        self.seeks: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.listener = None
        self.closed = False

    def subscribe(self, topics, listener=None) -> None:
        self.listener = listener

    def topics(self) -> set[str]:
        return self.cluster_topics | {tp.topic for tp in self._assigned}

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def partitions_for_topic(self, topic: str) -> set[int]:
        """The cluster's partitions of ``topic``: those assigned, positioned or with an end."""
        known = {*self._assigned, *self.positions, *(self.ends or {})}
        return {tp.partition for tp in known if tp.topic == topic}

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list]:
        polled = {}
        for tp in sorted(self._assigned - self._paused):
            batch = [
                r for r in self.records if _tp(r) == tp and r.offset >= self.positions.get(tp, 0)
            ]
            if batch:
                polled[tp] = batch
                self.positions[tp] = batch[-1].offset + 1
        return polled

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset
        self.positions[tp] = offset

    def committed(self, tp: TopicPartition, metadata: bool = False, timeout_ms=None):
        stored = self.committed_offsets.get(tp)
        if stored is None:
            return None
        if isinstance(stored, int):
            stored = OffsetAndMetadata(stored, "", -1)
        return stored if metadata else stored.offset

    def commit(self, offsets) -> None:
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append(offsets)

    def group_metadata(self) -> str:
        return "group"

    def beginning_offsets(self, partitions) -> dict[TopicPartition, int]:
        return {tp: self.begin for tp in partitions}

    def end_offsets(self, partitions) -> dict[TopicPartition, int]:
        if self.end_errors:
            from kafka.errors import KafkaTimeoutError

            self.end_errors -= 1
            raise KafkaTimeoutError("end offsets")
        if self.ends is not None:
            return {tp: self.ends[tp] for tp in partitions}
        last = {_tp(r): r.offset + 1 for r in self.records}
        return {tp: last.get(tp, self.positions.get(tp, self.begin)) for tp in partitions}

    def pause(self, *partitions) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def close(self, autocommit: bool = False) -> None:
        self.closed = True
