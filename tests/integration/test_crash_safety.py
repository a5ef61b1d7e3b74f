"""``loupe serve`` killed with SIGKILL mid-stream and restarted: no product lost, none doubled.
SIGTERM drains: the process exits 0 with everything it consumed committed."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from kafka import KafkaProducer

from loupe.consumers.index.interface import point_id
from loupe.consumers.service.app import build_catalog
from loupe.consumers.settings import Settings
from loupe.dev.catalog import load_catalog
from loupe.dev.drive import serve_env
from loupe.encoders.fused import FusedEncoder
from tests.integration.processes import committed

pytestmark = pytest.mark.integration

PRODUCTS = 48


def _serve(env: dict[str, str], log_path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loupe", "serve", "--role", "ingest"],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(condition, what: str, timeout_s: float, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"loupe serve exited ({proc.returncode}) while waiting for {what}:\n"
                + log_path.read_text()[-3000:]
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("engine", ["qdrant-local", "edge"])
def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    engine, bootstrap_servers, make_topic, group_id, tmp_path
):
    topic = make_topic("products", partitions=3)
    topics = {
        "products": topic,
        **{name: make_topic(name) for name in ("requests", "responses", "deadletter")},
    }
    env = serve_env(
        bootstrap_servers,
        topics,
        group=group_id,
        state_dir=tmp_path / "state",
        max_poll_records="8",  # small batches: the kill lands between commits
        index_engine=engine,
    )
    catalog = load_catalog()
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers)
    for i in range(PRODUCTS):
        product = catalog[i % len(catalog)]
        body = {
            "type": "product.upserted",
            "event_id": f"e{i}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "merchant_id": "m",
            "product_id": f"p{i}",
            "title": product.title,
            "attributes": product.attributes(),
            "image": {
                "data": base64.b64encode(product.image_path.read_bytes()).decode(),
                "media_type": "image/jpeg",
            },
        }
        producer.send(topic, key=f"m/p{i}".encode(), value=json.dumps(body).encode())
    producer.flush()
    producer.close()

    group = group_id + ".ingest"
    log_path = tmp_path / "serve.log"
    first = _serve(env, log_path)
    _wait_for(
        lambda: committed(bootstrap_servers, group) >= 8, "a first commit", 120, first, log_path
    )
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    at_kill = committed(bootstrap_servers, group)
    assert at_kill < PRODUCTS, "the kill should land mid-stream"

    second = _serve(env, log_path)
    _wait_for(
        lambda: committed(bootstrap_servers, group) == PRODUCTS,
        "all commits",
        180,
        second,
        log_path,
    )
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    assert "stopped cleanly" in log_path.read_text()

    encoder_version = FusedEncoder.from_profile(Settings().model_profile()).model_version
    settings = Settings(index_engine=engine, state_dir=tmp_path / "state")
    catalog = build_catalog(settings)
    index = catalog.open(encoder_version)
    index.ensure_collection({"image": 1280, "text": 384, "fused": 1664})
    try:
        assert index.count() == PRODUCTS, "one point per product: none lost, none doubled"
        ids = [point_id("m", f"p{i}") for i in range(PRODUCTS)]
        assert len(index.stored_versions(ids)) == PRODUCTS
    finally:
        index.close()
        catalog.close()
