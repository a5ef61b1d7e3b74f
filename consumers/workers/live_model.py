"""The model in use: one holder (``LiveModel``) of the encoder and the collection its vectors
live in, and how a running service follows the alias to another pair (``ModelFollower``).

``loupe reindex`` builds a collection and moves the alias (consumers/service/reindex.py, through
``Catalog.switch``); every ``loupe serve`` instance watches the alias and follows it here,
loading the model the collection's card names, so that a query is always encoded by the model
of the collection it searches. The workers adopt a new pair between two batches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index.catalog import Catalog
from loupe.consumers.index.interface import Collection
from loupe.encoders.errors import ModelError
from loupe.encoders.profile import ModelIdentity, ModelProfile
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)


class ModelSwitchError(LoupeError):
    """The live collection needs a model this instance cannot load (or cannot identify)."""


@dataclass(frozen=True)
class ModelInUse:
    """An encoder and the collection its vectors live in: always used together."""

    encoder: Any  # FusedEncoder (not imported here: this module stays torch-free)
    index: Collection
    generation: int = 0

    @property
    def collection(self) -> str:
        return self.index.collection

    @property
    def identity(self) -> ModelIdentity:
        """What a writer of the collection needs of the model: its version and view sizes."""
        return ModelIdentity(self.encoder.model_version, dict(self.encoder.dims))


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

    def publish(self, encoder: Any, index: Collection) -> ModelInUse:
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
        catalog: Catalog,
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
            live_collection = self.catalog.live()
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
            self.catalog.drop_expired(keep=[p.collection for p in self._retiring])
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
    catalog: Catalog,
    collection: str,
    local_profile: ModelProfile,
    load_encoder: Callable[[ModelProfile], Any],
) -> tuple[Any, Collection]:
    """The model a collection's card names, loaded here, and the collection opened: raises
    ``ModelSwitchError`` when the card is missing or the model loaded is not the one named."""
    card = catalog.card(collection)
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
            f"{card.model.recipe.get('fusion_checkpoint')}?)"
        )
    encoder.warm_up()
    index = catalog.open(card.model.model_version)
    try:
        index.ensure_collection(encoder.dims)
    except BaseException:
        encoder.close()
        raise
    return encoder, index
