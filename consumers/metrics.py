"""Every Prometheus metric Loupe exports, in one place, plus the /metrics /healthz /readyz server.

Base units (seconds), counters end in ``_total``, label values come from closed sets created up
front (no product or request ids in labels). Tests pass their own ``CollectorRegistry``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from loupe.consumers.kafka.reply_topics import Refusal
from loupe.schemas.errors import ErrorCode, LoupeError

log = logging.getLogger(__name__)

STAGES = ("parse", "fetch", "encode", "index_write", "search", "publish", "commit")
OUTCOMES = ("indexed", "deleted", "stale", "dead_lettered", "answered", "answered_error")
# The outcomes each role can count: created at 0 when the worker starts, so that a rate over
# them exists (and alerts such as LoupeIngestStalled can fire) before anything was processed.
OUTCOMES_OF_ROLE = {
    "ingest": ("indexed", "deleted", "stale", "dead_lettered"),
    "search": ("answered", "answered_error"),
    "encode": ("encoded", "deleted", "stale", "dead_lettered"),  # encode-once's encoder
    "index": ("indexed", "deleted", "stale", "dead_lettered"),  # and its index writer
}
ROLES = tuple(OUTCOMES_OF_ROLE)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class LoupeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "loupe_events_total",
            "Events consumed, by topic and outcome",
            ["topic", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "loupe_dead_letters_total",
            "Events sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "loupe_retries_total", "Transient failures retried, by stage", ["stage"], registry=r
        )
        self.kafka_failures = Counter(
            "loupe_kafka_failures_total",
            "Failed publish-and-commit attempts, by Kafka's class of the cause (retriable: tried "
            "again; abortable: aborted and replayed; fatal: the producer replaced)",
            ["failure_class"],
            registry=r,
        )
        self.producer_replacements = Counter(
            "loupe_producer_replacements_total",
            "Producers replaced by a new one after a fatal error or a lost transaction",
            registry=r,
        )
        self.batch_size = Histogram(
            "loupe_batch_size",
            "Records per processed batch, by role",
            ["role"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "loupe_stage_seconds",
            "Time per pipeline stage and batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "loupe_search_request_latency_seconds",
            "From a search request's occurred_at to its response being acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "loupe_consumer_lag",
            "Records behind the partition's end",
            ["topic", "partition"],
            registry=r,
        )
        self.index_points = Gauge("loupe_index_points", "Points in the live collection", registry=r)
        self.model_info = Gauge(
            "loupe_model_info",
            "The model in use (value 1)",
            ["model_version", "device"],
            registry=r,
        )
        self.model_switches = Counter(
            "loupe_model_switches_total",
            "Times this instance followed the alias to another collection and model",
            registry=r,
        )
        self.device_memory_used = Gauge(
            "loupe_device_memory_used_bytes",
            "Memory the model's device has in use (CUDA: reserved by torch; CPU: process RSS)",
            ["device"],
            registry=r,
        )
        self.device_memory_total = Gauge(
            "loupe_device_memory_total_bytes",
            "Memory the model's device has",
            ["device"],
            registry=r,
        )
        self.device_utilization = Gauge(
            "loupe_device_utilization_ratio",
            "Share of the time the device was busy: a GPU's over NVML's last sample period (absent "
            "without NVML); on a CPU, the share of all cores this process used since the last "
            "scrape",
            ["device"],
            registry=r,
        )
        self._last_cpu_sample: tuple[float, float] | None = None
        self.start_time = Gauge(
            "loupe_start_time_seconds",
            "When this process started (Unix time): its changes count restarts",
            registry=r,
        )
        self.start_time.set_to_current_time()
        self.worker_up = Gauge(
            "loupe_worker_up",
            "1 while the role's worker runs, 0 once it stopped or died",
            ["role"],
            registry=r,
        )
        self.reply_to_refused = Counter(
            "loupe_reply_to_refused_total",
            "Search requests whose reply_to was refused (answered on the default response "
            "topic), by reason",
            ["reason"],
            registry=r,
        )
        for refusal in Refusal:
            self.reply_to_refused.labels(reason=refusal.value)
        self.worker_deaths = Counter(
            "loupe_worker_deaths_total",
            "Workers that died of an error that was not one item's (the process then exits)",
            ["role"],
            registry=r,
        )
        for role in ROLES:
            self.worker_deaths.labels(role=role)
        for stage in ("index_write", "publish", "search"):
            self.retries.labels(stage=stage)
        for failure_class in ("retriable", "abortable", "fatal"):
            self.kafka_failures.labels(failure_class=failure_class)
        for reason in ErrorCode:
            self.dead_letters.labels(reason=reason.value)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def register_worker(self, role: str, topic: str) -> None:
        """Create the worker's labelled series at 0, before it processes anything."""
        if role not in OUTCOMES_OF_ROLE:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        for outcome in OUTCOMES_OF_ROLE[role]:
            self.events.labels(topic=topic, outcome=outcome)
        self.batch_size.labels(role=role)
        self.worker_up.labels(role=role).set(0)

    def sample_device_memory(self, device: str) -> None:
        """Refresh the device memory and utilisation gauges (called on each scrape)."""
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            used = torch.cuda.memory_reserved(index)
            total = torch.cuda.get_device_properties(index).total_memory
            try:  # NVML's percentage over its last sample period; needs nvidia-ml-py
                busy = torch.cuda.utilization(index) / 100.0
            except Exception:  # no NVML here: leave the series absent rather than wrong
                busy = None
            if busy is not None:
                self.device_utilization.labels(device=device).set(busy)
        else:
            import resource

            page = os.sysconf("SC_PAGE_SIZE")
            try:
                with open("/proc/self/statm") as statm:
                    used = int(statm.read().split()[1]) * page  # resident pages now
            except (OSError, ValueError, IndexError):
                used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak
            total = os.sysconf("SC_PHYS_PAGES") * page
            # The CPU is the model's device: the share of all cores this process kept busy
            # since the last scrape.
            now, cpu = time.monotonic(), time.process_time()
            if self._last_cpu_sample is not None:
                wall = now - self._last_cpu_sample[0]
                if wall > 0:
                    busy = (cpu - self._last_cpu_sample[1]) / (wall * (os.cpu_count() or 1))
                    self.device_utilization.labels(device=device).set(min(1.0, max(0.0, busy)))
            self._last_cpu_sample = (now, cpu)
        self.device_memory_used.labels(device=device).set(used)
        self.device_memory_total.labels(device=device).set(total)

    def timer(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.stage_seconds.labels(stage=stage).time()


class MetricsPortUnavailable(LoupeError):
    """The metrics/health port cannot be bound. Policy: stop, and say which port."""


class ReindexMetrics:
    """A reindex's progress (``loupe reindex``), beside the ingest metrics it also exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events_done = Gauge(
            "loupe_reindex_events_done",
            "Products-topic events the reindex has applied to the new collection",
            registry=r,
        )
        self.events_total = Gauge(
            "loupe_reindex_events_total",
            "Products-topic events the reindex must apply (grows while events arrive)",
            registry=r,
        )
        self.eta_seconds = Gauge(
            "loupe_reindex_eta_seconds",
            "Estimated seconds until the reindex catches up (-1: not known yet)",
            registry=r,
        )
        self.points = Gauge(
            "loupe_reindex_points", "Points in the collection being built", registry=r
        )


class HealthServer:
    """``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (it can do its job)."""

    def __init__(
        self,
        metrics: LoupeMetrics,
        ready: Callable[[], tuple[bool, str]],
        host: str = "127.0.0.1",
        port: int = 9400,
        on_scrape: Callable[[], None] = lambda: None,
    ) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    on_scrape()
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, detail = ready()
                    self._send(200 if ok else 503, (detail + "\n").encode())
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                # A prober that gave up (a timeout) is not an error of ours.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                log.debug("http: " + format, *args)

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise MetricsPortUnavailable(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); stop what listens there "
                "or set LOUPE_METRICS_PORT to another port (0 picks a free one)"
            ) from exc
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only if it runs
            self.server.shutdown()
        self.server.server_close()
