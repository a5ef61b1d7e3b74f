"""Model versions over time: which collection is live, which model made each, and how a running
service follows a switch to another one.

Each collection carries a card (Qdrant collection metadata, or a file beside an embedded shard):
the model that made it, enough for any instance to load that model again; its state (building,
live, retired); the products-topic offsets up to which it has applied every event; and, once
retired, when it may be dropped. The alias names the live collection. ``loupe reindex`` builds
a collection and moves the alias (consumers/reindex.py); every ``loupe serve`` instance watches
the alias and follows it here, loading the model the card names, so that a query is always
encoded by the model of the collection it searches.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index import VectorIndex
from loupe.encoders.errors import ModelError
from loupe.encoders.profile import ModelProfile
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)

CARD_FORMAT = 1
State = Literal["building", "live", "retired"]


class ModelSwitchError(LoupeError):
    """The live collection needs a model this instance cannot load (or cannot identify)."""


@dataclass(frozen=True)
class ModelCard:
    """The part of a ``ModelProfile`` that decides the vectors: load it anywhere, get the same
    model version. How the model runs (device, precision, batch sizes) stays each instance's."""

    model_version: str
    image_backbone: str
    text_backbone: str
    image_weights: str | None
    text_weights: str | None
    fusion_checkpoint: str | None  # a path every instance must be able to read
    image_weight: float
    fit: str
    image_pooling: str
    max_text_tokens: int
    # None: the backbone's own input side (what every card before LOUPE_IMAGE_SIDE meant)
    image_side: int | None = None

    @classmethod
    def of(cls, profile: ModelProfile, model_version: str) -> ModelCard:
        return cls(
            model_version=model_version,
            image_backbone=profile.image_backbone,
            text_backbone=profile.text_backbone,
            image_weights=profile.image_weights,
            text_weights=profile.text_weights,
            fusion_checkpoint=(
                str(Path(profile.fusion_checkpoint).resolve())
                if profile.fusion_checkpoint
                else None
            ),
            image_weight=profile.image_weight,
            fit=profile.fit,
            image_pooling=profile.image_pooling,
            max_text_tokens=profile.max_text_tokens,
            image_side=profile.image_side,
        )

    def profile(self, local: ModelProfile) -> ModelProfile:
        """This model, run the way this instance runs models."""
        return dataclasses.replace(
            local,
            image_backbone=self.image_backbone,
            text_backbone=self.text_backbone,
            image_weights=self.image_weights,
            text_weights=self.text_weights,
            fusion_checkpoint=Path(self.fusion_checkpoint) if self.fusion_checkpoint else None,
            image_weight=self.image_weight,
            fit=self.fit,  # type: ignore[arg-type]
            image_pooling=self.image_pooling,  # type: ignore[arg-type]
            max_text_tokens=self.max_text_tokens,
            image_side=self.image_side,
        )


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

    def to_dict(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CollectionCard:
        if raw.get("format") != CARD_FORMAT:
            raise ModelSwitchError(f"unknown collection card format {raw.get('format')!r}")
        return cls(
            model=ModelCard(**raw["model"]),
            state=raw["state"],
            applied_offsets={str(k): int(v) for k, v in (raw.get("applied_offsets") or {}).items()},
            retired_at=raw.get("retired_at"),
            drop_after=raw.get("drop_after"),
            points=raw.get("points"),
            points_offsets={str(k): int(v) for k, v in (raw.get("points_offsets") or {}).items()},
        )


def read_card(index: VectorIndex, collection: str) -> CollectionCard | None:
    raw = index.read_card(collection)
    return CollectionCard.from_dict(raw) if raw else None


def write_card(index: VectorIndex, collection: str, card: CollectionCard) -> None:
    index.write_card(collection, card.to_dict())


def update_card(
    index: VectorIndex, collection: str, change: Callable[[CollectionCard], None]
) -> CollectionCard | None:
    """Read, change and write a collection's card as one step (nothing if it has none)."""
    with index.card_lock():
        card = read_card(index, collection)
        if card is not None:
            change(card)
            write_card(index, collection, card)
        return card


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def retire(index: VectorIndex, collection: str, grace_s: float, now: float | None = None) -> None:
    """Mark a collection retired: kept for ``grace_s`` (a rollback can return to it), then a
    running service drops it."""
    at = time.time() if now is None else now

    def change(card: CollectionCard) -> None:
        card.state, card.retired_at, card.drop_after = "retired", at, at + grace_s

    update_card(index, collection, change)


def report_points(index: VectorIndex, topic: str, points: int, offsets: Mapping[int, int]) -> None:
    """The live ingest's report: its collection's point count right after committing
    ``offsets`` (by partition), for a reindex to compare with."""

    def change(card: CollectionCard) -> None:
        card.points = points
        card.points_offsets.update({offset_key(topic, p): int(o) for p, o in offsets.items()})

    update_card(index, index.collection, change)


def drop_expired(catalog: VectorIndex, keep: Iterable[str], now: float | None = None) -> list[str]:
    """Drop every retired collection whose grace period is over (never the live one, nor one in
    ``keep``); a collection another process still has open is left for the next call."""
    now = time.time() if now is None else now
    live = catalog.live_collection()
    kept = {live, *keep}
    dropped = []
    for collection in catalog.collections():
        if collection in kept:
            continue
        card = read_card(catalog, collection)
        if card is None or card.state != "retired" or card.drop_after is None:
            continue
        if now < card.drop_after:
            continue
        try:
            if catalog.drop_collection(collection):
                log.info("dropped %s: retired, its grace period is over", collection)
                dropped.append(collection)
        except IndexUnavailable as exc:
            log.info("not dropping %s yet: %s", collection, exc)
    return dropped


@dataclass(frozen=True)
class ModelInUse:
    """An encoder and the collection its vectors live in: always used together."""

    encoder: Any  # FusedEncoder (not imported here: this module stays torch-free)
    index: VectorIndex
    generation: int = 0

    @property
    def collection(self) -> str:
        return self.index.collection


class LiveModel:
    """The model in use, shared by a service's workers. A switch publishes a new pair; each
    worker adopts it between two batches, so a batch never mixes models."""

    def __init__(self, in_use: ModelInUse) -> None:
        self._lock = threading.Lock()
        self._current = in_use
        self._adopted: dict[str, int] = {}

    def current(self) -> ModelInUse:
        with self._lock:
            return self._current

    def publish(self, encoder: Any, index: VectorIndex) -> ModelInUse:
        with self._lock:
            self._current = ModelInUse(encoder, index, self._current.generation + 1)
            return self._current

    def adopted(self, worker: str, generation: int) -> None:
        with self._lock:
            self._adopted[worker] = generation

    def adopted_by_all(self, workers: Iterable[str], generation: int) -> bool:
        with self._lock:
            return all(self._adopted.get(worker, -1) >= generation for worker in workers)


class ModelFollower:
    """Watches the alias; when it names another collection, loads that collection's model
    (from its card), publishes the pair to the workers, and closes the old pair once every
    worker has let go of it. Also drops retired collections whose grace period is over.

    Loading happens beside the workers, which keep serving the old pair (consistent: the old
    collection is kept for its grace period) until the new one is ready."""

    def __init__(
        self,
        *,
        catalog: VectorIndex,
        live: LiveModel,
        local_profile: ModelProfile,
        load_encoder: Callable[[ModelProfile], Any],
        workers: Iterable[str],
        poll_interval_s: float,
        on_switch: Callable[[ModelInUse, ModelInUse], None] = lambda old, new: None,
    ) -> None:
        self.catalog = catalog
        self.live = live
        self.local_profile = local_profile
        self.load_encoder = load_encoder
        self.workers = tuple(workers)
        self.poll_interval_s = poll_interval_s
        self.on_switch = on_switch
        self._retiring: list[ModelInUse] = []
        self._generation = live.current().generation

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval_s):
            self.check_once()

    def check_once(self) -> ModelInUse | None:
        """One look at the alias; returns the new pair if it switched."""
        switched = None
        try:
            live_collection = self.catalog.live_collection()
        except IndexUnavailable as exc:
            log.warning("cannot read the alias (%s); trying again", exc)
            return None
        current = self.live.current()
        if live_collection is not None and live_collection != current.collection:
            try:
                switched = self._switch_to(live_collection, current)
            except IndexUnavailable as exc:  # e.g. its shard still open elsewhere: next time
                log.warning("cannot open %s yet (%s); trying again", live_collection, exc)
        self._close_released()
        try:
            drop_expired(self.catalog, keep=[p.collection for p in self._retiring])
        except IndexUnavailable as exc:
            log.info("not dropping retired collections now: %s", exc)
        return switched

    def _switch_to(self, collection: str, current: ModelInUse) -> ModelInUse | None:
        log.info(
            "the alias now names %s (serving %s): loading its model", collection, current.collection
        )
        encoder, index = open_collection(
            self.catalog, collection, self.local_profile, self.load_encoder
        )
        new = self.live.publish(encoder, index)
        log.info(
            "model %s ready; the workers switch after their batch in flight", encoder.model_version
        )
        self._retiring.append(current)
        self.on_switch(current, new)
        return new

    def _close_released(self) -> None:
        generation = self.live.current().generation
        if self._retiring and self.live.adopted_by_all(self.workers, generation):
            for old in self._retiring:
                log.info("closing %s and its model: no worker uses them any more", old.collection)
                old.index.close()
                old.encoder.close()
            self._retiring = []

    def close(self) -> None:
        """Close pairs no worker uses any more (at shutdown, the workers have stopped)."""
        for old in self._retiring:
            old.index.close()
            old.encoder.close()
        self._retiring = []


def open_collection(
    catalog: VectorIndex,
    collection: str,
    local_profile: ModelProfile,
    load_encoder: Callable[[ModelProfile], Any],
) -> tuple[Any, VectorIndex]:
    """The model a collection's card names, loaded here, and the collection opened: raises
    ``ModelSwitchError`` when the card is missing or the model loaded is not the one named."""
    card = read_card(catalog, collection)
    if card is None:
        raise ModelSwitchError(
            f"the alias {catalog.alias} names {collection}, which has no model card: this "
            "instance cannot tell which model made its vectors (a collection from before Loupe "
            "0.3?); run `loupe reindex` to build one for the configured model"
        )
    try:
        encoder = load_encoder(card.model.profile(local_profile))
    except (LoupeError, ModelError) as exc:
        raise ModelSwitchError(
            f"cannot load model {card.model.model_version} that {collection} needs: {exc}"
        ) from exc
    if encoder.model_version != card.model.model_version:
        encoder.close()
        raise ModelSwitchError(
            f"{collection} was made by model {card.model.model_version}, but its card's "
            f"profile loads {encoder.model_version} here (a checkpoint file changed at "
            f"{card.model.fusion_checkpoint}?)"
        )
    encoder.warm_up()
    index = catalog.for_version(card.model.model_version)
    try:
        index.ensure_collection(encoder.dims, make_live=False)
    except BaseException:
        encoder.close()
        raise
    return encoder, index


def applied_offsets_of(card: CollectionCard | None, topic: str) -> dict[int, int]:
    """A card's applied offsets for one topic, by partition."""
    if card is None:
        return {}
    found = {}
    for key, offset in card.applied_offsets.items():
        name, _, partition = key.rpartition(":")
        if name == topic:
            found[int(partition)] = offset
    return found


def merge_applied_offsets(
    index: VectorIndex, collection: str, topic: str, offsets: Mapping[int, int]
) -> None:
    """Record that ``collection`` has applied ``topic`` up to ``offsets`` (by partition)."""
    if not offsets:
        return

    def change(card: CollectionCard) -> None:
        for partition, offset in offsets.items():
            card.applied_offsets[offset_key(topic, partition)] = int(offset)

    update_card(index, collection, change)
