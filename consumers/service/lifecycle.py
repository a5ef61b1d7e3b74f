"""``loupe serve``: the workers and the model follower, run and supervised until stopped.

The parts come from ``Application`` (consumers/service/app.py); this module runs them: a thread per
worker, one following the alias, ``/readyz`` from a ``Readiness``, and a worker's death taking
the process down for its supervisor to restart.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from loupe.consumers.errors import ConfigError, WorkerDied
from loupe.consumers.index.catalog import Catalog
from loupe.consumers.kafka.acls import refusal
from loupe.consumers.kafka.io import answers_metadata, checksums_in_c
from loupe.consumers.kafka.topics import check_topics
from loupe.consumers.metrics import HealthServer, LoupeMetrics
from loupe.consumers.service.app import Application
from loupe.consumers.service.signals import install_signal_handlers
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import BatchWorker
from loupe.consumers.workers.live_model import LiveModel, ModelFollower, ModelInUse
from loupe.consumers.workers.search import SearchService

log = logging.getLogger(__name__)


class EncoderGate:
    """One model, two roles: a waiting search request goes before the next ingest micro-batch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._searches_waiting = 0

    @contextlib.contextmanager
    def search(self) -> Iterator[None]:
        with self._cond:
            self._searches_waiting += 1
            while self._busy:
                self._cond.wait()
            self._searches_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def ingest(self) -> Iterator[None]:
        with self._cond:
            while self._busy or self._searches_waiting:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class CatchUp:
    """What a replica waits for before it answers searches: the worker that writes its index
    has read its topic to the end. With encode-once, first the encoder (its partitions of the
    products topic; the group's others are other instances', caught up in a running
    deployment), then the writer once more: the encoder's last records must be in the index."""

    def __init__(self, writing: BatchWorker, encoding: BatchWorker | None = None) -> None:
        self.writing = writing
        self.encoding = encoding
        self.done = threading.Event()

    @property
    def topic(self) -> str:
        return self.writing.topic

    def wait(self, stopped: threading.Event) -> bool:
        """Until caught up (True) or ``stopped`` (False)."""
        writing = self.writing
        if self.encoding is None:
            caught_up = writing.caught_up.is_set
        else:
            if not _wait(self.encoding.caught_up.is_set, stopped):
                return False
            since = time.monotonic()  # its records are committed: visible to the writer now
            caught_up = lambda: writing.at_end_as_of >= since  # noqa: E731
        if not _wait(caught_up, stopped):
            return False
        self.done.set()
        return True


def _wait(condition: Callable[[], bool], stopped: threading.Event) -> bool:
    while not condition():
        if stopped.wait(timeout=0.2):
            return False
    return True


class Readiness:
    """What ``/readyz`` says: starting (and doing what), failed (and why), catching up, or
    the problems a running service has now (a worker retrying, the broker or the index away)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stage: str | None = "starting: checking the topics"  # None once built
        self.failure: WorkerDied | None = None
        self.workers: list[Any] = []
        self.catching_up: CatchUp | None = None  # a replica's, until caught up
        self.index: Callable[[], Any] = lambda: None  # the collection in use now

    def __call__(self) -> tuple[bool, str]:
        if self.failure is not None:
            return False, f"not serving: {self.failure}"
        if self.stage is not None:
            return False, self.stage
        catching_up = self.catching_up
        if catching_up is not None and not catching_up.done.is_set():
            return False, f"catching up: indexing {catching_up.topic} before answering searches"
        problems = [f"{w.role}: {w.waiting_on}" for w in self.workers if w.waiting_on is not None]
        if not answers_metadata(self.settings.kafka_client_config(), timeout_s=1.0):
            problems.append("broker unreachable")
        try:
            self.index().count()
        except Exception as exc:
            problems.append(f"index: {exc}")
        return (not problems, "ready" if not problems else "; ".join(problems))


class LoupeService:
    """``loupe serve``: made without I/O; ``start()`` binds the metrics port and builds the parts
    (the model loads there), ``run()`` runs them until stopped (starting first if need be)."""

    def __init__(self, settings: Settings, role: str = "all") -> None:
        check_role(settings, role)
        self.settings = settings
        self.role = role
        self.app = Application(settings)
        self.metrics: LoupeMetrics = self.app.metrics
        self.readiness = Readiness(settings)
        self._stopped = threading.Event()
        self.health: HealthServer | None = None
        self.workers: list[BatchWorker] = []
        self.catalog: Catalog | None = None
        self.live: LiveModel | None = None
        self.follower: ModelFollower | None = None
        # A replica's search waits for its own index to catch up (the workers that write it).
        self.catching_up: CatchUp | None = None

    def start(self) -> LoupeService:
        """Bind the metrics port (first: a taken port fails in a second, not after the model has
        loaded), check the topics, load the model, build the workers. What was built is closed
        again if a step fails."""
        if self.health is not None:
            return self
        self.health = HealthServer(
            self.metrics,
            self.readiness,
            self.settings.metrics_host,
            self.settings.metrics_port,
            on_scrape=self._sample_device_memory,
        )
        try:
            self._build()
        except BaseException:
            self._close_parts()
            raise
        return self

    @property
    def failure(self) -> WorkerDied | None:
        return self.readiness.failure

    def ready(self) -> tuple[bool, str]:
        return self.readiness()

    def _build(self) -> None:
        settings, app, role = self.settings, self.app, self.role
        check_topics(settings, role)  # before the model loads: a wrong topic name fails fast
        if not checksums_in_c():
            log.warning(
                "kafka-python checksums record batches in pure Python here (about 5 MB/s): "
                "install the crc32c package (pip install 'kafka-python[crc32c]')"
            )
        self.readiness.stage = "starting: loading the model"
        self.catalog = app.open_catalog()
        in_use = app.open_live_model(self.catalog)
        self.live = LiveModel(in_use)
        model = in_use.encoder
        model.warm_up()  # CUDA graphs for small batches: not in a shopper's first query
        log.info(
            "model %s on %s (%s, micro-batch %d), collection %s",
            model.model_version,
            model.device,
            model.acceleration.describe(),
            model.batch_size,
            in_use.collection,
        )
        self._model_info(in_use, 1)
        gate = EncoderGate()
        if role in ("ingest", "all") and settings.encode_once:
            # Encode once, index many: encoders shared by every instance, a writer per index.
            encoding = app.encode_worker(self.live, self.catalog, encode_lock=gate.ingest)
            writer = app.index_worker(self.live, self.catalog)
            self.workers += [encoding, writer]
            if settings.replica_id is not None:
                self.catching_up = CatchUp(writer, encoding)
        elif role in ("ingest", "all"):
            ingest = app.ingest_worker(self.live, hand_over=self.catalog, encode_lock=gate.ingest)
            self.workers.append(ingest)
            if settings.replica_id is not None:  # a replica runs both roles (check_role)
                self.catching_up = CatchUp(ingest)
        if role in ("search", "all"):
            self.workers.append(app.search_worker(self.live, encode_lock=gate.search))
        self.follower = ModelFollower(
            catalog=self.catalog,
            live=self.live,
            local_profile=app.profile,
            load_encoder=app.load_encoder,
            workers=[worker.role for worker in self.workers],
            poll_interval_s=settings.alias_poll_interval_ms / 1000,
            on_switch=self._switched,
        )
        self.readiness.workers = self.workers
        self.readiness.catching_up = self.catching_up
        self.readiness.index = lambda: self.index
        self.readiness.stage = None

    @property
    def encoder(self):
        """The encoder in use now (it changes when the service follows a switch)."""
        return self.live.current().encoder if self.live is not None else None

    @property
    def index(self):
        return self.live.current().index if self.live is not None else None

    def _model_info(self, in_use: ModelInUse, value: int) -> None:
        encoder = in_use.encoder
        self.metrics.model_info.labels(
            model_version=encoder.model_version, device=str(encoder.device)
        ).set(value)

    def _switched(self, old: ModelInUse, new: ModelInUse) -> None:
        self._model_info(old, 0)
        self._model_info(new, 1)
        self.metrics.model_switches.inc()

    def _sample_device_memory(self) -> None:
        encoder = self.encoder
        if encoder is not None:
            self.metrics.sample_device_memory(str(encoder.device))

    def stop(self) -> None:
        self._stopped.set()
        for worker in self.workers:
            worker.stop_event.set()

    def run(self) -> None:
        """Run the workers until ``stop()``, or until one dies. A worker that dies (an error
        that was not one item's: a bug, a lost index) takes the service down with it: /readyz
        turns 503 at once, the other workers stop, and ``run`` raises ``WorkerDied`` so that the
        process exits non-zero and its supervisor restarts it; no zombie keeps answering."""
        self.start()
        self.health.start()
        log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host, self.health.port)
        threads = [
            threading.Thread(target=self._supervised, args=(w,), name=type(w).__name__)
            for w in self.workers
        ]
        threads.append(threading.Thread(target=self._follow, name="ModelFollower"))
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        finally:
            self.stop()
            for thread in threads:
                thread.join()
            self._close_parts()
        if self.failure is not None:
            raise self.failure
        log.info("stopped cleanly")

    def _died(self, failure: WorkerDied, exc: BaseException | None, what: str) -> None:
        self.readiness.failure = failure
        log.critical("%s; stopping the service", what, exc_info=exc)
        self.stop()

    def _supervised(self, worker: BatchWorker) -> None:
        try:
            if isinstance(worker, SearchService) and not self._caught_up():
                return  # stopped before it caught up
            worker.run()
        except BaseException as exc:
            self.metrics.worker_deaths.labels(role=worker.role).inc()
            refused = refusal(exc, self.settings, worker.role)
            if refused is not None:  # the deployment's ACLs, not a bug: no traceback
                failure = WorkerDied(f"the {worker.role} worker stopped: {refused}")
                self._died(failure, None, str(failure))
                return
            failure = WorkerDied(f"the {worker.role} worker died: {type(exc).__name__}: {exc}")
            self._died(failure, exc, f"the {worker.role} worker died")

    def _caught_up(self) -> bool:
        """A replica joins the search group only once its index holds every product the topic
        had when it started: before, it would answer without products the others find."""
        catching_up = self.catching_up
        if catching_up is None:
            return True
        log.info(
            "replica %s: answering searches once the index has caught up with %s",
            self.settings.replica_id,
            catching_up.topic,
        )
        if not catching_up.wait(self._stopped):
            return False
        log.info(
            "replica %s: caught up (%d points); joining %s",
            self.settings.replica_id,
            self.index.count(),
            self.app.names.search_group(),
        )
        return True

    def _follow(self) -> None:
        """Follow the alias until stopped; a live model this instance cannot load stops the
        service (its supervisor restarts it, and the start-up says why)."""
        try:
            self.follower.run(self._stopped)
        except BaseException as exc:
            failure = WorkerDied(f"cannot follow the live collection: {exc}")
            self._died(failure, exc, "cannot follow the live collection")

    def _close_parts(self) -> None:
        """Close whatever was built (all of it after run, part of it if the build failed)."""
        for worker in self.workers:
            worker.close()  # idempotent: KafkaConsumer.close returns early once closed
        self.app.close_publishers()
        if self.follower is not None:
            self.follower.close()  # pairs the workers let go of
        if self.live is not None:
            in_use = self.live.current()
            in_use.index.close()
            in_use.encoder.close()
        if self.catalog is not None:
            self.catalog.close()
        if self.health is not None:
            self.health.stop()

    def install_signal_handlers(self) -> None:
        install_signal_handlers(self.stop)


def check_role(settings: Settings, role: str) -> None:
    """Refuse a role this configuration cannot run (before anything slow starts)."""
    if role not in ("ingest", "search", "all"):
        raise ValueError(f"role must be ingest, search or all; got {role!r}")
    if settings.replica_id is not None and role != "all":
        raise ConfigError(
            f"LOUPE_REPLICA_ID={settings.replica_id}: a replica indexes every product into its "
            f"own index and answers searches from it, so it runs both roles (--role all), not "
            f"--role {role}"
        )
