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
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.errors import (
    BatchAborted,
    CommitRetriable,
    ImageFetchError,
    ItemFailed,
    ModelRejected,
    UnexpectedItemError,
)
from loupe.consumers.handover import HandOver
from loupe.consumers.image_fetch import ImageFetcher
from loupe.consumers.index import IndexPoint, ProductPayload, point_id
from loupe.consumers.index_writer import WritesIndex
from loupe.consumers.kafka_io import Backoff
from loupe.consumers.live_model import LiveModel, ModelInUse
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.products_topics import ProductsTopics
from loupe.consumers.publisher import Publisher
from loupe.consumers.vectors import VectorsOut
from loupe.encoders.batching import iter_batch
from loupe.encoders.fused import Encoded, EncodeInput
from loupe.encoders.preprocess import compose_product_text
from loupe.schemas.errors import InvalidEvent
from loupe.schemas.products import (
    ProductDeleted,
    ProductUpserted,
    is_stale,
    parse_product_record,
)

log = logging.getLogger(__name__)

EncodeLock = Callable[[], AbstractContextManager[Any]]  # the model's turn (service.EncoderGate)
FETCH_LOOKAHEAD = 2  # micro-batches fetched ahead of the one being encoded
T = TypeVar("T")


@dataclass
class PendingEvent:
    record: Any
    event: ProductUpserted | ProductDeleted
    image: bytes | None = None
    media_type: str | None = None


class Indexer(WritesIndex):
    """Wires one Kafka consumer, a publisher, the index, the encoder and the image fetcher."""

    role = "ingest"

    def __init__(
        self,
        *,
        consumer: KafkaConsumer,
        publisher: Publisher,
        live: LiveModel,
        fetcher: ImageFetcher,
        metrics: LoupeMetrics,
        topic: ProductsTopics,
        encode_lock: EncodeLock = contextlib.nullcontext,
        poll_timeout_ms: int = 500,
        fetch_workers: int = 8,
        backoff: Backoff | None = None,
        hand_over: HandOver | None = None,
        stop_event: threading.Event | None = None,
        vectors_out: VectorsOut | None = None,
    ) -> None:
        """``hand_over``: the service's ingest follows switches of the live collection and
        reports its point count (None: a reindex, which writes one collection only).
        ``vectors_out``: also publish what was written to the collection's vectors topic (a
        reindex, with encode-once)."""
        super().__init__(
            consumer=consumer,
            publisher=publisher,
            metrics=metrics,
            topic=topic,
            poll_timeout_ms=poll_timeout_ms,
            backoff=backoff,
            live=live,
            stop_event=stop_event,
        )
        self.fetcher = fetcher
        self.encode_lock = encode_lock
        self.hand_over = hand_over
        self.vectors_out = vectors_out
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")
        self._unchecked: set[TopicPartition] = set()  # assigned, hand-over not checked yet

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=True)
        super().close()

    # --- following the live collection (consumers/handover.py) ---------------------------

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

    # --- stages ---------------------------------------------------------------------------

    def handle(self, records: list[Any]) -> None:
        latest: dict[str, PendingEvent] = {}
        with self.metrics.timer("parse"):
            for record in records:
                try:
                    event = parse_product_record(record.key, record.value, record_time(record))
                    self.source.check(record.topic, event.merchant_id)  # per-merchant topics
                except InvalidEvent as exc:
                    self._dead_letter(record, exc.code, str(exc), "parse")
                    continue
                key = point_id(event.merchant_id, event.product_id)
                previous = latest.get(key)
                if previous is not None and is_stale(event.version, previous.event.version):
                    self._count("stale")
                    continue
                if previous is not None:
                    self._count("stale")  # superseded within the batch: the later event wins
                latest[key] = PendingEvent(record, event)
        upserts = [p for p in latest.values() if isinstance(p.event, ProductUpserted)]
        deletes = [p for p in latest.values() if isinstance(p.event, ProductDeleted)]
        points = self._fetch_and_encode(upserts)
        self._write(points, deletes)  # dead letters go out with the commit (BatchWorker)

    def _fetch_and_encode(
        self, pending: list[PendingEvent]
    ) -> list[tuple[PendingEvent, IndexPoint]]:
        """Fetch photos concurrently and encode them as they arrive, micro-batch by micro-batch:
        the fetch pool works ahead while the model runs, and the encoder's stream prepares
        each micro-batch (decode, tokenize) while the device runs the one before, so neither
        the network nor the device waits for the other."""
        chunks = fetch_ahead(
            self._fetch_pool, self._load, pending, self.encoder.batch_size, self.keep_alive_if_due
        )
        points: list[tuple[PendingEvent, IndexPoint]] = []
        stream = self.encoder.stream(products=True)
        while True:
            with self.metrics.timer("fetch"):  # time spent waiting for photos
                fetched = next(chunks, None)
            if fetched is None:
                break
            ready = []
            for item, result in fetched:
                if isinstance(result, ItemFailed):
                    self._dead_letter(item.record, result.code, str(result), result.stage)
                else:
                    ready.append(item)
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

    def _load(self, item: PendingEvent) -> PendingEvent | ItemFailed:
        try:
            item.image, item.media_type = self.fetcher.load(item.event.image)
        except ImageFetchError as exc:
            return exc
        except Exception as exc:  # this product's failure, not the worker's
            log.exception("loading the photo of %s failed unexpectedly", item.event.key)
            return UnexpectedItemError("fetch", exc)
        return item

    def _points(
        self, pending: list[PendingEvent], results: list[Encoded]
    ) -> list[tuple[PendingEvent, IndexPoint]]:
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
                    payload=product_payload(event, self.encoder.model_version, now).to_dict(),
                )
            except Exception as exc:  # this product's failure, not the worker's
                log.exception("building the point of %s failed unexpectedly", event.key)
                failed = UnexpectedItemError("index", exc)
                self._dead_letter(item.record, failed.code, str(failed), failed.stage)
                continue
            points.append((item, point))
        return points

    def _write(
        self, points: list[tuple[PendingEvent, IndexPoint]], deletes: list[PendingEvent]
    ) -> None:
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


def event_point_id(event: ProductUpserted | ProductDeleted) -> str:
    return point_id(event.merchant_id, event.product_id)


def fetch_ahead(
    pool: ThreadPoolExecutor,
    load: Callable[[T], Any],
    items: list[T],
    chunk_size: int,
    while_waiting: Callable[[], None],
    lookahead: int = FETCH_LOOKAHEAD,
) -> Iterator[list[tuple[T, Any]]]:
    """``load`` each item in ``pool``, yielding them chunk by chunk with their results, at most
    ``lookahead`` chunks ahead of the one yielded: photos in memory stay bounded by
    (lookahead + 1) * chunk * max_image_bytes, whatever the poll size. ``while_waiting`` is
    called every second a result is late (the worker's keep-alive)."""
    chunks = list(iter_batch(range(len(items)), chunk_size))
    futures: dict[int, Future] = {}

    def submit(chunk_index: int) -> None:
        if chunk_index < len(chunks):
            for i in chunks[chunk_index]:
                futures[i] = pool.submit(load, items[i])

    for ahead in range(lookahead + 1):
        submit(ahead)
    for index, chunk in enumerate(chunks):
        submit(index + lookahead + 1)
        done = []
        for i in chunk:
            future = futures.pop(i)
            while not wait([future], timeout=1.0).done:
                while_waiting()  # a slow server must not cost the group
            done.append((items[i], future.result()))
        yield done


def record_time(record: Any) -> datetime:
    """A Kafka record's timestamp (a tombstone's only 'occurred at')."""
    return datetime.fromtimestamp(max(0, record.timestamp) / 1000, UTC)


def product_payload(event: ProductUpserted, model_version: str, indexed_at: str) -> ProductPayload:
    attributes = dict(event.attributes)

    def keyword(name: str) -> str | None:
        value = attributes.get(name)
        return value.lower() if isinstance(value, str) else None

    return ProductPayload(
        merchant_id=event.merchant_id,
        product_id=event.product_id,
        title=event.title,
        description=event.description[:500],
        attributes=attributes,
        category=keyword("category"),
        subcategory=keyword("subcategory"),
        material=keyword("material"),
        price=event.price.as_float() if event.price else None,
        price_amount=event.price.amount if event.price else None,
        currency=event.price.currency if event.price else None,
        image_url=event.image.url,
        version=event.version,
        model_version=model_version,
        event_id=event.event_id,
        indexed_at=indexed_at,
    )
