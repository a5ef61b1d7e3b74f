"""Writing a collection: the version rule against what it holds, upserts and deletes retried
while the index is away, and the point-count report; shared by the ingest (products in) and
the index writer (a collection's vectors topic in, ``consumers/workers/vectors.py``).

The index writer never encodes: it applies what an encoder published, so that every index of a
deployment (each replica's, a server's) costs one encode per product, and an index that starts
late catches up at the rate its index takes writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index.interface import IndexPoint, point_id
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.workers.batch import BatchWorker, WorkerBasics
from loupe.consumers.workers.handover import HandOver
from loupe.consumers.workers.live_model import ModelInUse
from loupe.encoders.profile import ModelIdentity
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.products import is_stale
from loupe.schemas.vectors import VectorRecord, parse_vector_record

log = logging.getLogger(__name__)


class WritesIndex(BatchWorker):
    """A worker that writes the collection in use. ``hand_over`` (the service's, not a
    reindex's) takes the point-count report, exact for ``report_offsets()``."""

    hand_over: HandOver | None = None

    def write_index(
        self, upserts: Sequence[IndexPoint], deletes: Sequence[tuple[str, int | None]]
    ) -> tuple[list[IndexPoint], list[str]]:
        """Upsert ``upserts`` and delete ``deletes`` (point id, event version), each unless the
        index holds a newer version; returns what was written. Waits for the index to apply
        them, retrying while it is unavailable."""
        ids = [p.id for p in upserts] + [pid for pid, _ in deletes]
        if not ids:
            return [], []
        index = self.index
        with self.metrics.timer("index_write"):
            stored = self._retry(
                "read versions", lambda: index.stored_versions(ids), (IndexUnavailable,)
            )
            fresh = [p for p in upserts if not is_stale(p.version, stored.get(p.id))]
            gone = [pid for pid, version in deletes if not is_stale(version, stored.get(pid))]
            for _ in range(len(ids) - len(fresh) - len(gone)):
                self._count("stale")
            self._retry("upsert", lambda: index.upsert(fresh), (IndexUnavailable,))
            self._retry("delete", lambda: index.delete(gone), (IndexUnavailable,))
        for _ in fresh:
            self._count("indexed")
        for _ in gone:
            self._count("deleted")
        return fresh, gone

    def report_offsets(self) -> Mapping[TopicPartition, int]:
        """The products-topic offsets the collection's count is exact for now."""
        return self._committed

    def report_points_if_idle(self, records: list[Any]) -> None:
        if not records and self.hand_over is not None and self.hand_over.due_when_idle():
            self._report_points()  # idle: the last batches' count, exact

    def after_commit(self, records: list[Any]) -> None:
        if self.hand_over is not None and self.hand_over.due_after_commit():
            self._report_points()  # an exact count, which the gauge takes too
            return
        # Approximate: an exact count after every batch would be a full count on a server.
        points = self._retry("count", lambda: self.index.count(exact=False), (IndexUnavailable,))
        self.metrics.index_points.set(points)

    def _report_points(self) -> None:
        index = self.index
        exact = self.hand_over.report(
            index.collection,
            lambda: self._retry("count", lambda: index.count(exact=True), (IndexUnavailable,)),
            self.report_offsets(),
        )
        self.metrics.index_points.set(exact)

    def _retry(self, what: str, fn, transient):
        stage = "index_write" if transient == (IndexUnavailable,) else "publish"
        return self.retry(what, fn, transient, stage=stage)

    def _dead_letter(self, record: Any, code, message: str, stage) -> None:
        self.publisher.dead_letter(record, code, message, stage)
        self._count("dead_lettered")

    def _count(self, outcome: str) -> None:
        self.metrics.events.labels(topic=self.topic, outcome=outcome).inc()


class IndexWorker(WritesIndex):
    """A collection's vectors topic into the collection in use, in the index writers' group of
    that collection. When the live model moves, it moves to the new collection's topic and
    group (``make_consumer``), and reads that topic from where the group stands: from its
    beginning the first time, which holds every product of the model (compacted)."""

    role = "index"

    def __init__(
        self,
        basics: WorkerBasics,
        *,
        make_consumer: Callable[[str], tuple[KafkaConsumer, str]],
        products: ProductsTopics,
        hand_over: HandOver | None = None,
    ) -> None:
        """``make_consumer(collection)``: a consumer in that collection's writers' group, and
        the collection's vectors topic (made if missing)."""
        self.make_consumer = make_consumer
        consumer, topic = make_consumer(basics.live.current().collection)
        super().__init__(basics, consumer=consumer, topic=topic)
        self.products = products
        self.hand_over = hand_over
        # How far into the products topic the applied records reach: the report's offsets.
        self._source: dict[TopicPartition, int] = {}

    def switch_model(self, in_use: ModelInUse) -> None:
        super().switch_model(in_use)
        consumer, topic = self.make_consumer(in_use.collection)
        self.replace_consumer(consumer, topic)
        self._source = {}

    def report_offsets(self) -> Mapping[TopicPartition, int]:
        return self._source

    def after_poll(self, records: list[Any]) -> list[Any]:
        self.report_points_if_idle(records)
        return records

    def handle(self, records: list[Any]) -> None:
        latest: dict[str, tuple[Any, VectorRecord]] = {}
        model = self.in_use.identity  # a writer never encodes: the model's name and sizes
        for record in records:
            try:
                vectors = parse_vector_record(record.value)
                _check_fits(vectors, model)
            except InvalidEvent as exc:
                self._dead_letter(record, exc.code, str(exc), "parse")
                continue
            key = point_id(vectors.merchant_id, vectors.product_id)  # not the record's word
            previous = latest.get(key)
            if previous is not None:
                self._count("stale")  # superseded within the batch (or an older one: dropped)
                if is_stale(vectors.version, previous[1].version):
                    continue
            latest[key] = (record, vectors)
        upserts = [
            IndexPoint(v.merchant_id, v.product_id, v.vectors, v.payload, v.version)
            for _, v in latest.values()
            if not v.deleted
        ]
        deletes = [(key, v.version) for key, (_, v) in latest.items() if v.deleted]
        self.write_index(upserts, deletes)
        for _, vectors in latest.values():
            source = TopicPartition(vectors.source.topic, vectors.source.partition)
            if self.products.holds(source.topic):
                self._source[source] = max(self._source.get(source, 0), vectors.source.offset + 1)


def _check_fits(record: VectorRecord, model: ModelIdentity) -> None:
    """A record of another model, or with vectors of other sizes, would poison the collection
    (or fail its upsert for ever): refused, named."""
    model_version, dims = model.model_version, model.dims
    if record.model_version != model_version:
        raise InvalidEvent(
            ErrorCode.INVALID_EVENT,
            f"loupe.model_version: {record.model_version} in the topic of {model_version}",
            field="loupe.model_version",
        )
    for view, vector in (record.vectors or {}).items():
        if len(vector) != dims[view]:
            raise InvalidEvent(
                ErrorCode.INVALID_EVENT,
                f"vector.{view}: {len(vector)} numbers, the model makes {dims[view]}",
                field=f"vector.{view}",
            )
