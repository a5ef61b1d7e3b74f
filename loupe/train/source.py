"""The catalog to train on: the latest state of every product, from the products topic (read from
the beginning: the topic is the source of truth) or from a JSON-lines file of product events.

Events are applied as the ingest consumer applies them: per product key, a newer ``version``
wins and an older one is ignored (unversioned events follow their order), and a
``product.deleted`` removes the product. Images are read inline or fetched by URL under the same
policy as ingest (``FetchPolicy``: scheme, addresses, size and time limits). A product whose
event or image cannot be used is left out and counted, with the first reasons logged: training
is a batch job over a copy of the catalog, not the service, so nothing is dead-lettered here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loupe.consumers.kafka.io import record_time
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher
from loupe.encoders.errors import ModelError
from loupe.encoders.images import DecodeLimits, decode_image
from loupe.encoders.preprocess import compose_product_text
from loupe.progress import progress
from loupe.schemas.errors import ErrorCode, InvalidEvent, LoupeError
from loupe.schemas.products import ProductUpserted, is_stale, parse_product_record

log = logging.getLogger(__name__)

MAX_EVENT_LINE_BYTES = 16 * 1024 * 1024  # a JSON line larger than this is not a product event
MAX_REASONS_LOGGED = 5


class CatalogSourceError(LoupeError):
    """The catalog could not be read at all (no topic, no file, nothing usable). Policy: stop
    and say what is missing."""


@dataclass(frozen=True)
class TrainingProduct:
    key: str  # <merchant_id>/<product_id>
    title: str
    attributes: Mapping[str, object]
    description: str
    image: bytes
    media_type: str | None = None

    @property
    def text(self) -> str:
        """The text the index holds for this product (the same composition as ingest)."""
        return compose_product_text(self.title, self.attributes, self.description)

    @property
    def category(self) -> str | None:
        """The ``category`` attribute, used only to measure category precision."""
        value = self.attributes.get("category")
        return value.strip().lower() if isinstance(value, str) and value.strip() else None


def _its_merchants(products: ProductsTopics, record) -> bool:
    """Per merchant: whether the event in ``record`` is its topic's merchant's (the service
    dead-letters one that is not, so training leaves it out too; one that does not parse is
    left for ``latest_products`` to count as invalid)."""
    if not products.per_merchant:
        return True
    try:
        event = parse_product_record(record.key, record.value, record_time(record))
        products.check(record.topic, event.merchant_id)
    except InvalidEvent as exc:
        if exc.code != ErrorCode.MERCHANT_MISMATCH:
            return True
        log.warning("left out of training: %s", exc)
        return False
    return True


@dataclass
class ReadReport:
    events: int = 0
    invalid: int = 0
    deleted: int = 0
    superseded: int = 0
    images_failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def note(self, reason: str) -> None:
        if len(self.reasons) < MAX_REASONS_LOGGED:
            self.reasons.append(reason)
            log.warning("left out of training: %s", reason)


Record = tuple[bytes | None, bytes | None, datetime]  # key, value, time


def latest_products(records: Iterable[Record], report: ReadReport) -> dict[str, ProductUpserted]:
    """The latest upsert per product key after applying every event (or tombstone) in order."""
    latest: dict[str, ProductUpserted] = {}
    for key, value, at in records:
        report.events += 1
        try:
            event = parse_product_record(key, value, at)
        except LoupeError as exc:
            report.invalid += 1
            report.note(f"event {report.events}: {exc}")
            continue
        current = latest.get(event.key)
        if current is not None and is_stale(event.version, current.version):
            report.superseded += 1
            continue
        if isinstance(event, ProductUpserted):
            latest[event.key] = event
        else:
            report.deleted += latest.pop(event.key, None) is not None
    return latest


def with_images(
    events: dict[str, ProductUpserted],
    policy: FetchPolicy,
    limits: DecodeLimits,
    report: ReadReport,
    workers: int = 8,
) -> list[TrainingProduct]:
    """Each product with its image bytes; a product whose image cannot be fetched or decoded
    under the model's limits (as ingest would refuse it) is left out."""
    fetcher = ImageFetcher(policy)

    def load(event: ProductUpserted) -> TrainingProduct | None:
        try:
            data, media_type = fetcher.load(event.image)
            decode_image(data, limits=limits, media_type=media_type)
        except (LoupeError, ModelError) as exc:
            report.images_failed += 1
            report.note(f"{event.key}: {exc}")
            return None
        return TrainingProduct(
            key=event.key,
            title=event.title,
            attributes=dict(event.attributes),
            description=event.description,
            image=data,
            media_type=media_type,
        )

    ordered = [events[key] for key in sorted(events)]  # a stable order: the split depends on it
    products: list[TrainingProduct] = []
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="image") as pool,
        progress(total=len(ordered), desc="images", unit="product") as bar,
    ):
        for product in pool.map(load, ordered):
            bar.update(1)
            if product is not None:
                products.append(product)
    return products


def read_jsonl(path: Path) -> Iterator[Record]:
    """Each line of a JSON-lines file of product events (blank lines skipped), as a record."""
    if not path.is_file():
        raise CatalogSourceError(f"{path} is not a file of product events (JSON lines)")
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if len(line) > MAX_EVENT_LINE_BYTES:
                raise CatalogSourceError(
                    f"{path}:{number} is {len(line)} bytes; a product event is at most "
                    f"{MAX_EVENT_LINE_BYTES} (is this a JSON-lines file of product events?)"
                )
            if line.strip():
                yield None, line.rstrip(b"\r\n"), datetime.now(UTC)


def read_topic(
    client_config: dict, products: ProductsTopics, stall_timeout_s: float = 15.0
) -> Iterator[Record]:
    """Every committed value on the products topics (per merchant: every merchant's) from the
    beginning up to the end they had when reading started, with a group-less consumer (nothing
    is committed, no group is joined). Stops with a warning if no partition moves for
    ``stall_timeout_s`` (a transaction left open by a crashed producer holds committed readers
    back until the broker aborts it). An event read from another merchant's topic than its own
    is skipped as invalid, as the service refuses it."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(
        **client_config,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        topics = products.among(reader.topics())
        if not topics:
            raise CatalogSourceError(
                f"no topic {products.label} exists on the broker (LOUPE_PRODUCTS_TOPIC); "
                "publish the catalog first, or train from a file with --events"
            )
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(reader.partitions_for_topic(topic) or ())
        ]
        reader.assign(partitions)
        reader.seek_to_beginning(*partitions)
        ends = reader.end_offsets(partitions)
        positions = {tp: reader.position(tp) for tp in partitions}
        moved_at = time.monotonic()
        while any(positions[tp] < ends[tp] for tp in partitions):
            for tp, records in reader.poll(timeout_ms=500).items():
                for record in records:
                    if record.offset < ends[tp] and _its_merchants(products, record):
                        yield record.key, record.value, record_time(record)
            # Positions, not records, tell progress: transaction markers take offsets too.
            now = {tp: reader.position(tp) for tp in partitions}
            if now != positions:
                positions, moved_at = now, time.monotonic()
            elif time.monotonic() - moved_at > stall_timeout_s:
                behind = {
                    f"{tp.topic}:{tp.partition}": ends[tp] - positions[tp] for tp in partitions
                }
                log.warning(
                    "reading %s stalled for %.0f s with records left per partition %s; "
                    "training on what was read",
                    products.label,
                    stall_timeout_s,
                    behind,
                )
                return
    finally:
        reader.close()
