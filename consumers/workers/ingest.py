"""The ingest consumer: product events in, points in the index, offsets committed after.

Per batch: parse, fetch or decode photos concurrently, encode on the model's device, drop events
older than what is indexed, upsert and delete (waiting until Qdrant applied them), dead-letter
what cannot be processed (waiting for the broker's acknowledgement), then commit. A transient
failure (index or broker) is retried with capped backoff while the consumer stays in its group;
on shutdown mid-retry the batch is abandoned uncommitted and replays idempotently.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.errors import BatchAborted, CommitRetriable
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.handover import HandOver
from loupe.consumers.workers.index_writer import WritesIndex
from loupe.consumers.workers.live_model import ModelInUse
from loupe.consumers.workers.product_stage import ProductStage, StageOutput, event_point_id
from loupe.consumers.workers.vectors import VectorsOut

log = logging.getLogger(__name__)


class IngestWorker(WritesIndex):
    """The ingest: the product stage into the collection in use (and, for a reindex with
    encode-once, into its vectors topic too)."""

    role = "ingest"

    def __init__(
        self,
        basics: WorkerBasics,
        *,
        consumer: KafkaConsumer,
        stage: ProductStage,
        topic: ProductsTopics,
        hand_over: HandOver | None = None,
        vectors_out: VectorsOut | None = None,
    ) -> None:
        """``hand_over``: the service's ingest follows switches of the live collection and
        reports its point count (None: a reindex, which writes one collection only).
        ``vectors_out``: also publish what was written to the collection's vectors topic (a
        reindex, with encode-once)."""
        super().__init__(basics, consumer=consumer, topic=topic)
        self.stage = stage
        self.hand_over = hand_over
        self.vectors_out = vectors_out
        self._unchecked: set[TopicPartition] = set()  # assigned, hand-over not checked yet

    def close(self) -> None:
        self.stage.close()
        super().close()

    # --- following the live collection (consumers/workers/handover.py) ---------------------------

    def commit_metadata(self) -> str:
        return self.index.collection  # each committed offset names the collection it went to

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        if self.hand_over is not None:
            self._unchecked |= partitions  # checked after the poll: a callback must not commit

    def switch_model(self, in_use: ModelInUse) -> None:
        if self.hand_over is not None:
            self.hand_over.leaving(self.index.collection, self.consumer, self._committed)
            self._unchecked |= set(self.consumer.assignment())
        super().switch_model(in_use)

    def after_poll(self, records: list[Any]) -> list[Any]:
        if self.hand_over is None:
            return records
        self.report_points_if_idle(records)
        if not self._unchecked:
            return records
        partitions = self._unchecked & set(self.consumer.assignment())
        self._unchecked = set()
        collection = self.index.collection
        rewound = self.hand_over.rewinds(collection, self.consumer, partitions)
        if rewound:
            self._committed.update(rewound)  # moving back on purpose, once
            offsets = self.hand_over.seek(collection, self.consumer, rewound)
            self.retry(
                "commit the hand-over",
                lambda: self.publisher.commit(offsets, self.consumer),
                (CommitRetriable, BatchAborted),  # offsets alone: trying again is always right
            )
        return [r for r in records if TopicPartition(r.topic, r.partition) not in rewound]

    # --- the batch: the product stage into the index -------------------------------------

    def handle(self, records: list[Any]) -> None:
        out = self.stage.run(records, self.encoder, self.keep_alive_if_due)
        self._write(out)  # dead letters go out with the commit (BatchWorker)

    def _write(self, out: StageOutput) -> None:
        points, deletes = out.points, out.deletes
        written, gone = self.write_index(
            [point for _, point in points],
            [(event_point_id(d.event), d.event.version) for d in deletes],
        )
        if self.vectors_out is not None:  # a reindex's, publishing what it encodes
            model_version = self.encoder.model_version
            written_ids, gone_ids = {p.id for p in written}, set(gone)
            for item, point in points:
                if point.id in written_ids:
                    self.vectors_out.upsert(item.record, point, model_version)
            for item in deletes:
                pid = event_point_id(item.event)
                if pid in gone_ids:
                    self.vectors_out.delete(item.record, pid, item.event, model_version)
