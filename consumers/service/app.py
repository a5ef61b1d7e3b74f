"""The application: the one place where Loupe's parts are built from ``Settings``.

``Application`` makes the model, the catalog, the model in use, the publishers and the
workers; ``loupe serve`` (``consumers/service/lifecycle.py``), ``loupe reindex``
(``consumers/service/reindex.py``) and the integration tests build them here, so the three run
the same wiring. Building is
separate from constructing: ``Application(settings)`` does no I/O; each ``open_*`` or ``*_worker``
call does its own, when the caller is ready for it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from loupe.consumers.index.catalog import Catalog, ModelCard
from loupe.consumers.index.interface import Collection
from loupe.consumers.kafka.io import make_consumer, make_producer, make_transactional_producer
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.kafka.reply_topics import ReplyTopics
from loupe.consumers.kafka.topics import cleanup_policy, ensure_vectors_topic
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.encode import EncodeWorker
from loupe.consumers.workers.handover import HandOver
from loupe.consumers.workers.image_fetch import ImageFetcher
from loupe.consumers.workers.index_writer import IndexWorker
from loupe.consumers.workers.ingest import IngestWorker
from loupe.consumers.workers.live_model import LiveModel, ModelInUse, open_collection
from loupe.consumers.workers.product_stage import EncodeLock, ProductStage
from loupe.consumers.workers.search import SearchService
from loupe.consumers.workers.vectors import VectorsOut
from loupe.encoders.fused import FusedEncoder
from loupe.encoders.profile import ModelProfile

log = logging.getLogger(__name__)

POINTS_REPORT_INTERVAL_S = 1.0  # the ingest's point-count report on the live collection's card
SEARCH_POLL_TIMEOUT_MS = 200  # a search's poll waits less: a request is a shopper waiting


class Application:
    """Builds Loupe's parts from ``settings``; ``metrics``, ``fetcher`` and ``load_encoder``
    may be given (a test's loopback fetcher, an encoder loaded once for a module)."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: LoupeMetrics | None = None,
        fetcher: ImageFetcher | None = None,
        load_encoder: Callable[[ModelProfile], FusedEncoder] = FusedEncoder.from_profile,
    ) -> None:
        self.settings = settings
        self.names = KafkaNames.of(settings)
        self.metrics = metrics or LoupeMetrics()
        self.load_encoder = load_encoder
        self._fetcher = fetcher
        self.publishers: list[Publisher] = []  # every one made here, to close at the end
        self._vectors_topics: dict[str, tuple[str, int]] = {}  # collection: (topic, partitions)

    @property
    def profile(self) -> ModelProfile:
        return self.settings.model_profile()

    @property
    def fetcher(self) -> ImageFetcher:
        if self._fetcher is None:
            self._fetcher = ImageFetcher(self.settings.fetch_policy())
        return self._fetcher

    def open_catalog(self) -> Catalog:
        return build_catalog(self.settings)

    # --- the model in use ------------------------------------------------------------------

    def open_live_model(self, catalog: Catalog) -> ModelInUse:
        """The model and collection to serve: the configured model's when the alias names it or
        nothing (a first start: its collection is made and goes live), else the live one, with
        the model its card names (a reindex moved the alias; an instance that restarts with an
        older configuration must not move it back, nor answer from a collection with the
        wrong model)."""
        profile = self.profile
        log.info("loading the model (%s + %s)", profile.image_backbone, profile.text_backbone)
        encoder = self.load_encoder(profile)
        try:
            version = encoder.model_version
            configured = catalog.name_of(version)
            live = catalog.live()
            if live is None or live == configured:
                index = catalog.serve_first(ModelCard.of(profile, version), encoder.dims)
            else:
                log.warning(
                    "the configured model makes %s, but the alias %s names %s: serving that one "
                    "with the model its card names. `loupe reindex` builds the configured one "
                    "and switches",
                    configured,
                    catalog.alias,
                    live,
                )
                encoder.close()
                encoder, index = open_collection(catalog, live, profile, self.load_encoder)
        except BaseException:
            encoder.close()
            raise
        return ModelInUse(encoder, index)

    # --- the workers -----------------------------------------------------------------------

    def publisher(self, name: str, *, transactional: bool | None = None) -> Publisher:
        """A publisher with a producer of its own (a transaction holds one batch of one
        consumer), which it can replace with a like one after a fatal error."""
        settings = self.settings
        transactional = settings.exactly_once if transactional is None else transactional
        if transactional:
            make = lambda: make_transactional_producer(settings, name)  # noqa: E731
        else:
            make = lambda: make_producer(settings)  # noqa: E731
        publisher = Publisher(
            make(),
            settings.deadletter_topic,
            self.metrics,
            transactional=transactional,
            make_producer=make,
            name=name,
        )
        self.publishers.append(publisher)
        return publisher

    def product_stage(self, publisher: Publisher, encode_lock: EncodeLock) -> ProductStage:
        """Parse, fetch and encode product events, dead-lettering through ``publisher``: the
        stage of the ingest and of encode-once's encoders."""
        return ProductStage(
            fetcher=self.fetcher,
            publisher=publisher,
            metrics=self.metrics,
            source=self.settings.products_topics(),
            encode_lock=encode_lock,
            fetch_workers=self.settings.fetch_workers,
        )

    def ingest_worker(
        self,
        live: LiveModel,
        *,
        group: str | None = None,
        hand_over: Catalog | None = None,
        encode_lock: EncodeLock = contextlib.nullcontext,
        publisher: Publisher | None = None,
        stop_event: threading.Event | None = None,
        vectors_out: VectorsOut | None = None,
        **consumer_options: Any,
    ) -> IngestWorker:
        """The products consumer into ``live``'s collection, in ``group`` (the ingest's by
        default). ``hand_over``: the catalog, for a worker that follows switches of the live
        collection and reports its point count (the service's; not a reindex's)."""
        settings = self.settings
        publisher = publisher or self.publisher("ingest")
        return IngestWorker(
            self.basics(publisher, live, stop_event),
            consumer=make_consumer(
                settings, group or self.names.ingest_group(), **consumer_options
            ),
            stage=self.product_stage(publisher, encode_lock),
            topic=settings.products_topics(),
            hand_over=(
                HandOver(hand_over, settings.products_topics(), POINTS_REPORT_INTERVAL_S)
                if hand_over is not None
                else None
            ),
            vectors_out=vectors_out,
        )

    # --- encode once, index many (consumers/workers/vectors.py) ------------------------

    def open_vectors_topic(self, collection: str) -> tuple[str, int]:
        """``collection``'s vectors topic and its partition count, made if missing; asked of
        the broker once per collection (the encoder and the writer both need it)."""
        if collection not in self._vectors_topics:
            self._vectors_topics[collection] = ensure_vectors_topic(self.settings, collection)
        return self._vectors_topics[collection]

    def vectors_out(self, publisher: Publisher, collection: str) -> VectorsOut:
        """What publishes ``collection``'s vector records with ``publisher``'s batches."""
        topic, partitions = self.open_vectors_topic(collection)
        return VectorsOut(publisher, topic, collection, partitions)

    def encode_worker(
        self,
        live: LiveModel,
        catalog: Catalog,
        *,
        encode_lock: EncodeLock = contextlib.nullcontext,
        stop_event: threading.Event | None = None,
    ) -> EncodeWorker:
        """The products consumer that encodes for ``live``'s collection into its vectors topic,
        in that collection's encoders' group (one for every instance)."""
        settings = self.settings
        publisher = self.publisher("encode")
        return EncodeWorker(
            self.basics(publisher, live, stop_event),
            make_consumer=lambda c: make_consumer(settings, self.names.encode_group(c)),
            make_vectors_out=lambda c: self.vectors_out(publisher, c),
            catalog=catalog,
            stage=self.product_stage(publisher, encode_lock),
            topic=settings.products_topics(),
        )

    def index_worker(
        self,
        live: LiveModel,
        catalog: Catalog,
        *,
        group: Callable[[str], str] | None = None,
        publisher: Publisher | None = None,
        stop_event: threading.Event | None = None,
        report_points: bool = True,
        **consumer_options: Any,
    ) -> IndexWorker:
        """The vectors consumer that writes ``live``'s collection, in this index's writers'
        group (``group(collection)``: another, a reindex's); it reports the collection's point
        count in ``catalog`` (the service's, which a reindex compares with; not a reindex's
        own: ``report_points=False``)."""
        settings = self.settings
        group_of = group or self.names.index_group

        def consumer_of(collection: str):
            topic, _ = self.open_vectors_topic(collection)
            return make_consumer(settings, group_of(collection), **consumer_options), topic

        return IndexWorker(
            self.basics(publisher or self.publisher("index"), live, stop_event),
            make_consumer=consumer_of,
            products=settings.products_topics(),
            hand_over=(
                HandOver(catalog, settings.products_topics(), POINTS_REPORT_INTERVAL_S)
                if report_points
                else None
            ),
        )

    def search_worker(
        self, live: LiveModel, *, encode_lock: EncodeLock = contextlib.nullcontext
    ) -> SearchService:
        """The search-requests consumer, answering from ``live``'s collection."""
        settings = self.settings
        return SearchService(
            self.basics(self.publisher("search"), live, poll_timeout_ms=SEARCH_POLL_TIMEOUT_MS),
            consumer=make_consumer(
                settings,
                self.names.search_group(),
                max_poll_records=settings.search_max_poll_records,
            ),
            fetcher=self.fetcher,
            topic=settings.search_requests_topic,
            response_topic=settings.search_responses_topic,
            encode_lock=encode_lock,
            fetch_workers=settings.fetch_workers,
            photo_kind_weight=settings.photo_kind_weight,
            reply_topics=ReplyTopics.of(
                settings.search_responses_topic,
                settings.reply_to_pattern,
                own=self.names.own_topics(),
                own_prefixes=[self.names.vectors_prefix],
            ),
            cleanup_policy=lambda topic: cleanup_policy(settings, topic),
        )

    def basics(
        self,
        publisher: Publisher,
        live: LiveModel,
        stop_event: threading.Event | None = None,
        poll_timeout_ms: int | None = None,
    ) -> WorkerBasics:
        """What every worker's loop is given (``WorkerBasics``): ``publisher``, this
        application's metrics, the model ``live`` follows, the configured poll timeout."""
        return WorkerBasics(
            publisher=publisher,
            metrics=self.metrics,
            live=live,
            poll_timeout_ms=poll_timeout_ms or self.settings.poll_timeout_ms,
            stop_event=stop_event,
        )

    def close_publishers(self) -> None:
        for publisher in self.publishers:
            publisher.close()
        self.publishers = []


def fixed_model(encoder: FusedEncoder, index: Collection) -> LiveModel:
    """A ``LiveModel`` that never switches (a reindex's, a test's)."""
    return LiveModel(ModelInUse(encoder, index))


def build_catalog(settings: Settings) -> Catalog:
    """The configured engine's catalog: a Qdrant server (``LOUPE_INDEX_URL``), or an embedded
    engine under the state directory (``LOUPE_INDEX_ENGINE``). Opens nothing per model."""
    path = settings.resolved_index_path()
    if path is not None and settings.index_engine == "edge":
        from loupe.consumers.index.edge import EdgeStore

        older = settings.state_dir / "index" / "meta.json"  # qdrant-client's local mode
        if settings.index_path is None and older.exists() and not path.exists():
            log.warning(
                "an index of qdrant-client's local mode is in %s, and this index starts empty "
                "in %s (Qdrant Edge): replay the products topic into it, or set "
                "LOUPE_INDEX_ENGINE=qdrant-local to keep the old one",
                older.parent,
                path,
            )
        return Catalog(
            EdgeStore(
                path=str(path),
                prefix=settings.index_prefix,
                hnsw_ef=settings.index_hnsw_ef,
                acorn=settings.index_acorn,
                quantization=settings.index_quantization,
            )
        )
    from loupe.consumers.index.qdrant import QdrantStore

    return Catalog(
        QdrantStore(
            path=str(path) if path else None,
            url=settings.index_url,
            api_key=settings.index_api_key.get_secret_value() if settings.index_api_key else None,
            ca=settings.index_ca,
            prefix=settings.index_prefix,
            hnsw_ef=settings.index_hnsw_ef,
            acorn=settings.index_acorn,
            quantization=settings.index_quantization,
            topology=settings.index_topology(),
        )
    )
