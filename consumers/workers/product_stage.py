"""The product stage: what the ingest and encode-once's encoders do to a batch of product
events, whatever the results go to (an index, a vectors topic): parse them (per merchant,
checking the topic's merchant), keep each product's latest event in the batch, fetch the photos
concurrently, encode them micro-batch by micro-batch, and make each product's index point.

What cannot be processed is dead-lettered here, with its bytes and the reason, and counted; the
batch goes on. The worker that runs the stage decides where its output goes (its sink) and
commits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from loupe.consumers.errors import ImageFetchError, ItemFailed, ModelRejected, UnexpectedItemError
from loupe.consumers.index.interface import IndexPoint, ProductPayload, point_id
from loupe.consumers.kafka.io import record_time
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.workers.image_fetch import ImageFetcher
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


@dataclass
class StageOutput:
    """A batch's products, ready for a sink: the encoded points, and the deletions."""

    points: list[tuple[PendingEvent, IndexPoint]] = field(default_factory=list)
    deletes: list[PendingEvent] = field(default_factory=list)


class ProductStage:
    """Parse, fetch and encode one batch at a time (``run``), with the encoder in use."""

    def __init__(
        self,
        *,
        fetcher: ImageFetcher,
        publisher: Publisher,
        metrics: LoupeMetrics,
        source: ProductsTopics,
        encode_lock: EncodeLock = contextlib.nullcontext,
        fetch_workers: int = 8,
    ) -> None:
        """``publisher``: the worker's, whose dead letters go out with its commit."""
        self.fetcher = fetcher
        self.publisher = publisher
        self.metrics = metrics
        self.source = source
        self.encode_lock = encode_lock
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=True)

    def count(self, outcome: str) -> None:
        self.metrics.events.labels(topic=self.source.label, outcome=outcome).inc()

    def dead_letter(self, record: Any, code, message: str, stage) -> None:
        self.publisher.dead_letter(record, code, message, stage)
        self.count("dead_lettered")

    def run(self, records: list[Any], encoder: Any, keep_alive: Callable[[], None]) -> StageOutput:
        """``encoder``: the ``FusedEncoder`` in use (one for the whole batch); ``keep_alive``:
        the worker's, called while a photo is late."""
        latest: dict[str, PendingEvent] = {}
        with self.metrics.timer("parse"):
            for record in records:
                try:
                    event = parse_product_record(record.key, record.value, record_time(record))
                    self.source.check(record.topic, event.merchant_id)  # per-merchant topics
                except InvalidEvent as exc:
                    self.dead_letter(record, exc.code, str(exc), "parse")
                    continue
                key = point_id(event.merchant_id, event.product_id)
                previous = latest.get(key)
                if previous is not None and is_stale(event.version, previous.event.version):
                    self.count("stale")
                    continue
                if previous is not None:
                    self.count("stale")  # superseded within the batch: the later event wins
                latest[key] = PendingEvent(record, event)
        upserts = [p for p in latest.values() if isinstance(p.event, ProductUpserted)]
        deletes = [p for p in latest.values() if isinstance(p.event, ProductDeleted)]
        return StageOutput(self._fetch_and_encode(upserts, encoder, keep_alive), deletes)

    def _fetch_and_encode(
        self, pending: list[PendingEvent], encoder: Any, keep_alive: Callable[[], None]
    ) -> list[tuple[PendingEvent, IndexPoint]]:
        """Fetch photos concurrently and encode them as they arrive, micro-batch by micro-batch:
        the fetch pool works ahead while the model runs, and the encoder's stream prepares
        each micro-batch (decode, tokenize) while the device runs the one before, so neither
        the network nor the device waits for the other."""
        chunks = fetch_ahead(self._fetch_pool, self._load, pending, encoder.batch_size, keep_alive)
        points: list[tuple[PendingEvent, IndexPoint]] = []
        stream = encoder.stream(products=True)
        while True:
            with self.metrics.timer("fetch"):  # time spent waiting for photos
                fetched = next(chunks, None)
            if fetched is None:
                break
            ready = []
            for item, result in fetched:
                if isinstance(result, ItemFailed):
                    self.dead_letter(item.record, result.code, str(result), result.stage)
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
                points.extend(self._points(done, results, encoder.model_version))
        with self.metrics.timer("encode"), self.encode_lock():
            finished = stream.flush()
        for done, results in finished:
            points.extend(self._points(done, results, encoder.model_version))
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
        self, pending: list[PendingEvent], results: list[Encoded], model_version: str
    ) -> list[tuple[PendingEvent, IndexPoint]]:
        """The index points of encoded products; the ones that failed are dead-lettered."""
        points = []
        now = datetime.now(UTC).isoformat()
        for item, result in zip(pending, results, strict=True):
            if not result.ok:
                failed = ModelRejected(result.error)
                self.dead_letter(item.record, failed.code, str(failed), failed.stage)
                continue
            event = item.event
            try:
                point = IndexPoint(
                    merchant_id=event.merchant_id,
                    product_id=event.product_id,
                    vectors=result.vectors,
                    version=event.version,
                    payload=product_payload(event, model_version, now).to_dict(),
                )
            except Exception as exc:  # this product's failure, not the worker's
                log.exception("building the point of %s failed unexpectedly", event.key)
                failed = UnexpectedItemError("index", exc)
                self.dead_letter(item.record, failed.code, str(failed), failed.stage)
                continue
            points.append((item, point))
        return points


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
