"""The ingest consumer: product events in, points in the index, offsets committed after.

Per batch: parse, fetch or decode photos concurrently, encode on the model's device, drop events
older than what is indexed, upsert and delete (waiting until Qdrant applied them), dead-letter
what cannot be processed (waiting for the broker's acknowledgement), then commit. A transient
failure (index or broker) is retried with capped backoff while the consumer stays in its group;
on shutdown mid-retry the batch is abandoned uncommitted and replays idempotently.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import (
    BatchAborted,
    CommitRetriable,
    ImageFetchError,
    IndexUnavailable,
    ItemFailed,
    ModelRejected,
    UnexpectedItemError,
)
from loupe.consumers.image_fetch import ImageFetcher
from loupe.consumers.index import IndexPoint, VectorIndex, point_id
from loupe.consumers.kafka_io import Backoff
from loupe.consumers.lifecycle import (
    LiveModel,
    ModelInUse,
    applied_offsets_of,
    merge_applied_offsets,
    read_card,
    report_points,
)
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.publisher import Publisher
from loupe.consumers.worker import BatchWorker
from loupe.encoders.batching import iter_batch
from loupe.encoders.fused import Encoded, EncodeInput, FusedEncoder
from loupe.encoders.preprocess import compose_product_text
from loupe.schemas.errors import InvalidEvent
from loupe.schemas.products import ProductDeleted, ProductUpserted, parse_product_record

log = logging.getLogger(__name__)

FETCH_LOOKAHEAD = 2  # micro-batches fetched ahead of the one being encoded


@dataclass
class _Pending:
    record: Any
    event: ProductUpserted | ProductDeleted
    image: bytes | None = None
    media_type: str | None = None


class Indexer(BatchWorker):
    """Wires one Kafka consumer, a publisher, the index, the encoder and the image fetcher."""

    role = "ingest"

    def __init__(
        self,
        *,
        consumer: KafkaConsumer,
        publisher: Publisher,
        index: VectorIndex,
        encoder: FusedEncoder,
        fetcher: ImageFetcher,
        metrics: LoupeMetrics,
        topic: str,
        encode_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        poll_timeout_ms: int = 500,
        fetch_workers: int = 8,
        backoff: Backoff | None = None,
        live: LiveModel | None = None,
        report_points_every_s: float | None = None,
    ) -> None:
        super().__init__(
            consumer=consumer,
            publisher=publisher,
            metrics=metrics,
            topic=topic,
            poll_timeout_ms=poll_timeout_ms,
            backoff=backoff,
            live=live,
        )
        self.index = index
        self.encoder = encoder
        self.fetcher = fetcher
        self.encode_lock = encode_lock
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")
        self._unchecked: set[TopicPartition] = set()  # assigned, hand-over not checked yet
        self.report_points_every_s = report_points_every_s  # None: no reports (a reindex)
        self._reported_at = float("-inf")
        self._unreported = False

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=True)
        super().close()

    # --- following the live collection -----------------------------------------------------
    #
    # Each committed offset names the collection it was applied to. A partition whose committed
    # offset names another collection (the live one moved: a reindex switched the alias, or a
    # rollback) resumes from the offset up to which the live collection's card says it has
    # applied that partition, if that is earlier: the events in between went to the old
    # collection only. Replays are idempotent, so resuming early costs time, never correctness.

    def commit_metadata(self) -> str:
        return self.index.collection

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self._unchecked |= partitions  # checked after the poll: a callback must not commit

    def switch_model(self, in_use: ModelInUse) -> None:
        # Record how far the collection we leave got, so that a rollback resumes from there.
        left = self.index.collection
        applied = {}
        for tp in self.consumer.assignment():
            if tp in self._committed:
                applied[tp.partition] = self._committed[tp]
            else:
                committed = self.consumer.committed(tp, metadata=True)
                if committed is not None and committed.metadata == left:
                    applied[tp.partition] = committed.offset
        merge_applied_offsets(self.index, left, self.topic, applied)
        self.index, self.encoder = in_use.index, in_use.encoder
        self._unchecked |= set(self.consumer.assignment())

    def after_poll(self, records: list[Any]) -> list[Any]:
        if not records and self._unreported:
            self._report_points()  # idle: the last batches' count, exact
        if not self._unchecked:
            return records
        partitions = self._unchecked & set(self.consumer.assignment())
        self._unchecked = set()
        rewound = self._hand_over(partitions)
        return [r for r in records if TopicPartition(r.topic, r.partition) not in rewound]

    def _hand_over(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        collection = self.index.collection
        applied = applied_offsets_of(read_card(self.index, collection), self.topic)
        rewound: dict[TopicPartition, int] = {}
        for tp in sorted(partitions):
            committed = self.consumer.committed(tp, metadata=True)
            if committed is None or committed.metadata in ("", collection):
                continue  # nothing committed, or committed by this collection's own ingest
            target = applied.get(tp.partition)
            if target is None:  # the card does not say: replay the partition from its start
                target = self.consumer.beginning_offsets([tp])[tp]
            if target < committed.offset:
                rewound[tp] = target
        if not rewound:
            return rewound
        for tp, offset in rewound.items():
            self.consumer.seek(tp, offset)
            self._committed[tp] = offset  # moving back on purpose, once
        log.info(
            "ingest: %s resumes %s from where its own ingest stopped (events after it went to "
            "the previous collection only)",
            collection,
            ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(rewound.items())),
        )
        offsets = {tp: OffsetAndMetadata(o, collection, -1) for tp, o in rewound.items()}
        self.retry(
            "commit the hand-over",
            lambda: self.publisher.commit(offsets, self.consumer),
            (CommitRetriable, BatchAborted),  # offsets alone: trying again is always right
        )
        return rewound

    def after_commit(self, records: list[Any]) -> None:
        if self.report_points_every_s is not None:
            self._unreported = True
            if time.monotonic() - self._reported_at >= self.report_points_every_s:
                self._report_points()  # an exact count, which the gauge takes too
                return
        # Approximate: an exact count after every batch would be a full count on a server.
        points = self._retry("count", lambda: self.index.count(exact=False), (IndexUnavailable,))
        self.metrics.index_points.set(points)

    def _report_points(self) -> None:
        """After a commit (at most every ``report_points_every_s``, and once idle): the
        collection's exact count with the offsets it is exact for (nothing of this worker's is
        in flight), for a reindex to compare with."""
        self._reported_at = time.monotonic()
        self._unreported = False
        exact = self._retry("count", lambda: self.index.count(exact=True), (IndexUnavailable,))
        self.metrics.index_points.set(exact)
        offsets = {tp.partition: o for tp, o in self._committed.items() if tp.topic == self.topic}
        try:
            report_points(self.index, self.topic, exact, offsets)
        except (IndexUnavailable, OSError) as exc:  # a report is advice: the next one mends it
            log.warning("could not report the point count: %s", exc)

    # --- stages ---------------------------------------------------------------------------

    def handle(self, records: list[Any]) -> None:
        latest: dict[str, _Pending] = {}
        with self.metrics.timer("parse"):
            for record in records:
                try:
                    event = parse_product_record(record.key, record.value, record_time(record))
                except InvalidEvent as exc:
                    self._dead_letter(record, exc.code, str(exc), "parse")
                    continue
                key = point_id(event.merchant_id, event.product_id)
                previous = latest.get(key)
                if previous is not None and _newer(previous.event, event):
                    self._count("stale")
                    continue
                if previous is not None:
                    self._count("stale")  # superseded within the batch: the later event wins
                latest[key] = _Pending(record, event)
        upserts = [p for p in latest.values() if isinstance(p.event, ProductUpserted)]
        deletes = [p for p in latest.values() if isinstance(p.event, ProductDeleted)]
        points = self._fetch_and_encode(upserts)
        self._write(points, deletes)  # dead letters go out with the commit (BatchWorker)

    def _fetch_and_encode(self, pending: list[_Pending]) -> list[tuple[_Pending, IndexPoint]]:
        """Fetch photos concurrently and encode them as they arrive, micro-batch by micro-batch:
        the fetch pool works ahead while the model runs, and the encoder's stream prepares
        each micro-batch (decode, tokenize) while the device runs the one before, so neither
        the network nor the device waits for the other."""

        def load(item: _Pending) -> _Pending | ItemFailed:
            try:
                item.image, item.media_type = self.fetcher.load(item.event.image)
            except ImageFetchError as exc:
                return exc
            except Exception as exc:  # this product's failure, not the worker's
                log.exception("loading the photo of %s failed unexpectedly", item.event.key)
                return UnexpectedItemError("fetch", exc)
            return item

        # Fetch at most FETCH_LOOKAHEAD micro-batches ahead of the model: photos in memory stay
        # bounded by (lookahead + 1) * micro-batch * max_image_bytes, whatever the poll size.
        chunks = list(iter_batch(range(len(pending)), self.encoder.batch_size))
        futures: dict[int, Any] = {}

        def submit(chunk_index: int) -> None:
            if chunk_index < len(chunks):
                for i in chunks[chunk_index]:
                    futures[i] = self._fetch_pool.submit(load, pending[i])

        for ahead in range(FETCH_LOOKAHEAD + 1):
            submit(ahead)
        points: list[tuple[_Pending, IndexPoint]] = []
        stream = self.encoder.stream(products=True)
        for index, chunk in enumerate(chunks):
            submit(index + FETCH_LOOKAHEAD + 1)
            ready = []
            with self.metrics.timer("fetch"):  # time spent waiting for photos
                for i in chunk:
                    future = futures.pop(i)
                    while not wait([future], timeout=1.0).done:
                        self.keep_alive_if_due()  # a slow server must not cost the group
                    result = future.result()
                    if isinstance(result, ItemFailed):
                        self._dead_letter(pending[i].record, result.code, str(result), result.stage)
                    else:
                        ready.append(pending[i])
            inputs = [
                EncodeInput(
                    image=p.image,
                    media_type=p.media_type,
                    text=compose_product_text(
                        p.event.title, p.event.attributes, p.event.description
                    ),
                )
                for p in ready
            ]
            with self.metrics.timer("encode"), self.encode_lock():
                finished = stream.put(inputs, tag=ready)
            for done, results in finished:
                points.extend(self._points(done, results))
        with self.metrics.timer("encode"), self.encode_lock():
            finished = stream.flush()
        for done, results in finished:
            points.extend(self._points(done, results))
        return points

    def _points(
        self, pending: list[_Pending], results: list[Encoded]
    ) -> list[tuple[_Pending, IndexPoint]]:
        """The index points of encoded products; the ones that failed are dead-lettered."""
        points = []
        now = datetime.now(UTC).isoformat()
        for item, result in zip(pending, results, strict=True):
            if not result.ok:
                failed = ModelRejected(result.error)
                self._dead_letter(item.record, failed.code, str(failed), failed.stage)
                continue
            event = item.event
            try:
                point = IndexPoint(
                    merchant_id=event.merchant_id,
                    product_id=event.product_id,
                    vectors=result.vectors,
                    version=event.version,
                    payload=_payload(event, self.encoder.model_version, now),
                )
            except Exception as exc:  # this product's failure, not the worker's
                log.exception("building the point of %s failed unexpectedly", event.key)
                failed = UnexpectedItemError("index", exc)
                self._dead_letter(item.record, failed.code, str(failed), failed.stage)
                continue
            points.append((item, point))
        return points

    def _write(self, points: list[tuple[_Pending, IndexPoint]], deletes: list[_Pending]) -> None:
        ids = [p.id for _, p in points] + [
            point_id(d.event.merchant_id, d.event.product_id) for d in deletes
        ]
        if not ids:
            return
        with self.metrics.timer("index_write"):
            stored = self._retry(
                "read versions", lambda: self.index.stored_versions(ids), (IndexUnavailable,)
            )
            fresh = []
            for item, point in points:
                if _older_than_stored(point.version, stored.get(point.id)):
                    self._count("stale")
                else:
                    fresh.append((item, point))
            to_delete = []
            for item in deletes:
                pid = point_id(item.event.merchant_id, item.event.product_id)
                if _older_than_stored(item.event.version, stored.get(pid)):
                    self._count("stale")
                else:
                    to_delete.append(pid)
            self._retry(
                "upsert", lambda: self.index.upsert([p for _, p in fresh]), (IndexUnavailable,)
            )
            self._retry("delete", lambda: self.index.delete(to_delete), (IndexUnavailable,))
        for _ in fresh:
            self._count("indexed")
        for _ in to_delete:
            self._count("deleted")

    # --- helpers ----------------------------------------------------------------------------

    def _retry(self, what: str, fn, transient):
        stage = "index_write" if transient == (IndexUnavailable,) else "publish"
        return self.retry(what, fn, transient, stage=stage)

    def _dead_letter(self, record: Any, code, message: str, stage) -> None:
        self.publisher.dead_letter(record, code, message, stage)
        self._count("dead_lettered")

    def _count(self, outcome: str) -> None:
        self.metrics.events.labels(topic=self.topic, outcome=outcome).inc()


def record_time(record: Any) -> datetime:
    """A Kafka record's timestamp (a tombstone's only 'occurred at')."""
    return datetime.fromtimestamp(max(0, record.timestamp) / 1000, UTC)


def _payload(event: ProductUpserted, model_version: str, indexed_at: str) -> dict[str, Any]:
    attributes = dict(event.attributes)

    def keyword(name: str) -> str | None:
        value = attributes.get(name)
        return value.lower() if isinstance(value, str) else None

    return {
        "merchant_id": event.merchant_id,
        "product_id": event.product_id,
        "title": event.title,
        "description": event.description[:500],
        "attributes": attributes,
        "category": keyword("category"),
        "subcategory": keyword("subcategory"),
        "material": keyword("material"),
        "price": event.price.as_float() if event.price else None,
        "price_amount": event.price.amount if event.price else None,
        "currency": event.price.currency if event.price else None,
        "image_url": event.image.url,
        "version": event.version,
        "model_version": model_version,
        "event_id": event.event_id,
        "indexed_at": indexed_at,
    }


def _newer(a: ProductUpserted | ProductDeleted, b: ProductUpserted | ProductDeleted) -> bool:
    """True if ``a`` (seen earlier in the batch) must win over ``b`` (seen later)."""
    return a.version is not None and b.version is not None and a.version > b.version


def _older_than_stored(incoming: int | None, stored: int | None) -> bool:
    # Equal versions re-apply (an idempotent replay); unversioned events follow Kafka's order.
    return incoming is not None and stored is not None and incoming < stored
