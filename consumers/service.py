"""One object wires the service: the only place real parts are built from ``Settings``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

from loupe.consumers.edge_index import EdgeIndex
from loupe.consumers.errors import ConfigError, WorkerDied
from loupe.consumers.image_fetch import ImageFetcher
from loupe.consumers.index import QdrantIndex, VectorIndex, collection_name
from loupe.consumers.ingest import Indexer
from loupe.consumers.kafka_io import (
    answers_metadata,
    checksums_in_c,
    make_consumer,
    make_producer,
    make_transactional_producer,
)
from loupe.consumers.lifecycle import (
    CollectionCard,
    LiveModel,
    ModelCard,
    ModelFollower,
    ModelInUse,
    open_collection,
    read_card,
    write_card,
)
from loupe.consumers.metrics import HealthServer, LoupeMetrics
from loupe.consumers.publisher import Publisher
from loupe.consumers.search_service import SearchService
from loupe.consumers.settings import Settings
from loupe.consumers.topics import check_topics
from loupe.encoders.fused import FusedEncoder

log = logging.getLogger(__name__)

POINTS_REPORT_INTERVAL_S = 1.0  # the ingest's point-count report on the live collection's card


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


class LoupeService:
    def __init__(self, settings: Settings, role: str = "all") -> None:
        check_role(settings, role)
        self.settings = settings
        self.role = role
        self.failure: WorkerDied | None = None
        self._stopped = threading.Event()
        self.metrics = LoupeMetrics()
        # Bound first: a taken port fails in a second, not after the model has loaded.
        self.health = HealthServer(
            self.metrics,
            self.ready,
            settings.metrics_host,
            settings.metrics_port,
            on_scrape=self._sample_device_memory,
        )
        try:
            self._build(settings, role)
        except BaseException:
            self._close_parts()
            raise

    def _build(self, settings: Settings, role: str) -> None:
        check_topics(settings, role)  # before the model loads: a wrong topic name fails fast
        if not checksums_in_c():
            log.warning(
                "kafka-python checksums record batches in pure Python here (about 5 MB/s): "
                "install the crc32c package (pip install 'kafka-python[crc32c]')"
            )
        log.info("loading the model (%s + %s)", settings.image_backbone, settings.text_backbone)
        profile = settings.model_profile()
        self.encoder = FusedEncoder.from_profile(profile)
        # The catalog of collections (alias, cards); each model version's collection is a
        # sibling of it, opened for the model in use.
        self.catalog = build_index(settings, self.encoder.model_version)
        self.index = self._open_live_collection(profile)
        self.encoder.warm_up()  # CUDA graphs for small batches: not in a shopper's first query
        log.info(
            "model %s on %s (%s, micro-batch %d), collection %s",
            self.encoder.model_version,
            self.encoder.device,
            self.encoder.acceleration.describe(),
            self.encoder.batch_size,
            self.index.collection,
        )
        self.metrics.model_info.labels(
            model_version=self.encoder.model_version, device=str(self.encoder.device)
        ).set(1)
        self.live = LiveModel(ModelInUse(self.encoder, self.index))
        self.publishers: list[Publisher] = []  # one per worker, each with its own producer
        fetcher = ImageFetcher(settings.fetch_policy())
        gate = EncoderGate()
        self.workers: list[Indexer | SearchService] = []
        # A replica's search waits for its own ingest to reach the end of the products topic.
        self.catching_up: Indexer | None = None
        shared = {
            "index": self.index,
            "encoder": self.encoder,
            "fetcher": fetcher,
            "metrics": self.metrics,
            "live": self.live,
        }
        if role in ("ingest", "all"):
            ingest = Indexer(
                consumer=make_consumer(settings, settings.ingest_group()),
                publisher=self._publisher(settings, "ingest"),
                topic=settings.products_topic,
                encode_lock=gate.ingest,
                poll_timeout_ms=settings.poll_timeout_ms,
                fetch_workers=settings.fetch_workers,
                report_points_every_s=POINTS_REPORT_INTERVAL_S,
                **shared,
            )
            self.workers.append(ingest)
            if settings.replica_id is not None:  # a replica runs both roles (check_role)
                self.catching_up = ingest
        if role in ("search", "all"):
            self.workers.append(
                SearchService(
                    consumer=make_consumer(
                        settings,
                        settings.search_group(),
                        max_poll_records=settings.search_max_poll_records,
                    ),
                    publisher=self._publisher(settings, "search"),
                    topic=settings.search_requests_topic,
                    response_topic=settings.search_responses_topic,
                    encode_lock=gate.search,
                    fetch_workers=settings.fetch_workers,
                    **shared,
                )
            )

        self.follower = ModelFollower(
            catalog=self.catalog,
            live=self.live,
            local_profile=profile,
            load_encoder=FusedEncoder.from_profile,
            workers=[worker.role for worker in self.workers],
            poll_interval_s=settings.alias_poll_interval_ms / 1000,
            on_switch=self._switched,
        )

    def _open_live_collection(self, profile) -> VectorIndex:
        """The collection to serve: the configured model's when the alias names it or nothing
        (a first start), else the live one, with the model its card names (a reindex moved
        the alias; an instance that restarts with an older configuration must not move it
        back, nor answer from a collection with the wrong model)."""
        version = self.encoder.model_version
        configured = collection_name(self.catalog.alias, version)
        live = self.catalog.live_collection()
        if live is None or live == configured:
            index = self.catalog.for_version(version)
            index.ensure_collection(self.encoder.dims, make_live=True)
            if read_card(index, configured) is None:
                write_card(
                    index, configured, CollectionCard(ModelCard.of(profile, version), "live")
                )
            return index
        log.warning(
            "the configured model makes %s, but the alias %s names %s: serving that one with "
            "the model its card names. `loupe reindex` builds the configured one and switches",
            configured,
            self.catalog.alias,
            live,
        )
        self.encoder.close()
        self.encoder, index = open_collection(
            self.catalog, live, profile, FusedEncoder.from_profile
        )
        return index

    def _switched(self, old: ModelInUse, new: ModelInUse) -> None:
        self.metrics.model_info.labels(
            model_version=old.encoder.model_version, device=str(old.encoder.device)
        ).set(0)
        self.metrics.model_info.labels(
            model_version=new.encoder.model_version, device=str(new.encoder.device)
        ).set(1)
        self.metrics.model_switches.inc()
        self.encoder, self.index = new.encoder, new.index

    def _publisher(self, settings: Settings, role: str) -> Publisher:
        """Each worker publishes through its own producer (a transaction holds one batch of one
        consumer), and can replace it with a like one after a fatal error."""
        if settings.exactly_once:
            make = lambda: make_transactional_producer(settings, role)  # noqa: E731
        else:
            make = lambda: make_producer(settings)  # noqa: E731
        publisher = Publisher(
            make(),
            settings.deadletter_topic,
            self.metrics,
            transactional=settings.exactly_once,
            make_producer=make,
            name=role,
        )
        self.publishers.append(publisher)
        return publisher

    def _sample_device_memory(self) -> None:
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            self.metrics.sample_device_memory(str(encoder.device))

    def ready(self) -> tuple[bool, str]:
        if self.failure is not None:
            return False, f"not serving: {self.failure}"
        if not hasattr(self, "index"):
            return False, "starting: loading the model"
        catching_up = getattr(self, "catching_up", None)  # None until the workers are built
        if catching_up is not None and not catching_up.caught_up.is_set():
            return False, "catching up: indexing the products topic before answering searches"
        problems = [
            f"{worker.role}: {worker.waiting_on}"
            for worker in self.workers
            if worker.waiting_on is not None
        ]
        if not answers_metadata(self.settings.kafka_client_config(), timeout_s=1.0):
            problems.append("broker unreachable")
        try:
            self.index.count()
        except Exception as exc:
            problems.append(f"index: {exc}")
        return (not problems, "ready" if not problems else "; ".join(problems))

    def stop(self) -> None:
        self._stopped.set()
        for worker in self.workers:
            worker.stop_event.set()

    def run(self) -> None:
        """Run the workers until ``stop()``, or until one dies. A worker that dies (an error
        that was not one item's: a bug, a lost index) takes the service down with it: /readyz
        turns 503 at once, the other workers stop, and ``run`` raises ``WorkerDied`` so that the
        process exits non-zero and its supervisor restarts it; no zombie keeps answering."""
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

    def _supervised(self, worker: Indexer | SearchService) -> None:
        try:
            if isinstance(worker, SearchService) and not self._caught_up():
                return  # stopped before it caught up
            worker.run()
        except BaseException as exc:
            self.failure = WorkerDied(f"the {worker.role} worker died: {type(exc).__name__}: {exc}")
            self.metrics.worker_deaths.labels(role=worker.role).inc()
            log.critical("the %s worker died; stopping the service", worker.role, exc_info=exc)
            self.stop()

    def _caught_up(self) -> bool:
        """A replica joins the search group only once its index holds every product the topic
        had when it started: before, it would answer without products the others find."""
        ingest = self.catching_up
        if ingest is None:
            return True
        log.info(
            "replica %s: answering searches once the index has caught up with %s",
            self.settings.replica_id,
            self.settings.products_topic,
        )
        while not ingest.caught_up.wait(timeout=0.2):
            if self._stopped.is_set():
                return False
        log.info(
            "replica %s: caught up (%d points); joining %s",
            self.settings.replica_id,
            self.index.count(),
            self.settings.search_group(),
        )
        return True

    def _follow(self) -> None:
        """Follow the alias until stopped; a live model this instance cannot load stops the
        service (its supervisor restarts it, and the start-up says why)."""
        try:
            self.follower.run(self._stopped)
        except BaseException as exc:
            self.failure = WorkerDied(f"cannot follow the live collection: {exc}")
            log.critical("cannot follow the live collection; stopping the service", exc_info=exc)
            self.stop()

    def _close_parts(self) -> None:
        """Close whatever was built (all of it after run, part of it if the build failed)."""
        for worker in getattr(self, "workers", []):
            worker.close()  # idempotent: KafkaConsumer.close returns early once closed
        for publisher in getattr(self, "publishers", []):
            publisher.close()
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.close()  # pairs the workers let go of
        for name in ("index", "encoder", "catalog"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
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


def build_index(settings: Settings, model_version: str) -> VectorIndex:
    """The configured index: a Qdrant server (``LOUPE_INDEX_URL``), or an embedded engine
    under the state directory (``LOUPE_INDEX_ENGINE``)."""
    path = settings.resolved_index_path()
    if path is not None and settings.index_engine == "edge":
        older = settings.state_dir / "index" / "meta.json"  # qdrant-client's local mode
        if settings.index_path is None and older.exists() and not path.exists():
            log.warning(
                "an index of qdrant-client's local mode is in %s, and this index starts empty "
                "in %s (Qdrant Edge): replay the products topic into it, or set "
                "LOUPE_INDEX_ENGINE=qdrant-local to keep the old one",
                older.parent,
                path,
            )
        return EdgeIndex(
            model_version=model_version,
            path=str(path),
            prefix=settings.index_prefix,
            hnsw_ef=settings.index_hnsw_ef,
            acorn=settings.index_acorn,
            quantization=settings.index_quantization,
        )
    return QdrantIndex(
        model_version=model_version,
        path=str(path) if path else None,
        url=settings.index_url,
        api_key=settings.index_api_key.get_secret_value() if settings.index_api_key else None,
        prefix=settings.index_prefix,
        hnsw_ef=settings.index_hnsw_ef,
        acorn=settings.index_acorn,
        quantization=settings.index_quantization,
        topology=settings.index_topology(),
    )


def install_signal_handlers(
    stop: Callable[[], None], exit_now: Callable[[int], None] = os._exit
) -> None:
    """SIGTERM/SIGINT: ``stop`` (finish the batch in flight, commit, stop). A second one exits
    at once (nothing uncommitted is lost: it is replayed after the restart)."""
    received: list[int] = []

    def handle(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("received %s again: exiting now, without finishing the batch", name)
            exit_now(128 + signum)
            return
        received.append(signum)
        log.info("received %s: finishing the batch in flight, then stopping", name)
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
