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
(consumers/live_model.py) and hand ingest over from those offsets (consumers/handover.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.app import Application, fixed_model
from loupe.consumers.catalog import Catalog, CollectionCard, ModelCard, build_catalog, offset_key
from loupe.consumers.errors import ConfigError
from loupe.consumers.index import Collection
from loupe.consumers.kafka_admin import KafkaAdmin
from loupe.consumers.kafka_names import KafkaNames
from loupe.consumers.metrics import LoupeMetrics, ReindexMetrics
from loupe.consumers.products_topics import ProductsTopics
from loupe.consumers.settings import Settings
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
COUNT_WAIT_S = 60.0  # how long counts may disagree at lag zero before the reindex gives up


class ReindexBusy(LoupeError):
    """Another reindex of the same model version is running."""


class CountsDisagree(LoupeError):
    """Caught up, but the new collection's point count does not match the live one's."""


@dataclass(frozen=True)
class Progress:
    done: int  # events applied (offsets past the start of the topic)
    total: int  # events in the topic now
    rate: float  # events per second, this run
    eta_s: float | None
    points: int

    def line(self, collection: str) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        eta = f"ETA {self.eta_s:.0f} s" if self.eta_s is not None else "ETA unknown"
        return (
            f"reindex {collection}: {self.done}/{self.total} events ({share:.0f}%), "
            f"{self.rate:.1f} events/s, {eta}, {self.points} points"
        )


@dataclass(frozen=True)
class ReindexOutcome:
    collection: str
    previous: str | None  # the collection that was live before
    switched: bool
    events: int  # events this run applied
    points: int
    seconds: float
    detail: str


@contextmanager
def reindex_lock(settings: Settings, collection: str) -> Iterator[None]:
    """One reindex per collection: an exclusive lock file where the index lives (one machine),
    and, for a shared index server, no other member in the reindex's consumer group."""
    where = settings.resolved_index_path() or settings.state_dir
    where.mkdir(parents=True, exist_ok=True)
    path = Path(where) / f".reindex.{collection}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ReindexBusy(
                f"a reindex of {collection} is already running ({holder}, lock {path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            if settings.index_url is not None:
                _require_no_members(settings, KafkaNames.of(settings).reindex_group(collection))
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


REINDEX_SESSION_MS = 15_000  # the reindex consumer's session (kafka-python's default: 45 s)
# A reindex killed a moment ago stays a member of its group until its session times out; a
# reindex running elsewhere stays for good. So members are waited out this long before they
# count as a reindex that runs.
MEMBERS_EXPIRE_S = REINDEX_SESSION_MS / 1000 + 5


def _require_no_members(settings: Settings, group: str) -> None:
    deadline = time.monotonic() + MEMBERS_EXPIRE_S
    members = _members(settings, group)
    if members:
        log.warning(
            "consumer group %s has %d member(s): a reindex running elsewhere, or one killed "
            "less than a session ago; waiting up to %.0f s for them to leave",
            group,
            members,
            MEMBERS_EXPIRE_S,
        )
    while members:
        if time.monotonic() > deadline:
            raise ReindexBusy(
                f"a reindex is already running: consumer group {group} still has {members} "
                f"member(s) after {MEMBERS_EXPIRE_S:.0f} s (a killed one would have left by now)"
            )
        time.sleep(2.0)
        members = _members(settings, group)


def _members(settings: Settings, group: str) -> int:
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        return admin.group_members(group)


class Reindex:
    """One run of ``loupe reindex`` for the configured model (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: LoupeMetrics,
        report: Callable[[str], None],
        grace_s: float,
        allow_count_difference: int = 0,
        count_wait_s: float = COUNT_WAIT_S,
        progress_every_s: float = PROGRESS_EVERY_S,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.progress_metrics = ReindexMetrics(metrics.registry)
        self.report = report
        self.grace_s = grace_s
        self.allow_count_difference = allow_count_difference
        self.count_wait_s = count_wait_s
        self.progress_every_s = progress_every_s
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> ReindexOutcome:
        app = Application(self.settings, metrics=self.metrics)
        encoder = app.load_encoder(app.profile)
        catalog = app.open_catalog()
        try:
            target = catalog.name_of(encoder.model_version)
            live = catalog.live()
            if live == target:
                return ReindexOutcome(target, live, False, 0, 0, 0.0, f"{target} is already live")
            with reindex_lock(self.settings, target):
                serving = f"{live} stays live meanwhile" if live else "nothing is live yet"
                source = self.settings.products_topics().label
                self.report(f"building {target} from {source}; {serving}")
                return self._build(app, catalog, encoder, target, live)
        finally:
            encoder.close()
            catalog.close()

    def _build(
        self, app: Application, catalog: Catalog, encoder, target: str, live: str | None
    ) -> ReindexOutcome:
        settings = self.settings
        index = catalog.open(encoder.model_version)
        index.ensure_collection(encoder.dims, make_live=False)  # the card needs the collection
        card = catalog.card(target)
        if card is None or card.state != "live":  # "live": it switched, then crashed; resume
            fresh = CollectionCard(ModelCard.of(app.profile, encoder.model_version))
            if settings.encode_once:  # the vectors of what it applies go out with them
                fresh.vectors_topic = KafkaNames.of(settings).vectors_topic(target)
            if card is not None:  # a collection retired earlier, built again
                fresh.applied_offsets = card.applied_offsets
            catalog.write_card(target, fresh)
        # The service's ingest worker, in a group of its own, into the new collection only, and
        # stopped by ``_Watch.done`` once caught up. A static member (KIP-345): a reindex restarted
        # after a kill takes its partitions back at once, instead of waiting for the killed
        # one's session to time out. The session is short (the heartbeat thread beats every
        # 3 s), so that a killed reindex also leaves the group soon, which a second reindex on
        # a shared server waits for (reindex_lock).
        # With encode-once it also publishes what it encodes to the new collection's vectors
        # topic: the index writers of every other index read it after the switch, and an index
        # that starts later builds from it without encoding (consumers/vectors.py).
        publisher = app.publisher("reindex", transactional=False)
        indexer = app.ingest_worker(
            fixed_model(encoder, index),
            group=KafkaNames.of(settings).reindex_group(target),
            publisher=publisher,
            vectors_out=app.vectors_out(publisher, target) if settings.encode_once else None,
            stop_event=self.stop_event,  # a signal stops it between retries too
            group_instance_id="loupe-reindex",
            session_timeout_ms=REINDEX_SESSION_MS,
        )
        started = time.monotonic()
        tracker = _Tracker(indexer.consumer, settings.products_topics())
        watch = _Watch(self, catalog, index, tracker, target, live)
        try:
            self.report(watch.progress.line(target))  # where it starts (or resumes)
            indexer.run(until=watch.done)  # closes the worker
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            self.report(watch.progress.line(target))
            applied, events = watch.applied, watch.events
        finally:
            indexer.close()
            app.close_publishers()
            index.close()  # an embedded shard opens in one process at a time: the service's next
        previous = catalog.switch(target, self.grace_s, applied)
        return ReindexOutcome(
            target,
            previous,
            True,
            events,
            watch.progress.points,
            time.monotonic() - started,
            watch.detail,
        )

    def export(self, progress: Progress) -> None:
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
        tracker: _Tracker,
        target: str,
        live: str | None,
    ) -> None:
        self.reindex, self.catalog, self.index = reindex, catalog, index
        self.tracker, self.target, self.live = tracker, target, live
        self.progress = tracker.measure(index)
        self.detail = ""
        # Where it stands when done: the new card's offsets.
        self.applied: dict[TopicPartition, int] = {}
        self.events = 0  # events this run applied
        self._reported_at = time.monotonic()
        self._disagreeing_since: float | None = None

    def done(self, handled: int) -> bool:
        reindex, now = self.reindex, time.monotonic()
        self.progress = self.tracker.measure(self.index)
        reindex.export(self.progress)
        if now - self._reported_at >= reindex.progress_every_s:
            reindex.report(self.progress.line(self.target))
            self._reported_at = now
        if handled or not self.tracker.caught_up():
            return False
        agree, self.detail = counts_agree(
            self.catalog, self.live, self.progress.points, self.tracker,
            reindex.allow_count_difference,
        )  # fmt: skip
        if agree:  # read now: the worker closes its consumer once this says done
            self.applied = self.tracker.positions()
            self.events = self.tracker.done_this_run()
            return True
        self._disagreeing_since = self._disagreeing_since or now
        if now - self._disagreeing_since > reindex.count_wait_s:
            raise CountsDisagree(
                f"caught up, but {self.detail} for {reindex.count_wait_s:.0f} s; nothing was "
                "switched. Look at the dead letters of both models; to switch anyway, pass "
                "--allow-count-difference"
            )
        return False


FIND_TOPICS_S = 5.0  # per merchant: how often a reindex looks for new merchant topics


class _Tracker:
    """Where the reindex stands in the products topics: done and total events, and whether it
    caught up. Per merchant, a merchant topic made during the reindex joins the count when the
    consumer's subscription finds it."""

    def __init__(self, consumer: KafkaConsumer, products: ProductsTopics) -> None:
        self.consumer = consumer
        self.products = products
        self.partitions: list[TopicPartition] = []
        self.begin: dict[TopicPartition, int] = {}
        self._end: dict[TopicPartition, int] = {}
        self._find_partitions()
        if not self.partitions and not products.per_merchant:
            raise ConfigError(f"topic {products.base} does not exist (or has no partitions)")
        self._started_at = time.monotonic()
        self._start_done = self._done(self.positions())  # a resumed run starts past zero

    def _find_partitions(self) -> None:
        """The partitions of the products topics the broker has now, assigned or not."""
        topics = self.products.among(self.consumer.topics())
        found = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(self.consumer.partitions_for_topic(topic) or ())
        ]
        self._found_at = time.monotonic()
        new = [tp for tp in found if tp not in self.begin]
        if new:
            self.begin.update(self.consumer.beginning_offsets(new))
            self._end.update(self.consumer.end_offsets(new))
        self.partitions = found

    def positions(self) -> dict[TopicPartition, int]:
        assigned = self.consumer.assignment()
        found = {}
        for tp in self.partitions:
            if tp in assigned:
                found[tp] = self.consumer.position(tp)
            else:
                committed = self.consumer.committed(tp)
                found[tp] = committed if committed is not None else self.begin[tp]
        return found

    def measure(self, index: Collection) -> Progress:
        if self.products.per_merchant and time.monotonic() - self._found_at > FIND_TOPICS_S:
            self._find_partitions()
        self._end = self.consumer.end_offsets(self.partitions) if self.partitions else {}
        done = self._done(self.positions())
        total = sum(self._end[tp] - self.begin[tp] for tp in self.partitions)
        elapsed = max(time.monotonic() - self._started_at, 1e-6)
        rate = (done - self._start_done) / elapsed
        eta = (total - done) / rate if rate > 0 else None
        return Progress(done, total, rate, eta, index.count(exact=True))

    def done_this_run(self) -> int:
        return self._done(self.positions()) - self._start_done

    def _done(self, positions: dict[TopicPartition, int]) -> int:
        return sum(positions[tp] - self.begin[tp] for tp in self.partitions)

    def caught_up(self) -> bool:
        """Every partition assigned to us and read to its end (as of the last measure)."""
        if set(self.consumer.assignment()) != set(self.partitions):
            return False
        return all(self.consumer.position(tp) >= self._end[tp] for tp in self.partitions)


def counts_agree(
    catalog: Catalog,
    live: str | None,
    points: int,
    tracker: _Tracker,
    allowed: int,
) -> tuple[bool, str]:
    """Whether the new collection's ``points`` agree with the live collection's count.

    The live service's ingest reports its exact count together with the offsets it had
    committed (consumers/ingest.py). Each event changes a count by at most one, so the two
    collections may differ by at most the events one has applied and the other had not (the
    distance between the reindex's offsets and the reported ones), plus ``allowed``."""
    if live is None:
        return True, f"{points} points (no live collection to compare with)"
    card = catalog.card(live)
    if card is None or card.points is None:
        log.warning(
            "%s has no point-count report (no service has ingested into it since this version "
            "of Loupe): the counts are not compared",
            live,
        )
        return True, f"{points} points ({live} reported no count)"
    mine = tracker.positions()
    slack = 0
    for tp in tracker.partitions:
        reported = card.points_offsets.get(offset_key(tp.topic, tp.partition), tracker.begin[tp])
        slack += abs(mine[tp] - reported)
    difference = abs(points - card.points)
    detail = (
        f"{points} points here, {card.points} in {live} (difference {difference}, "
        f"events between the two: {slack}, allowed: {allowed})"
    )
    return difference <= slack + allowed, detail


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
