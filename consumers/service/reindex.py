"""``loupe reindex``: build the configured model's collection from the products topic while the
service keeps answering from the live one, then move the alias to it.

The products topic is compacted, so reading it from the beginning yields every product's latest
event. The reindex reads it with its own consumer group (``<group>.reindex.<collection>``)
through the same ingest pipeline as the service (fetch, encode, version rules, dead letters),
committing as it goes: killed at any point, it resumes from its committed offsets, and replays
are idempotent. Once it has caught up (no lag on any partition, and its point count agrees with
the live collection's, see ``counts_agree``), it records the offsets it has applied on the new
collection's card, marks the old collection retired (kept for a grace period, for
``--rollback``), and switches the alias in one step. Running services follow the alias
(consumers/workers/live_model.py) and hand ingest over from those offsets
(consumers/workers/handover.py).

With encode-once, another instance's reindex (a replica's, with an index of its own) may
already have published the new collection's vectors topic. A reindex then builds from that
topic, as a late replica's index writer does, and encodes nothing (``reads_vectors``). It reads
in its own group, as the encoding reindex does (the operator's ACLs, and the lock on a shared
server, stay the same); after the switch this index's writers read the topic again from its
start in their own group, which costs index reads, not encodes (each record is stale by then).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kafka.structs import TopicPartition

from loupe.consumers.errors import ConfigError
from loupe.consumers.index.catalog import Catalog, ModelCard
from loupe.consumers.index.interface import Collection
from loupe.consumers.kafka.admin import KafkaAdmin
from loupe.consumers.kafka.io import make_consumer
from loupe.consumers.kafka.leftovers import Leftovers, delete_leftovers, find_leftovers
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.metrics import HealthServer, ReindexMetrics
from loupe.consumers.service.app import Application, build_catalog, fixed_model
from loupe.consumers.service.reindex_lock import REINDEX_SESSION_MS, reindex_lock
from loupe.consumers.service.reindex_progress import Progress, ReindexTracker, counts_agree
from loupe.consumers.service.signals import install_signal_handlers
from loupe.consumers.settings import Settings
from loupe.consumers.workers.ingest import IngestWorker
from loupe.consumers.workers.live_model import LiveModel
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
REINDEX_MEMBER = "loupe-reindex"  # the reindex's static member id (KIP-345)
COUNT_WAIT_S = 60.0  # how long counts may disagree at lag zero before the reindex gives up


class CountsDisagree(LoupeError):
    """Caught up, but the new collection's point count does not match the live one's."""


@dataclass(frozen=True)
class ReindexOutcome:
    collection: str
    previous: str | None  # the collection that was live before
    switched: bool
    events: int  # events this run applied
    points: int
    seconds: float
    detail: str


class Reindex:
    """One run of ``loupe reindex`` for the configured model (see the module docstring), built
    as ``loupe serve`` is: its parts come from an ``Application``; ``start()`` binds its metrics
    port (``/readyz`` says how far it is), ``run()`` builds the collection and switches."""

    def __init__(
        self,
        settings: Settings,
        *,
        report: Callable[[str], None],
        grace_s: float,
        allow_count_difference: int = 0,
        count_wait_s: float = COUNT_WAIT_S,
        progress_every_s: float = PROGRESS_EVERY_S,
        from_vectors: bool | None = None,
    ) -> None:
        """``from_vectors``: build from the new collection's vectors topic (True), encode the
        products topic (False), or decide (None, ``reads_vectors``)."""
        if from_vectors and not settings.encode_once:
            raise ConfigError(
                "building from a vectors topic needs LOUPE_ENCODE_ONCE=true (without it no "
                "vectors topic is published)"
            )
        self.settings = settings
        self.from_vectors = from_vectors
        self.app = Application(settings)
        self.metrics = self.app.metrics
        self.progress_metrics = ReindexMetrics(self.metrics.registry)
        self.health: HealthServer | None = None
        self.status = "reindexing: starting"
        self.report = report
        self.grace_s = grace_s
        self.allow_count_difference = allow_count_difference
        self.count_wait_s = count_wait_s
        self.progress_every_s = progress_every_s
        self.stop_event = threading.Event()

    def start(self, metrics_port: int) -> Reindex:
        """Serve ``/metrics`` and ``/readyz`` on ``metrics_port`` (0: a free one) until ``run``
        ends."""
        if self.health is None:
            ready = lambda: (True, self.status)  # noqa: E731
            self.health = HealthServer(
                self.metrics, ready, self.settings.metrics_host, metrics_port
            )
            self.health.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        install_signal_handlers(self.stop)

    def run(self) -> ReindexOutcome:
        try:
            return self._run()
        finally:
            if self.health is not None:
                self.health.stop()

    def _run(self) -> ReindexOutcome:
        app = self.app
        encoder = app.load_encoder(app.profile)
        catalog = app.open_catalog()
        try:
            target = catalog.name_of(encoder.model_version)
            live = catalog.live()
            if live == target:
                return ReindexOutcome(target, live, False, 0, 0, 0.0, f"{target} is already live")
            with reindex_lock(self.settings, target):
                serving = f"{live} stays live meanwhile" if live else "nothing is live yet"
                from_vectors = self.from_vectors
                if from_vectors is None:
                    from_vectors, why = reads_vectors(self.app, target)
                    log.info("building %s from %s", target, why)
                if from_vectors:
                    source = f"{self.app.names.vectors_topic(target)}, encoding nothing"
                else:
                    source = self.settings.products_topics().label
                self.report(f"building {target} from {source}; {serving}")
                return self._build(catalog, encoder, target, live, from_vectors)
        finally:
            encoder.close()
            catalog.close()

    def _build(
        self, catalog: Catalog, encoder, target: str, live: str | None, from_vectors: bool
    ) -> ReindexOutcome:
        settings, app, names = self.settings, self.app, self.app.names
        index = catalog.begin_build(
            ModelCard.of(app.profile, encoder.model_version),
            encoder.dims,
            # with encode-once, the vectors of what it applies go out with them
            vectors_topic=names.vectors_topic(target) if settings.encode_once else None,
        )
        model = fixed_model(encoder, index)
        if from_vectors:
            # The index writer of the new collection, as a late replica's service runs it, in
            # the reindex's group (a static member, as below).
            worker = app.index_worker(
                model,
                catalog,
                group=names.reindex_group,
                publisher=app.publisher("reindex", transactional=False),
                stop_event=self.stop_event,
                report_points=False,
                group_instance_id=REINDEX_MEMBER,
                session_timeout_ms=REINDEX_SESSION_MS,
            )
            tracker = ReindexTracker(worker.consumer, ProductsTopics(worker.topic))
            applied = worker.report_offsets  # how far into the products topics, per record
        else:
            worker = self._ingest(model, target)
            tracker = ReindexTracker(worker.consumer, settings.products_topics())
            applied = tracker.positions
        started = time.monotonic()
        hint = (
            "; built from a vectors topic, which lacks what its publisher has not published "
            "yet: run it again once that reindex is done, or with --encode"
            if from_vectors
            else ""
        )
        watch = _Watch(self, catalog, index, tracker, applied, target, live, hint)
        try:
            self.report(watch.progress.line(target))  # where it starts (or resumes)
            worker.run(until=watch.done)  # closes the worker
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            self.report(watch.progress.line(target))
            events = watch.events
        finally:
            worker.close()
            app.close_publishers()
            index.close()  # an embedded shard opens in one process at a time: the service's next
        previous = catalog.switch(target, self.grace_s, watch.applied)
        return ReindexOutcome(
            target,
            previous,
            True,
            events,
            watch.progress.points,
            time.monotonic() - started,
            watch.detail,
        )

    def _ingest(self, model: LiveModel, target: str) -> IngestWorker:
        """The service's ingest worker, in a group of its own, into the new collection only,
        stopped by ``_Watch.done`` once caught up. A static member (KIP-345): a reindex
        restarted after a kill takes its partitions back at once, instead of waiting for the
        killed one's session to time out. The session is short (the heartbeat thread beats
        every 3 s), so that a killed reindex also leaves the group soon, which a second reindex
        on a shared server waits for (reindex_lock).

        With encode-once it also publishes what it encodes to the new collection's vectors
        topic: the index writers of every other index read it after the switch, and an index
        that starts later (or reindexes later) builds from it without encoding."""
        app = self.app
        publisher = app.publisher("reindex", transactional=False)
        return app.ingest_worker(
            model,
            group=app.names.reindex_group(target),
            publisher=publisher,
            vectors_out=app.vectors_out(publisher, target) if self.settings.encode_once else None,
            stop_event=self.stop_event,  # a signal stops it between retries too
            group_instance_id=REINDEX_MEMBER,
            session_timeout_ms=REINDEX_SESSION_MS,
        )

    def export(self, progress: Progress, collection: str) -> None:
        self.status = progress.line(collection)
        self.progress_metrics.events_done.set(progress.done)
        self.progress_metrics.events_total.set(progress.total)
        self.progress_metrics.points.set(progress.points)
        self.progress_metrics.eta_seconds.set(progress.eta_s if progress.eta_s is not None else -1)


class _Watch:
    """The reindex's stop condition, asked after every batch: progress reported and exported,
    and done once caught up with the counts in agreement (``CountsDisagree`` if they stay
    apart longer than the reindex's ``count_wait_s``)."""

    def __init__(
        self,
        reindex: Reindex,
        catalog: Catalog,
        index: Collection,
        tracker: ReindexTracker,
        applied: Callable[[], Mapping[TopicPartition, int]],
        target: str,
        live: str | None,
        stuck_hint: str = "",
    ) -> None:
        """``applied()``: how far into each products partition the new collection reaches;
        ``stuck_hint``: what to add when the counts stay apart."""
        self.reindex, self.catalog, self.index = reindex, catalog, index
        self.tracker, self.target, self.live = tracker, target, live
        self._source_applied = applied
        self.stuck_hint = stuck_hint
        self.progress = tracker.measure(index)
        self.detail = ""
        # Where it stands when done: the new card's offsets.
        self.applied: dict[TopicPartition, int] = {}
        self.events = 0  # events this run applied
        self._reported_at = time.monotonic()
        self._disagreeing_since: float | None = None
        self._disagreeing_points = -1

    def done(self, handled: int) -> bool:
        reindex, now = self.reindex, time.monotonic()
        self.progress = self.tracker.measure(self.index)
        reindex.export(self.progress, self.target)
        if now - self._reported_at >= reindex.progress_every_s:
            reindex.report(self.progress.line(self.target))
            self._reported_at = now
        if handled or not self.tracker.caught_up():
            return False
        applied = dict(self._source_applied())
        agree, self.detail = counts_agree(
            self.catalog, self.live, self.progress.points, applied,
            reindex.allow_count_difference, self.tracker.begin,
        )  # fmt: skip
        if agree:  # read now: the worker closes its consumer once this says done
            self.applied = applied
            self.events = self.tracker.done_this_run()
            return True
        if self.progress.points != self._disagreeing_points:
            # Still growing: from a vectors topic that another reindex is publishing now, the
            # counts meet when it is done. The wait is for counts that stopped moving.
            self._disagreeing_since, self._disagreeing_points = now, self.progress.points
        if now - self._disagreeing_since > reindex.count_wait_s:
            raise CountsDisagree(
                f"caught up, but {self.detail} for {reindex.count_wait_s:.0f} s; nothing was "
                "switched. Look at the dead letters of both models; to switch anyway, pass "
                "--allow-count-difference" + self.stuck_hint
            )
        return False


def rollback(settings: Settings, grace_s: float) -> tuple[str, str | None]:
    """Point the alias back at the most recently retired collection (``Catalog.rollback``)."""
    catalog = build_catalog(settings)
    try:
        return catalog.rollback(grace_s)
    finally:
        catalog.close()


def describe_collections(settings: Settings) -> list[dict[str, object]]:
    """Every collection under the alias's prefix, with what its card says."""
    catalog = build_catalog(settings)
    try:
        return catalog.describe()
    finally:
        catalog.close()


def reads_vectors(app: Application, target: str) -> tuple[bool, str]:
    """Whether a reindex to ``target`` should build from its vectors topic, and why: with
    encode-once, when that topic holds records that this index's own reindex did not publish
    (its group has committed no products offset), i.e. another instance published them. A
    reindex of this index that was stopped midway goes on as it began."""
    if not app.settings.encode_once:
        return False, "the products topics (no vectors topics without LOUPE_ENCODE_ONCE)"
    names = app.names
    topic = names.vectors_topic(target)
    consumer = make_consumer(app.settings, names.reindex_group(target))
    try:
        topics = consumer.topics()
        if topic not in topics:
            return False, f"the products topics ({topic} does not exist yet)"
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        records = sum(end[tp] - begin[tp] for tp in partitions)
        if records == 0:
            return False, f"the products topics ({topic} is empty)"
        products = [
            TopicPartition(t, p)
            for t in names.products.among(topics)
            for p in consumer.partitions_for_topic(t) or ()
        ]
        if any(consumer.committed(tp) is not None for tp in products):
            return False, "the products topics (this index's reindex began there: it goes on)"
        return True, f"{topic} ({records} records published by another instance)"
    finally:
        consumer.close()


def kafka_leftovers(settings: Settings, delete: bool) -> Leftovers:
    """The vectors topics and groups of collections this index no longer holds
    (``consumers/kafka/leftovers.py``), deleted when ``delete``."""
    catalog = build_catalog(settings)
    try:
        collections = catalog.collections()
    finally:
        catalog.close()
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        found = find_leftovers(admin, KafkaNames.of(settings), settings.index_prefix, collections)
        if delete and found:
            delete_leftovers(admin, found)
    return found
