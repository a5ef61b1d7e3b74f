"""The encoder of encode-once: the products topic into the live collection's vectors topic.

It runs the ingest's stage (``product_stage``: parse, fetch, encode, the version rule within a
batch, dead letters) into another sink: no index, but the collection's vectors topic, whose
records go out in the transaction that commits the batch's offsets, for the index workers to
apply (``consumers/workers/vectors.py``). Its group is the collection's encoders' group,
shared by every instance, so each event is encoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import BatchAborted, CommitRetriable
from loupe.consumers.index.catalog import Catalog
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.workers.batch import BatchWorker, WorkerBasics
from loupe.consumers.workers.live_model import ModelInUse
from loupe.consumers.workers.product_stage import ProductStage, StageOutput, event_point_id
from loupe.consumers.workers.vectors import VectorsOut, unplaced_start


class EncodeWorker(BatchWorker):
    """Encodes for the live collection; after a switch, for the new one, in its group."""

    role = "encode"

    def __init__(
        self,
        basics: WorkerBasics,
        *,
        make_consumer: Callable[[str], KafkaConsumer],
        make_vectors_out: Callable[[str], VectorsOut],
        catalog: Catalog,
        stage: ProductStage,
        topic: ProductsTopics,
    ) -> None:
        """``make_consumer(collection)``: a consumer in that collection's encoders' group;
        ``make_vectors_out(collection)``: its vectors topic (made if missing)."""
        collection = basics.live.current().collection
        super().__init__(basics, consumer=make_consumer(collection), topic=topic)
        self.stage = stage
        self.vectors_out = make_vectors_out(collection)
        self.make_consumer = make_consumer
        self.make_vectors_out = make_vectors_out
        self.catalog = catalog
        self._unplaced: set[TopicPartition] = set()  # assigned, start not checked yet

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self._unplaced |= partitions  # placed after the poll: a callback must not seek

    def switch_model(self, in_use: ModelInUse) -> None:
        super().switch_model(in_use)
        self.vectors_out = self.make_vectors_out(in_use.collection)
        self.replace_consumer(self.make_consumer(in_use.collection), self.source)

    def after_poll(self, records: list[Any]) -> list[Any]:
        """A group that never committed a partition starts it where the collection's card says
        its products are applied up to (a reindex built it that far), not at the beginning."""
        partitions = self._unplaced & set(self.consumer.assignment())
        self._unplaced = set()
        if not partitions:
            return records
        starts = unplaced_start(
            self.catalog, self.in_use.collection, self.consumer, partitions, self.source
        )
        for tp, offset in starts.items():
            self.consumer.seek(tp, offset)
        if starts:
            # Committed at once, so that the group's offsets say where it stands (its lag, and
            # "read to the end") also for a partition no new event reaches for a while.
            self._committed.update(starts)
            meta = self.commit_metadata()
            offsets = {tp: OffsetAndMetadata(o, meta, -1) for tp, o in starts.items()}
            self.retry(
                "commit where the encoders start",
                lambda: self.publisher.commit(offsets, self.consumer),
                (CommitRetriable, BatchAborted),  # offsets alone: trying again is always right
            )
        return [r for r in records if TopicPartition(r.topic, r.partition) not in starts]

    def close(self) -> None:
        self.stage.close()
        super().close()

    def commit_metadata(self) -> str:
        return self.in_use.collection  # each committed offset names the collection it went to

    def handle(self, records: list[Any]) -> None:
        out = self.stage.run(records, self.encoder, self.keep_alive_if_due)
        self._publish(out)  # with the commit (BatchWorker)

    def _publish(self, out: StageOutput) -> None:
        model_version = self.encoder.model_version
        for item, point in out.points:
            self.vectors_out.upsert(item.record, point, model_version)
            self.stage.count("encoded")
        for item in out.deletes:
            pid = event_point_id(item.event)
            self.vectors_out.delete(item.record, pid, item.event, model_version)
            self.stage.count("deleted")
