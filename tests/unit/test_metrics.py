"""Series that alerts rely on exist at 0 from start-up, before anything was processed."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client import generate_latest

from loupe.consumers.metrics import OUTCOMES_OF_ROLE, LoupeMetrics
from loupe.schemas.errors import ErrorCode


def test_a_registered_worker_exports_its_counters_at_zero():
    metrics = LoupeMetrics()
    metrics.register_worker("ingest", "loupe.products.v1")
    metrics.register_worker("search", "loupe.search.requests.v1")
    text = generate_latest(metrics.registry).decode()
    for role, topic in (("ingest", "loupe.products.v1"), ("search", "loupe.search.requests.v1")):
        for outcome in OUTCOMES_OF_ROLE[role]:
            assert f'loupe_events_total{{outcome="{outcome}",topic="{topic}"}} 0.0' in text
        assert f'loupe_worker_deaths_total{{role="{role}"}} 0.0' in text
        assert f'loupe_worker_up{{role="{role}"}} 0.0' in text
    for code in ErrorCode:
        assert f'loupe_dead_letters_total{{reason="{code.value}"}} 0.0' in text
    assert "loupe_start_time_seconds " in text


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown role 'worker'"):
        LoupeMetrics().register_worker("worker", "t")


def test_on_a_cpu_device_busy_is_the_share_of_all_cores_used_between_scrapes():
    metrics = LoupeMetrics()
    metrics.sample_device_memory("cpu")  # the first scrape only starts the clock
    assert b"loupe_device_utilization_ratio{" not in generate_latest(metrics.registry)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # one core busy for 0.2 s of CPU time
        pass
    metrics.sample_device_memory("cpu")
    busy = metrics.device_utilization.labels(device="cpu")._value.get()
    assert 0.0 < busy <= 1.0
    assert busy > 0.5 / (os.cpu_count() or 1)  # about one core's worth, not nothing
    assert metrics.device_memory_used.labels(device="cpu")._value.get() > 0
