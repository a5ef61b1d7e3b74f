"""What the service benchmarks share: a real broker, fresh topics, a loopback 'CDN', events."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from loupe.dev.catalog import CatalogProduct, upserted_event
from loupe.dev.cdn import cdn_process
from loupe.dev.kafka import LocalKafkaBroker


@contextlib.contextmanager
def local_broker() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as state:
        broker = LocalKafkaBroker(state_dir=Path(state) / "kafka")
        started = broker.start()
        try:
            yield started.bootstrap_servers
        finally:
            broker.stop()


def create_topic(bootstrap: str, prefix: str, partitions: int = 3) -> str:
    name = f"{prefix}.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    admin.close()
    return name


@contextlib.contextmanager
def photo_server(photos: dict[str, bytes]) -> Iterator[str]:
    """Serves ``photos`` by name on 127.0.0.1 from another process, as a merchant's CDN would
    (in-process, the server would compete with the consumer for the GIL)."""
    with tempfile.TemporaryDirectory(prefix="loupe-cdn-") as root:
        for name, data in photos.items():
            (Path(root) / name).write_bytes(data)
        with cdn_process(Path(root)) as url:
            yield url


def serve_env(
    bootstrap: str,
    topics: dict[str, str],
    *,
    group: str,
    state_dir: Path,
    metrics_port: int | str = 0,
    **settings: str,
) -> dict[str, str]:
    """The environment of a `loupe serve` child process on its own topics (keys ``products``,
    ``requests``, ``responses``, ``deadletter``), group and state; ``settings`` adds LOUPE_*
    variables by their lower-case names (``max_poll_records="8"``)."""
    env = {
        **os.environ,
        "LOUPE_BOOTSTRAP_SERVERS": bootstrap,
        "LOUPE_STATE_DIR": str(state_dir),
        "LOUPE_PRODUCTS_TOPIC": topics["products"],
        "LOUPE_SEARCH_REQUESTS_TOPIC": topics["requests"],
        "LOUPE_SEARCH_RESPONSES_TOPIC": topics["responses"],
        "LOUPE_DEADLETTER_TOPIC": topics["deadletter"],
        "LOUPE_GROUP_ID": group,
        "LOUPE_METRICS_PORT": str(metrics_port),
    }
    env.update({f"LOUPE_{name.upper()}": value for name, value in settings.items()})
    return env


def product_event(product: CatalogProduct, image: dict, product_id: str | None = None) -> bytes:
    return json.dumps(upserted_event(product, image, product_id=product_id)).encode()


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 95, 99)}
