"""The lifecycle of collections: the alias, cards, retirement and drops on both embedded engines
and a real Qdrant server (the same tests; the server's cases are marked integration),
following a switch, rollback, the count check and the ingest's hand-over."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from loupe.consumers.errors import ConfigError, IndexUnavailable
from loupe.consumers.index.catalog import Catalog, CollectionCard, ModelCard, NothingToRollBack
from loupe.consumers.index.edge import EdgeStore
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.reindex import Reindex, rollback
from loupe.consumers.service.reindex_lock import ReindexBusy, reindex_lock
from loupe.consumers.service.reindex_progress import counts_agree
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.handover import HandOver
from loupe.consumers.workers.ingest import IngestWorker
from loupe.consumers.workers.live_model import (
    LiveModel,
    ModelFollower,
    ModelInUse,
    ModelSwitchError,
)
from loupe.consumers.workers.product_stage import ProductStage
from loupe.encoders.profile import ModelProfile
from tests.fakes import FakeConsumer

DIMS = {"image": 8, "text": 4, "fused": 12}


def _card(version: str, state="live", image_weight=0.5, **fields) -> CollectionCard:
    profile = ModelProfile(image_weight=image_weight)
    return CollectionCard(ModelCard.of(profile, version), state, **fields)


@pytest.fixture(
    params=["edge", "qdrant-local", pytest.param("server", marks=pytest.mark.integration)]
)
def catalog(request, tmp_path, index_engines):
    catalog = Catalog(index_engines.store(request.param, str(tmp_path / "index")))
    yield catalog
    catalog.close()


def _collection(catalog, version: str, make_live: bool, card: CollectionCard | None = None):
    index = catalog.open(version)
    index.ensure_collection(DIMS)
    if make_live:
        catalog.store.switch_alias(index.collection)
    if card is not None:
        catalog.write_card(index.collection, card)
    return index


def test_only_the_catalog_makes_a_collection_live_and_always_with_its_card(catalog):
    model_a, model_b = _card("a").model, _card("b").model
    a = catalog.open("a")
    a.ensure_collection(DIMS)
    assert catalog.live() is None, "an engine makes a collection, never moves the alias"
    a.close()

    a = catalog.serve_first(model_a, DIMS)  # a first start
    assert catalog.live() == a.collection
    assert (catalog.card(a.collection).state, catalog.card(a.collection).model) == ("live", model_a)
    catalog.record_applied(a.collection, {TopicPartition("t", 0): 9})
    a.close()  # an embedded shard opens once at a time
    a = catalog.serve_first(model_a, DIMS)  # a restart: its card is kept
    assert catalog.card(a.collection).applied_offsets == {"t:0": 9}

    b = catalog.begin_build(model_b, DIMS, vectors_topic="v.loupe__b")
    assert catalog.live() == a.collection, "built aside"
    card = catalog.card(b.collection)
    assert (card.state, card.vectors_topic, card.model) == ("building", "v.loupe__b", model_b)
    catalog.switch(b.collection, 60.0, {TopicPartition("t", 0): 12})
    b.close()
    catalog.begin_build(model_b, DIMS).close()  # switched, then crashed: resumes as it is
    assert catalog.card(b.collection).state == "live"
    assert catalog.card(b.collection).applied_offsets == {"t:0": 12}
    catalog.rollback(60.0)  # b retired, then built again: its applied offsets stay
    catalog.begin_build(model_b, DIMS).close()
    card = catalog.card(b.collection)
    assert (card.state, card.applied_offsets) == ("building", {"t:0": 12})
    a.close()


def test_the_alias_moves_only_when_asked_and_in_one_step(catalog):
    a = _collection(catalog, "a", make_live=True)
    b = _collection(catalog, "b", make_live=False)
    assert catalog.live() == a.collection, "a collection built aside is not live"
    assert catalog.collections() == sorted([a.collection, b.collection])
    assert catalog.store.switch_alias(b.collection) == a.collection
    assert catalog.live() == b.collection
    assert catalog.store.switch_alias(b.collection) == b.collection  # idempotent
    for index in (a, b):
        index.close()


def test_cards_round_trip_and_belong_to_their_collection(catalog):
    a = _collection(catalog, "a", make_live=True, card=_card("a", applied_offsets={"t:0": 7}))
    b = _collection(catalog, "b", make_live=False)
    assert catalog.card(a.collection) == _card("a", applied_offsets={"t:0": 7})
    assert catalog.card(b.collection) is None
    catalog.retire(a.collection, grace_s=60, now=1000.0)
    card = catalog.card(a.collection)
    assert (card.state, card.retired_at, card.drop_after) == ("retired", 1000.0, 1060.0)
    assert card.applied_offsets == {"t:0": 7}, "retiring keeps what the card knew"
    for index in (a, b):
        index.close()


def test_retired_collections_go_after_their_grace_never_the_live_one(catalog):
    a = _collection(catalog, "a", make_live=False, card=_card("a"))
    b = _collection(catalog, "b", make_live=True, card=_card("b"))
    c = _collection(catalog, "c", make_live=False, card=_card("c"))
    a.close()
    c.close()
    catalog.retire(a.collection, grace_s=10, now=1000.0)
    catalog.retire(c.collection, grace_s=100, now=1000.0)
    catalog.retire(b.collection, grace_s=0, now=1000.0)  # odd, but the live one stays
    assert catalog.drop_expired(keep=[], now=1005.0) == []
    assert catalog.drop_expired(keep=[a.collection], now=1011.0) == [], "in use here: kept"
    assert catalog.drop_expired(keep=[], now=1011.0) == [a.collection]
    assert catalog.collections() == sorted([b.collection, c.collection])
    assert catalog.card(a.collection) is None
    with pytest.raises(ValueError, match=f"the alias {catalog.alias} points at it"):
        catalog.store.drop_collection(b.collection)
    b.close()


def test_an_embedded_shard_another_process_has_open_is_not_dropped(tmp_path):
    catalog = Catalog(EdgeStore(path=str(tmp_path)))
    a = _collection(catalog, "a", make_live=False, card=_card("a", state="retired"))
    a.close()
    _collection(catalog, "b", make_live=True).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from loupe.consumers.index.edge import EdgeIndex
                index = EdgeIndex(model_version="a", path={str(tmp_path)!r})
                index.ensure_collection({DIMS!r})
                print("open", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(IndexUnavailable, match="another process has it open"):
            catalog.store.drop_collection(a.collection)
        assert a.collection in catalog.collections()
    finally:
        holder.kill()
        holder.wait()
    assert catalog.store.drop_collection(a.collection)
    assert a.collection not in catalog.collections()


@dataclass
class FakeEncoder:
    model_version: str
    dims: dict = field(default_factory=lambda: dict(DIMS))
    closed: bool = False

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _load_by_weight(profile: ModelProfile) -> FakeEncoder:
    return FakeEncoder(f"v{profile.image_weight}")


def test_a_follower_loads_the_model_the_live_card_names_and_releases_the_old_one(catalog):
    a = _collection(catalog, "v0.5", make_live=True, card=_card("v0.5", image_weight=0.5))
    _collection(catalog, "v0.7", make_live=False, card=_card("v0.7", image_weight=0.7)).close()
    old_encoder = FakeEncoder("v0.5")
    live = LiveModel(ModelInUse(old_encoder, a))
    switches = []
    follower = ModelFollower(
        catalog=catalog,
        live=live,
        local_profile=ModelProfile(),
        load_encoder=_load_by_weight,
        workers=["ingest", "search"],
        poll_interval_s=0.1,
        on_switch=lambda old, new: switches.append((old.collection, new.collection)),
    )
    assert follower.check_once() is None, "the alias has not moved"
    catalog.store.switch_alias(catalog.name_of("v0.7"))
    new = follower.check_once()
    assert new.encoder.model_version == "v0.7" and new.generation == 1
    assert new.collection == catalog.name_of("v0.7")
    assert switches == [(a.collection, new.collection)]
    live.adopted("ingest", 1)
    follower.check_once()
    assert not old_encoder.closed, "a worker may still use the old pair"
    live.adopted("search", 1)
    follower.check_once()
    assert old_encoder.closed
    follower.close()
    new.index.close()
    new.encoder.close()


def test_a_card_that_loads_another_model_or_no_card_is_refused(catalog):
    a = _collection(catalog, "v0.5", make_live=True, card=_card("v0.5", image_weight=0.5))
    # The card says v0.9, but its profile loads v0.3 here (a checkpoint file that changed).
    _collection(catalog, "v0.9", make_live=False, card=_card("v0.9", image_weight=0.3)).close()
    _collection(catalog, "bare", make_live=False).close()
    follower = ModelFollower(
        catalog=catalog,
        live=LiveModel(ModelInUse(FakeEncoder("v0.5"), a)),
        local_profile=ModelProfile(),
        load_encoder=_load_by_weight,
        workers=["search"],
        poll_interval_s=0.1,
    )
    catalog.store.switch_alias(catalog.name_of("v0.9"))
    with pytest.raises(ModelSwitchError, match=r"was made by model v0\.9, but .* loads v0\.3"):
        follower.check_once()
    catalog.store.switch_alias(catalog.name_of("bare"))
    with pytest.raises(ModelSwitchError, match="has no model card"):
        follower.check_once()
    a.close()


def test_rollback_returns_to_the_last_retired_collection(tmp_path):
    settings = Settings(state_dir=tmp_path)
    catalog = Catalog(EdgeStore(path=str(settings.resolved_index_path())))
    with pytest.raises(NothingToRollBack):
        rollback(settings, grace_s=60)
    for version, state in (("a", "retired"), ("b", "retired"), ("c", "live")):
        _collection(catalog, version, make_live=state == "live", card=_card(version, state)).close()
    catalog.retire(catalog.name_of("a"), grace_s=60, now=1000.0)
    catalog.retire(catalog.name_of("b"), grace_s=60, now=2000.0)
    target, replaced = rollback(settings, grace_s=30)
    assert (target, replaced) == (catalog.name_of("b"), "loupe__c")
    assert catalog.live() == "loupe__b"
    assert catalog.card("loupe__b").state == "live"
    replaced_card = catalog.card("loupe__c")
    assert replaced_card.state == "retired"
    assert replaced_card.drop_after == pytest.approx(time.time() + 30, abs=5)
    assert rollback(settings, grace_s=30) == ("loupe__c", "loupe__b"), "and back again"


def test_one_reindex_per_collection(tmp_path):
    settings = Settings(state_dir=tmp_path)
    with reindex_lock(settings, "loupe__x"):
        with (
            pytest.raises(ReindexBusy, match=r"already running \(pid \d+"),
            reindex_lock(settings, "loupe__x"),
        ):
            pass
        with reindex_lock(settings, "loupe__y"):  # another version may run beside it
            pass
    with reindex_lock(settings, "loupe__x"):  # released
        pass


def _applied(positions: dict[int, int]) -> dict[TopicPartition, int]:
    return {TopicPartition("t", p): o for p, o in positions.items()}


@pytest.mark.parametrize(
    ("mine", "points", "reported", "reported_offsets", "allowed", "agree"),
    [
        ({0: 10, 1: 10}, 20, 20, {"t:0": 10, "t:1": 10}, 0, True),
        ({0: 10, 1: 10}, 19, 20, {"t:0": 10, "t:1": 10}, 0, False),  # one lost: no switch
        ({0: 10, 1: 10}, 19, 20, {"t:0": 10, "t:1": 10}, 1, True),  # unless allowed
        ({0: 12, 1: 10}, 22, 20, {"t:0": 10, "t:1": 10}, 0, True),  # two events the live lacks
        ({0: 12, 1: 10}, 23, 20, {"t:0": 10, "t:1": 10}, 0, False),  # more than events explain
        ({0: 10, 1: 10}, 20, 15, {"t:0": 10}, 0, True),  # partition 1 unreported: from 0
    ],
)
def test_counts_agree_within_what_events_in_between_explain(
    tmp_path, mine, points, reported, reported_offsets, allowed, agree
):
    catalog = Catalog(EdgeStore(path=str(tmp_path)))
    live = _collection(
        catalog, "a", True, card=_card("a", points=reported, points_offsets=reported_offsets)
    )
    live.close()
    ok, detail = counts_agree(catalog, live.collection, points, _applied(mine), allowed)
    assert ok is agree, detail
    assert f"{points} points here, {reported} in {live.collection}" in detail


def test_counts_are_not_compared_without_a_live_collection_or_its_report(tmp_path):
    catalog = Catalog(EdgeStore(path=str(tmp_path)))
    assert counts_agree(catalog, None, 5, _applied({0: 5}), 0)[0]
    _collection(catalog, "a", True, card=_card("a")).close()
    ok, detail = counts_agree(catalog, "loupe__a", 5, _applied({0: 5}), 0)
    assert ok and "reported no count" in detail


class _Publisher:
    def __init__(self) -> None:
        self.commits: list[dict] = []

    def commit(self, offsets, consumer) -> None:
        self.commits.append(offsets)


def test_the_ingest_resumes_a_partition_from_the_new_collections_offsets(tmp_path):
    catalog = Catalog(EdgeStore(path=str(tmp_path)))
    b = _collection(catalog, "b", True, card=_card("b", applied_offsets={"t:0": 40, "t:1": 50}))
    tp = [TopicPartition("t", p) for p in range(4)]
    consumer = FakeConsumer(
        begin=3,
        committed={
            tp[0]: OffsetAndMetadata(45, "loupe__a", -1),  # went on in A past B's 40: rewind
            tp[1]: OffsetAndMetadata(48, "loupe__a", -1),  # behind B's 50: no rewind needed
            tp[2]: OffsetAndMetadata(9, "loupe__b", -1),  # already B's own progress
            tp[3]: OffsetAndMetadata(20, "loupe__a", -1),  # B's card does not know it: replay
        },
    )
    publisher = _Publisher()
    indexer = IngestWorker(
        WorkerBasics(
            publisher=publisher,
            live=LiveModel(ModelInUse(FakeEncoder("b"), b)),
            metrics=LoupeMetrics(),
        ),
        consumer=consumer,
        stage=ProductStage(
            fetcher=None, publisher=publisher, metrics=LoupeMetrics(), source=ProductsTopics("t")
        ),
        topic=ProductsTopics("t"),
        hand_over=HandOver(catalog, ProductsTopics("t"), report_every_s=1.0),
    )
    indexer.on_assigned(set(tp))
    records = [_Record("t", 0, 45), _Record("t", 1, 48), _Record("t", 3, 20)]
    kept = indexer.after_poll(records)
    assert consumer.seeks == {tp[0]: 40, tp[3]: 3}
    assert kept == [records[1]], "records of rewound partitions are read again, in order"
    assert publisher.commits == [
        {tp[0]: OffsetAndMetadata(40, "loupe__b", -1), tp[3]: OffsetAndMetadata(3, "loupe__b", -1)}
    ], "the hand-over is committed at once, naming the new collection"
    assert indexer.commit_metadata() == "loupe__b"
    assert indexer.after_poll(records) == records, "checked once per assignment"
    indexer.stage.close()
    b.close()


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int


def test_a_switch_makes_the_target_live_with_its_offsets_and_retires_the_old_one(catalog):
    _collection(catalog, "a", make_live=True, card=_card("a")).close()
    _collection(catalog, "b", make_live=False, card=_card("b", state="building")).close()
    before = time.time()
    previous = catalog.switch(
        catalog.name_of("b"), grace_s=60, applied={TopicPartition("t", 0): 12}
    )
    assert previous == catalog.name_of("a") and catalog.live() == catalog.name_of("b")
    new, old = catalog.card(catalog.name_of("b")), catalog.card(catalog.name_of("a"))
    assert (new.state, new.applied_offsets, new.drop_after) == ("live", {"t:0": 12}, None)
    assert old.state == "retired" and old.drop_after >= before + 60
    assert catalog.switch(catalog.name_of("b"), grace_s=60) == catalog.name_of("b"), "idempotent"
    assert catalog.card(catalog.name_of("b")).state == "live"


def test_building_from_a_vectors_topic_without_encode_once_is_refused_with_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="LOUPE_ENCODE_ONCE=true"):
        Reindex(Settings(state_dir=tmp_path), report=print, grace_s=0, from_vectors=True)
