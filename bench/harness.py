"""What the service benchmarks share: a real broker, fresh topics, a loopback 'CDN', events."""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kafka import KafkaProducer

from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec
from loupe.dev.catalog import CatalogProduct, upserted_event
from loupe.dev.cdn import cdn_process
from loupe.dev.drive import SearchLoad, loupe_process, percentiles, serve_env
from loupe.dev.kafka import LocalKafkaBroker

__all__ = [
    "SearchLoad",
    "create_service_topics",
    "create_topic",
    "local_broker",
    "loupe_process",
    "percentiles",
    "photo_server",
    "product_event",
    "publish_products",
    "pure_python_crc32c",
    "serve_env",
]


@contextlib.contextmanager
def local_broker() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as state:
        broker = LocalKafkaBroker(state_dir=Path(state) / "kafka")
        started = broker.start()
        try:
            yield started.bootstrap_servers
        finally:
            broker.stop()


@contextlib.contextmanager
def pure_python_crc32c() -> Iterator[None]:
    """kafka-python as it runs without its ``crc32c`` extra: every record batch produced or
    fetched in this process checksummed in pure Python (about 5 MB/s here, against some
    10 GB/s in C)."""
    from kafka.record import default_records, util

    in_c = default_records.calc_crc32c
    default_records.calc_crc32c = util.crc32c_py
    try:
        yield
    finally:
        default_records.calc_crc32c = in_c


def create_topic(bootstrap: str, prefix: str, partitions: int = 3) -> str:
    name = f"{prefix}.{uuid.uuid4().hex[:8]}"
    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        admin.create_missing([TopicSpec(name, partitions)])
    return name


def create_service_topics(bootstrap: str) -> dict[str, str]:
    """Fresh topics for one `loupe serve`, by the names ``serve_env`` takes."""
    return {
        "products": create_topic(bootstrap, "products", 3),
        "requests": create_topic(bootstrap, "requests", 3),
        "responses": create_topic(bootstrap, "responses", 1),
        "deadletter": create_topic(bootstrap, "dlq", 1),
    }


@contextlib.contextmanager
def photo_server(photos: dict[str, bytes]) -> Iterator[str]:
    """Serves ``photos`` by name on 127.0.0.1 from another process, as a merchant's CDN would
    (in-process, the server would compete with the consumer for the GIL)."""
    with tempfile.TemporaryDirectory(prefix="loupe-cdn-") as root:
        for name, data in photos.items():
            (Path(root) / name).write_bytes(data)
        with cdn_process(Path(root)) as url:
            yield url


def product_event(product: CatalogProduct, image: dict, product_id: str | None = None) -> bytes:
    return json.dumps(upserted_event(product, image, product_id=product_id)).encode()


def inline_photo(product: CatalogProduct) -> dict:
    """``product``'s catalog photo as an event carries it inline."""
    data = base64.b64encode(product.image_path.read_bytes()).decode()
    return {"data": data, "media_type": "image/jpeg"}


def publish_products(bootstrap: str, topic: str, catalog: list[CatalogProduct], count: int) -> None:
    """``count`` products ``p0``, ``p1``, ... of merchant ``giva`` into ``topic``, photos inline,
    going round ``catalog``."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for n in range(count):
        value = product_event(
            catalog[n % len(catalog)], inline_photo(catalog[n % len(catalog)]), f"p{n}"
        )
        producer.send(topic, key=f"giva/p{n}".encode(), value=value)
    producer.close()
