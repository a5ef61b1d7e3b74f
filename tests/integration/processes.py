"""What the integration tests that run `loupe` as a user does share: products sent as a
merchant's system sends them, committed offsets read as an operator reads them, and `loupe`
commands in their own processes."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    NotCoordinatorError,
)

from loupe.consumers.kafka.admin import KafkaAdmin


def service_topics(make_topic, products: int = 2, requests: int = 1) -> dict[str, str]:
    """Fresh topics for one `loupe serve` (``make_topic``: the conftest fixture), by the
    names ``serve_env`` takes; ``products`` and ``requests`` partitions."""
    return {
        "products": make_topic("products", partitions=products),
        "requests": make_topic("requests", partitions=requests),
        **{name: make_topic(name) for name in ("responses", "deadletter")},
    }


def upserted(product, product_id: str) -> bytes:
    return json.dumps(
        {
            "type": "product.upserted",
            "event_id": f"e-{product_id}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "merchant_id": "m",
            "product_id": product_id,
            "title": product.title,
            "attributes": product.attributes(),
            "image": {
                "data": base64.b64encode(product.image_path.read_bytes()).decode(),
                "media_type": "image/jpeg",
            },
        }
    ).encode()


def send_products(bootstrap: str, topic: str, catalog, ids: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i, product_id in enumerate(ids):
        product = catalog[i % len(catalog)]
        producer.send(topic, key=f"m/{product_id}".encode(), value=upserted(product, product_id))
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str) -> int:
    """The sum of ``group``'s committed offsets (0 before it committed)."""
    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        try:
            offsets = admin.committed(group)
        except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
            return 0  # not joined yet, or the coordinator is loading or moving
    return sum(offsets.values())


def wait_for(condition, what: str, timeout_s: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc, log_path in zip(procs, logs, strict=True):
            if proc.poll() is not None and proc.returncode != 0:
                pytest.fail(
                    f"a process exited ({proc.returncode}) while waiting for {what}:\n"
                    + Path(log_path).read_text()[-4000:]
                )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
