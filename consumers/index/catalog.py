"""The collection catalog: which collection is live, which model made each, and how the live one
changes.

Each collection carries a card (Qdrant collection metadata, or a file beside an embedded shard):
the model that made it, enough for any instance to load that model again; its state (building,
live, retired); the products-topic offsets up to which it has applied every event; and, once
retired, when it may be dropped. The alias names the live collection. ``Catalog`` is the one
place that reads and changes them: ``switch`` (a reindex going live, a rollback), ``retire``,
``drop_expired``, and the ingest's records of how far each collection got. A handle on one
collection (``Collection``, consumers/index/interface.py) only holds points.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kafka.structs import TopicPartition

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index.interface import Collection, CollectionStore, collection_name
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.encoders.profile import RECIPE, ModelProfile
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)

CARD_FORMAT = 1
State = Literal["building", "live", "retired"]


class CardError(LoupeError):
    """A collection card this version of Loupe cannot read."""


class NothingToRollBack(LoupeError):
    """No retired collection is left to return to."""


# What a card written before a recipe field existed meant by its absence.
_BEFORE_IT_EXISTED: dict[str, Any] = {"image_side": None}  # None: the backbone's own side


@dataclass(frozen=True)
class ModelCard:
    """The model a collection's vectors come from: its version and its recipe (the fields of a
    ``ModelProfile`` that decide the vectors, ``ModelProfile.recipe``). Load it anywhere, get the
    same model version; how the model runs (device, precision, batch sizes) stays each
    instance's."""

    model_version: str
    recipe: Mapping[str, Any]

    @classmethod
    def of(cls, profile: ModelProfile, model_version: str) -> ModelCard:
        return cls(model_version, profile.recipe())

    def profile(self, local: ModelProfile) -> ModelProfile:
        """This model, run the way this instance runs models."""
        return local.following(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return {"model_version": self.model_version, **self.recipe}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelCard:
        recipe = {name: raw.get(name, _BEFORE_IT_EXISTED.get(name)) for name in RECIPE}
        missing = [name for name in RECIPE if name not in raw and name not in _BEFORE_IT_EXISTED]
        if missing or "model_version" not in raw:
            raise CardError(
                f"a collection card's model lacks {', '.join(missing or ['model_version'])}"
            )
        return cls(str(raw["model_version"]), recipe)


@dataclass
class CollectionCard:
    model: ModelCard
    state: State = "building"
    # "<topic>:<partition>" -> the next offset: every event before it is applied here.
    applied_offsets: dict[str, int] = field(default_factory=dict)
    retired_at: float | None = None  # unix seconds
    drop_after: float | None = None  # unix seconds; a running service drops it after this
    # The live ingest's last report: its point count, read right after committing ``offsets``
    # ("<topic>:<partition>" -> next offset). A reindex compares its own count with it.
    points: int | None = None
    points_offsets: dict[str, int] = field(default_factory=dict)
    # With encode-once: the vectors topic that holds every product up to ``applied_offsets``
    # (a reindex published what it encoded), where the encoders may start.
    vectors_topic: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            **dataclasses.asdict(self),
            "model": self.model.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CollectionCard:
        if raw.get("format") != CARD_FORMAT:
            raise CardError(f"unknown collection card format {raw.get('format')!r}")
        return cls(
            model=ModelCard.from_dict(raw["model"]),
            state=raw["state"],
            applied_offsets={str(k): int(v) for k, v in (raw.get("applied_offsets") or {}).items()},
            retired_at=raw.get("retired_at"),
            drop_after=raw.get("drop_after"),
            points=raw.get("points"),
            points_offsets={str(k): int(v) for k, v in (raw.get("points_offsets") or {}).items()},
            vectors_topic=raw.get("vectors_topic"),
        )

    def applied_offsets_in(self, topics: ProductsTopics) -> dict[TopicPartition, int]:
        """``applied_offsets`` of the products topics."""
        return offsets_in(self.applied_offsets, topics)


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def offsets_in(keyed: Mapping[str, int], topics: ProductsTopics) -> dict[TopicPartition, int]:
    """Offsets stored by ``offset_key``, of the products topics only, by partition."""
    found = {}
    for key, offset in keyed.items():
        name, _, partition = key.rpartition(":")
        if topics.holds(name):
            found[TopicPartition(name, int(partition))] = int(offset)
    return found


class Catalog:
    """The collections of one alias in one engine (``CollectionStore``), with their cards."""

    def __init__(self, store: CollectionStore) -> None:
        self.store = store
        self.alias = store.alias

    def close(self) -> None:
        self.store.close()

    # --- reading ---------------------------------------------------------------------------

    def live(self) -> str | None:
        """The collection the alias names (None before the first start)."""
        return self.store.live_collection()

    def collections(self) -> list[str]:
        return self.store.collections()

    def name_of(self, model_version: str) -> str:
        return collection_name(self.alias, model_version)

    def card(self, collection: str) -> CollectionCard | None:
        """The collection's card, with the live ingest's latest point-count report."""
        raw = self.store.read_card(collection)
        if not raw:
            return None
        report = self.store.read_report(collection)
        if report:
            raw = {**raw, "points": report.get("points"), "points_offsets": report.get("offsets")}
        return CollectionCard.from_dict(raw)

    def open(self, model_version: str) -> Collection:
        """A handle on ``model_version``'s collection (its ``ensure_collection`` makes it)."""
        return self.store.open(model_version)

    # --- making collections: only here are cards made and the alias moved --------------------

    def serve_first(self, model: ModelCard, dims: Mapping[str, int]) -> Collection:
        """The configured model's collection, for a service that finds nothing live or finds it
        live already: made if missing, with a live card (written before the alias moves, so
        that no instance ever follows the alias to a collection without one), and live."""
        collection = self.name_of(model.model_version)
        index = self._made(model.model_version, dims)
        if self.card(collection) is None:
            self.write_card(collection, CollectionCard(model, "live"))
        if self.live() != collection:
            self.store.switch_alias(collection)
        return index

    def begin_build(
        self, model: ModelCard, dims: Mapping[str, int], vectors_topic: str | None = None
    ) -> Collection:
        """A reindex's collection: made if missing, not live, with a card that says it is being
        built (a card that says live: it switched, then crashed, and resumes as it is). A
        collection retired earlier and built again keeps the offsets it had applied.
        ``vectors_topic``: where the reindex publishes what it encodes (encode-once)."""
        collection = self.name_of(model.model_version)
        index = self._made(model.model_version, dims)
        card = self.card(collection)
        if card is None or card.state != "live":
            fresh = CollectionCard(model, vectors_topic=vectors_topic)
            if card is not None:
                fresh.applied_offsets = card.applied_offsets
            self.write_card(collection, fresh)
        return index

    def _made(self, model_version: str, dims: Mapping[str, int]) -> Collection:
        index = self.open(model_version)
        try:
            index.ensure_collection(dims)
        except BaseException:
            index.close()
            raise
        return index

    def describe(self) -> list[dict[str, object]]:
        """Every collection under the alias's prefix, with what its card says."""
        live = self.live()
        rows: list[dict[str, object]] = []
        for collection in self.collections():
            card = self.card(collection)
            rows.append(
                {
                    "collection": collection,
                    "live": collection == live,
                    "state": card.state if card else "unknown (no card)",
                    "model_version": card.model.model_version if card else None,
                    "points": card.points if card else None,
                    "drop_after": card.drop_after if card else None,
                }
            )
        return rows

    # --- changing --------------------------------------------------------------------------

    def write_card(self, collection: str, card: CollectionCard) -> None:
        self.store.write_card(collection, card.to_dict())

    def update_card(
        self, collection: str, change: Callable[[CollectionCard], None]
    ) -> CollectionCard | None:
        """Read, change and write a collection's card as one step (nothing if it has none)."""
        with self.store.card_lock():
            card = self.card(collection)
            if card is not None:
                change(card)
                self.write_card(collection, card)
            return card

    def switch(
        self, target: str, grace_s: float, applied: Mapping[TopicPartition, int] | None = None
    ) -> str | None:
        """Make ``target`` the live collection: its card says live (and, from a reindex, the
        offsets it has ``applied``), the one live before is retired for ``grace_s`` (a rollback
        can return to it), then the alias moves in one step. Returns the one live before."""
        live = self.live()

        def go_live(card: CollectionCard) -> None:
            card.state, card.retired_at, card.drop_after = "live", None, None
            for tp, offset in (applied or {}).items():
                card.applied_offsets[offset_key(tp.topic, tp.partition)] = int(offset)

        self.update_card(target, go_live)
        if live is not None and live != target:
            self.retire(live, grace_s)
        return self.store.switch_alias(target)

    def rollback(self, grace_s: float) -> tuple[str, str | None]:
        """Switch back to the most recently retired collection (its model too, for a service
        following the alias); the one that was live is retired in turn."""
        live = self.live()
        retired = []
        for collection in self.collections():
            card = self.card(collection)
            if collection != live and card is not None and card.state == "retired":
                retired.append((card.retired_at or 0.0, collection))
        if not retired:
            raise NothingToRollBack(
                "nothing to roll back to: no retired collection is left (none was replaced, or "
                "its grace period is over and it was dropped)"
            )
        _, target = max(retired)
        return target, self.switch(target, grace_s)

    def retire(self, collection: str, grace_s: float, now: float | None = None) -> None:
        """Mark a collection retired: kept for ``grace_s`` (a rollback can return to it), then a
        running service drops it."""
        at = time.time() if now is None else now

        def change(card: CollectionCard) -> None:
            card.state, card.retired_at, card.drop_after = "retired", at, at + grace_s

        self.update_card(collection, change)

    def drop_expired(self, keep: Iterable[str] = (), now: float | None = None) -> list[str]:
        """Drop every retired collection whose grace period is over (never the live one, nor one
        in ``keep``); a collection another process still has open is left for the next call."""
        now = time.time() if now is None else now
        kept = {self.live(), *keep}
        dropped = []
        for collection in self.collections():
            if collection in kept:
                continue
            card = self.card(collection)
            if card is None or card.state != "retired" or card.drop_after is None:
                continue
            if now < card.drop_after:
                continue
            try:
                if self.store.drop_collection(collection):
                    log.info("dropped %s: retired, its grace period is over", collection)
                    dropped.append(collection)
            except IndexUnavailable as exc:
                log.info("not dropping %s yet: %s", collection, exc)
        return dropped

    # --- how far each collection got (the ingest's records, for a hand-over) ---------------

    def record_applied(self, collection: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Record that ``collection`` has applied its source up to ``offsets``."""
        if not offsets:
            return

        def change(card: CollectionCard) -> None:
            for tp, offset in offsets.items():
                card.applied_offsets[offset_key(tp.topic, tp.partition)] = int(offset)

        self.update_card(collection, change)

    def report_points(
        self, collection: str, points: int, offsets: Mapping[TopicPartition, int]
    ) -> None:
        """The live ingest's report: its collection's point count right after committing
        ``offsets`` (by partition), for a reindex to compare with. A record of its own, so
        that the report never writes back a card another process is changing (a reindex
        retiring this collection); the offsets of partitions other instances own are kept."""
        with self.store.card_lock():
            known = dict((self.store.read_report(collection) or {}).get("offsets") or {})
            known.update({offset_key(tp.topic, tp.partition): int(o) for tp, o in offsets.items()})
            self.store.write_report(collection, {"points": points, "offsets": known})
