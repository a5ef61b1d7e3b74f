"""``loupe reindex`` against a real broker, on the embedded index and on a real Qdrant server,
as a user runs it: a running ``loupe serve`` keeps answering searches and indexing new products
while the reindex builds the new model's collection, then follows the switch without a restart
(and, on the server, follows a ``--rollback`` back); and a reindex killed midway resumes to
exactly the result of one that was not."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from loupe.consumers.index.interface import IndexQuery, collection_name, point_id
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.service.app import build_catalog
from loupe.consumers.service.reindex_lock import reindex_lock
from loupe.consumers.settings import Settings
from loupe.dev.catalog import load_catalog
from loupe.dev.drive import SearchLoad, loupe_process, serve_env
from loupe.dev.kafka import has_read_all
from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.encoders.fusion import FusionModel, save_fusion
from loupe.encoders.preprocess import compose_product_text
from loupe.encoders.profile import ModelProfile
from loupe.schemas.search import SearchFilters
from tests.integration.processes import committed, send_products, service_topics, wait_for

pytestmark = pytest.mark.integration

INITIAL = 24  # products indexed under model A before the reindex


@pytest.fixture
def index_at(request, index_prefix):
    """``index_at(engine, name)``: the LOUPE_* index settings (lower-case names) of an index
    called ``name`` for this test: embedded (``edge``, ``qdrant-local``: under the state
    directory), or a collection prefix of its own on the session's Qdrant server."""

    def settings(engine: str, name: str = "main") -> dict[str, str]:
        if engine == "server":
            server = request.getfixturevalue("qdrant_server")
            return {**server.settings(), "index_prefix": f"{index_prefix}_{name}"}
        return {"index_engine": engine}

    return settings


@pytest.fixture(scope="module")
def model_a() -> FusedEncoder:
    encoder = FusedEncoder.from_profile(ModelProfile(batch_size=8))
    yield encoder
    encoder.close()


@pytest.fixture(scope="module")
def checkpoint_b(model_a, tmp_path_factory) -> Path:
    """Model B: model A's towers under a different, seeded fusion (every view changes)."""
    module = FusionModel(model_a.fusion.config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for head in (module.image_head, module.text_head):
            head.up.weight.copy_(torch.randn(head.up.weight.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("model-b") / "fusion-b.safetensors"
    save_fusion(module, path, base=model_a.base_version)
    return path


@pytest.fixture(scope="module")
def model_b(checkpoint_b) -> FusedEncoder:
    encoder = FusedEncoder.from_profile(ModelProfile(fusion_checkpoint=checkpoint_b, batch_size=8))
    yield encoder
    encoder.close()


@pytest.mark.parametrize(
    ("engine", "encode_once"),
    [("edge", False), ("server", False), ("edge", True)],
    ids=["edge", "server", "edge-encode-once"],
)
def test_reindex_switches_models_while_searches_and_products_keep_flowing(
    engine,
    encode_once,
    bootstrap_servers,
    make_topic,
    group_id,
    tmp_path,
    model_a,
    model_b,
    checkpoint_b,
    index_at,
):
    index_settings = index_at(engine)
    prefix = index_settings.get("index_prefix", "loupe")
    catalog = load_catalog()
    topics = service_topics(make_topic)
    state = tmp_path / "state"
    if encode_once:  # the products go through a vectors topic per collection (issue 25)
        index_settings = {
            **index_settings,
            "encode_once": "true",
            "vectors_topic": topics["products"] + ".vectors",
        }
    env_a = serve_env(
        bootstrap_servers,
        topics,
        group=group_id,
        state_dir=state,
        max_poll_records="8",
        alias_poll_interval_ms="300",
        search_max_poll_records="4",
        **index_settings,
    )
    settings = Settings(state_dir=state, group_id=group_id, **index_settings)
    collection_a = collection_name(prefix, model_a.model_version)
    collection_b = collection_name(prefix, model_b.model_version)

    def ingested(collection: str, products: int) -> bool:
        return _ingested(bootstrap_servers, settings, collection, products)

    initial = [f"p{i}" for i in range(INITIAL)]
    send_products(bootstrap_servers, topics["products"], catalog, initial)
    serve_log = tmp_path / "serve.log"
    service = loupe_process(["serve"], env_a, serve_log)
    searches = contextlib.ExitStack()
    try:
        wait_for(
            lambda: ingested(collection_a, INITIAL),
            "model A's ingest of the catalog",
            240,
            [service],
            [serve_log],
        )
        texts = [p.title for p in catalog[:12]]
        shopper = searches.enter_context(
            SearchLoad(
                bootstrap_servers,
                topics["requests"],
                topics["responses"],
                lambda n: {"text": texts[n % len(texts)], "top_k": 3},
                every_s=0.25,
            )
        )
        during: list[str] = []
        stop_products = threading.Event()

        def keep_sending_products() -> None:
            n = 0
            while not stop_products.wait(0.7):
                product_id = f"new{n}"
                send_products(bootstrap_servers, topics["products"], catalog[n:], [product_id])
                during.append(product_id)
                n += 1

        sender = threading.Thread(target=keep_sending_products, daemon=True)
        sender.start()

        reindex_log = tmp_path / "reindex.log"
        env_b = {**env_a, "LOUPE_FUSION_CHECKPOINT": str(checkpoint_b)}
        started = time.monotonic()
        job = loupe_process(
            ["reindex", "--grace-s", "3", "--metrics-port", "0"], env_b, reindex_log
        )
        assert job.wait(timeout=300) == 0, reindex_log.read_text()[-4000:]
        took = time.monotonic() - started
        output = reindex_log.read_text()
        assert f"switched: {prefix} -> {prefix}__" in output, output[-3000:]
        assert "events/s" in output, "progress lines are shown"

        # The service follows: its answers come from model B from some point on.
        wait_for(
            lambda: any(
                a["model_version"] == model_b.model_version for a in shopper.answered_since(0.0)
            ),
            "answers from model B",
            120,
            [service],
            [serve_log],
        )
        time.sleep(2.0)  # more products and searches under model B
        stop_products.set()
        sender.join()
        shopper.stop_sending()
        # The retired collection goes once its grace period is over.
        wait_for(
            lambda: collection_a not in _collections(settings),
            "model A's collection dropped after the grace period",
            60,
            [service],
            [serve_log],
        )
        assert shopper.wait_for_answers(120), "every search gets an answer"
        answers = {rid: [a for _, a in items] for rid, items in shopper.answers.items()}
        asked = {rid: texts[int(rid[1:]) % len(texts)] for rid in shopper.sent}
        products_during = list(during)
        wait_for(
            lambda: ingested(collection_b, INITIAL + len(products_during)),
            "the ingest of the products sent during the reindex",
            120,
            [service],
            [serve_log],
        )
    finally:
        searches.close()
        service.send_signal(signal.SIGTERM)
        exited = service.wait(timeout=60)
    assert exited == 0, serve_log.read_text()[-4000:]
    log_text = serve_log.read_text()
    assert "switching to " + collection_b in log_text

    # Every search answered once, with hits, by model A or model B, never a mix.
    assert set(answers) == set(asked), "every search gets an answer, none another's"
    assert all(len(a) == 1 for a in answers.values()), "exactly one answer each"
    versions = {a[0]["model_version"] for a in answers.values()}
    assert versions == {model_a.model_version, model_b.model_version}, versions
    encoders = {model_a.model_version: model_a, model_b.model_version: model_b}
    by_id = {f"p{i}": catalog[i % len(catalog)] for i in range(INITIAL)}
    by_id.update({pid: catalog[n % len(catalog)] for n, pid in enumerate(products_during)})
    mixed_would_differ = 0
    for rid, [answer] in answers.items():
        assert answer["status"] == "ok", answer
        assert answer["hits"], f"{rid} answered with no hits"
        # The top hit's score is the cosine between the query and the product under the SAME
        # model: recomputed here with each model, it matches the one that answered.
        top = answer["hits"][0]
        product = by_id[top["product_id"]]
        query = asked[rid]
        own = _text_cosine(encoders[answer["model_version"]], query, product)
        assert abs(top["score"] - own) < 2e-3, (rid, answer["model_version"], top["score"], own)
        other = next(e for v, e in encoders.items() if v != answer["model_version"])
        mixed = _text_cosine_mixed(encoders[answer["model_version"]], other, query, product)
        mixed_would_differ += abs(mixed - own) > 5e-3
    assert mixed_would_differ > len(answers) // 2, "the check could tell a mixed answer"

    # Model B's collection holds every product: the catalog and those sent during the reindex.
    catalog = build_catalog(settings)
    index = catalog.open(model_b.model_version)
    index.ensure_collection(model_b.dims)
    try:
        ids = [point_id("m", pid) for pid in initial + products_during]
        assert len(index.stored_versions(ids)) == len(ids), "a product is missing from B"
        assert index.count() == len(ids)
        assert catalog.live() == collection_b
    finally:
        index.close()
        catalog.close()
    # An instance restarted with the old configuration serves the live collection with the
    # model its card names: it neither moves the alias back nor mixes models.
    restart_log = tmp_path / "restart.log"
    restarted = loupe_process(["serve", "--role", "search"], env_a, restart_log)
    try:
        with SearchLoad(
            bootstrap_servers,
            topics["requests"],
            topics["responses"],
            lambda n: {"text": "gold ring"},
            every_s=600,
            prefix="late",
        ) as late:
            wait_for(lambda: late.sent, "the late search sent", 10)
            late.stop_sending()
            assert late.wait_for_answers(120), restart_log.read_text()[-3000:]
            [(_, answer)] = late.answers["late0"]
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0, restart_log.read_text()[-3000:]
    assert answer["status"] == "ok" and answer["model_version"] == model_b.model_version
    assert "serving that one with the model its card names" in restart_log.read_text()
    print(
        f"\nreindex of {INITIAL}+ products took {took:.1f} s; {len(answers)} searches answered "
        f"during and after it; {len(products_during)} products sent during it"
    )


def _ingested(bootstrap: str, settings: Settings, collection: str, products: int) -> bool:
    """Whether the service's ingest has applied ``products`` events to ``collection``: its
    committed offsets (with encode-once: the encoders', and the index writer's, which has read
    the collection's vectors topic to its end)."""
    names = KafkaNames.of(settings)
    if not settings.encode_once:
        return committed(bootstrap, names.ingest_group()) >= products
    encoded = committed(bootstrap, names.encode_group(collection)) >= products
    writers, topic = names.index_group(collection), names.vectors_topic(collection)
    return encoded and has_read_all(bootstrap, writers, topic)


def _collections(settings: Settings) -> list[str]:
    catalog = build_catalog(settings)
    try:
        return catalog.collections()
    finally:
        catalog.close()


def _product_input(product) -> EncodeInput:
    return EncodeInput(
        image=product.image_path.read_bytes(),
        media_type="image/jpeg",
        text=compose_product_text(product.title, product.attributes()),
    )


def _text_cosine(encoder: FusedEncoder, query: str, product) -> float:
    q = encoder.encode_queries([EncodeInput(text=query)])[0].vectors["text"]
    p = encoder.encode_products([_product_input(product)])[0].vectors["text"]
    return float(np.dot(q, p))


def _text_cosine_mixed(query_model, index_model, query: str, product) -> float:
    q = query_model.encode_queries([EncodeInput(text=query)])[0].vectors["text"]
    p = index_model.encode_products([_product_input(product)])[0].vectors["text"]
    return float(np.dot(q, p))


def _points(state: Path, version: str, ids: list[str], index: dict) -> dict[str, tuple]:
    settings = Settings(state_dir=state, **index)
    catalog = build_catalog(settings)
    index = catalog.open(version)
    index.ensure_collection({"image": 1280, "text": 384, "fused": 1664})
    try:
        assert len(index.stored_versions([point_id("m", pid) for pid in ids])) == len(ids)
        # Every point with its vectors and payload: one query that ranks them all.
        everything = IndexQuery(
            "text",
            np.ones(384, dtype=np.float32),
            top_k=1000,
            merchant_id=None,
            filters=SearchFilters(),
            with_vectors=("image", "text", "fused"),
        )
        found = {}
        for hit in index.search_batch([everything])[0]:
            payload = {k: v for k, v in hit.payload.items() if k != "indexed_at"}
            found[hit.id] = (payload, {k: np.round(v, 5) for k, v in hit.vectors.items()})
        return found
    finally:
        index.close()
        catalog.close()


# qdrant-client's local mode runs the server's code path (QdrantIndex) in-process: the server
# stands for both here, and the engine tests (tests/unit) hold local mode to the same answers.
@pytest.mark.parametrize("engine", ["edge", "server"])
def test_a_reindex_killed_midway_resumes_to_the_same_result(
    engine, bootstrap_servers, make_topic, group_id, tmp_path, model_b, checkpoint_b, index_at
):
    catalog = load_catalog()
    topics = service_topics(make_topic)
    ids = [f"p{i}" for i in range(40)]
    send_products(bootstrap_servers, topics["products"], catalog, ids)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    indexes = {whole: index_at(engine, "whole"), killed: index_at(engine, "killed")}
    prefix = indexes[killed].get("index_prefix", "loupe")
    collection_b = collection_name(prefix, model_b.model_version)

    def env(state: Path, group: str) -> dict[str, str]:
        return {
            **serve_env(
                bootstrap_servers,
                topics,
                group=group,
                state_dir=state,
                max_poll_records="4",
                **indexes[state],
            ),
            "LOUPE_FUSION_CHECKPOINT": str(checkpoint_b),
        }

    log_path = tmp_path / "reindex.log"
    args = ["reindex", "--metrics-port", "0"]
    assert loupe_process(args, env(whole, group_id + "-whole"), log_path).wait(timeout=300) == 0

    group = group_id + "-killed"
    reindex_group = f"{group}.reindex.{collection_b}"
    first = loupe_process(args, env(killed, group), log_path)
    wait_for(
        lambda: committed(bootstrap_servers, reindex_group) >= 8,
        "the reindex's first commits",
        240,
        [first],
        [log_path],
    )
    # Its /readyz says how far it is (the reindex serves its own metrics, as serve does).
    port = re.findall(r"progress metrics on http://[^:]+:(\d+)/metrics", log_path.read_text())[-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
        status = answer.read().decode()
    assert status.startswith(f"reindex {collection_b}: ") and "/40 events" in status, status
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert committed(bootstrap_servers, reindex_group) < len(ids), "killed midway"
    second = loupe_process(args, env(killed, group), log_path)
    assert second.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    output = log_path.read_text()
    prefixes = {index.get("index_prefix", "loupe") for index in indexes.values()}
    lines = [f"switched: {p} -> {collection_name(p, model_b.model_version)}" for p in prefixes]
    assert sum(output.count(line) for line in lines) == 2, "both runs switched"

    expected = _points(whole, model_b.model_version, ids, indexes[whole])
    resumed = _points(killed, model_b.model_version, ids, indexes[killed])
    assert len(expected) == len(ids)
    assert resumed.keys() == expected.keys()
    for key, (payload, vectors) in expected.items():
        assert resumed[key][0] == payload
        for view, vector in vectors.items():
            np.testing.assert_allclose(resumed[key][1][view], vector, atol=1e-4)


def test_two_reindexes_of_one_version_cannot_run_at_once(
    bootstrap_servers, make_topic, group_id, tmp_path, checkpoint_b, model_b
):
    topics = {
        name: make_topic(name) for name in ("products", "requests", "responses", "deadletter")
    }
    state = tmp_path / "state"
    env = {
        **serve_env(bootstrap_servers, topics, group=group_id, state_dir=state),
        "LOUPE_FUSION_CHECKPOINT": str(checkpoint_b),
    }
    log_path = tmp_path / "second.log"
    collection_b = collection_name("loupe", model_b.model_version)
    settings = Settings(state_dir=state, bootstrap_servers=bootstrap_servers)
    with reindex_lock(settings, collection_b):  # as a first reindex holds it
        second = loupe_process(["reindex", "--metrics-port", "0"], env, log_path)
        assert second.wait(timeout=120) == 2
    output = log_path.read_text()
    assert f"a reindex of {collection_b} is already running (pid " in output, output[-2000:]
    assert "Traceback" not in output


@pytest.mark.parametrize("encode_once", [False, True], ids=["direct", "encode-once"])
def test_a_service_on_a_server_follows_a_switch_and_a_rollback(
    encode_once,
    bootstrap_servers,
    make_topic,
    group_id,
    tmp_path,
    model_a,
    model_b,
    checkpoint_b,
    index_at,
):
    """On a real Qdrant server: `loupe reindex` moves the alias to model B's collection, and
    `loupe reindex --rollback` moves it back to model A's, which its grace period kept. The
    running service follows both moves by itself, every search is answered once, and a product
    sent after the rollback goes into A (with encode-once: A's encoders' and writers' groups
    resume where they left off)."""
    index = index_at("server")
    prefix = index["index_prefix"]
    topics = service_topics(make_topic)
    if encode_once:
        index = {**index, "encode_once": "true", "vectors_topic": topics["products"] + ".v"}
    state = tmp_path / "state"
    env_a = serve_env(
        bootstrap_servers,
        topics,
        group=group_id,
        state_dir=state,
        max_poll_records="8",
        alias_poll_interval_ms="300",
        **index,
    )
    env_b = {**env_a, "LOUPE_FUSION_CHECKPOINT": str(checkpoint_b)}
    ids = [f"p{i}" for i in range(12)]
    send_products(bootstrap_servers, topics["products"], load_catalog(), ids)
    serve_log = tmp_path / "serve.log"
    service = loupe_process(["serve"], env_a, serve_log)
    versions = (model_a.model_version, model_b.model_version)
    settings = Settings(state_dir=state, group_id=group_id, **index)
    collection_a = collection_name(prefix, versions[0])

    def ingested_into_a(products: int) -> bool:
        return _ingested(bootstrap_servers, settings, collection_a, products)

    try:
        wait_for(
            lambda: ingested_into_a(len(ids)),
            "model A's ingest",
            240,
            [service],
            [serve_log],
        )
        with SearchLoad(
            bootstrap_servers,
            topics["requests"],
            topics["responses"],
            lambda n: {"text": "gold ring", "top_k": 3},
            every_s=0.3,
        ) as shopper:
            log_path = tmp_path / "reindex.log"
            job = loupe_process(
                ["reindex", "--grace-s", "600", "--metrics-port", "0"], env_b, log_path
            )
            assert job.wait(timeout=300) == 0, log_path.read_text()[-4000:]
            switched = time.monotonic()
            wait_for(
                lambda: any(
                    a["model_version"] == versions[1] for a in shopper.answered_since(switched)
                ),
                "answers from model B",
                120,
                [service],
                [serve_log],
            )
            rollback = loupe_process(["reindex", "--rollback"], env_a, log_path)
            assert rollback.wait(timeout=120) == 0, log_path.read_text()[-4000:]
            rolled_back = time.monotonic()
            wait_for(
                lambda: any(
                    a["model_version"] == versions[0] for a in shopper.answered_since(rolled_back)
                ),
                "answers from model A again",
                120,
                [service],
                [serve_log],
            )
            send_products(bootstrap_servers, topics["products"], load_catalog()[5:], ["after"])
            wait_for(
                lambda: ingested_into_a(len(ids) + 1),
                "the product sent after the rollback, in A",
                120,
                [service],
                [serve_log],
            )
            time.sleep(1.0)
            shopper.stop_sending()
            assert shopper.wait_for_answers(120), "every search gets an answer"
            answers = {rid: [a for _, a in items] for rid, items in shopper.answers.items()}
    finally:
        service.send_signal(signal.SIGTERM)
        exited = service.wait(timeout=60)
    assert exited == 0, serve_log.read_text()[-4000:]
    assert all(len(items) == 1 for items in answers.values()), "exactly one answer each"
    assert {items[0]["model_version"] for items in answers.values()} == set(versions)
    catalog = build_catalog(settings)
    collection = catalog.open(versions[0])
    try:
        assert catalog.live() == collection_a
        assert collection_name(prefix, versions[1]) in catalog.collections(), "B is kept"
        wanted = [point_id("m", pid) for pid in [*ids, "after"]]
        assert len(collection.stored_versions(wanted)) == len(wanted), "A has every product"
    finally:
        collection.close()
        catalog.close()
    log_text = serve_log.read_text()
    assert log_text.count("switching to ") >= 2, "the service followed both moves"
    assert "HTTP Request" not in log_text, "httpx's request lines stay out of the log"


def test_with_a_shared_server_a_live_reindex_group_refuses_a_second_reindex(
    bootstrap_servers, make_topic, group_id, tmp_path, qdrant_server, monkeypatch
):
    """On a shared index server the lock file is only this machine's: a reindex running
    elsewhere shows as members in the reindex's consumer group, and that refuses this one."""
    from kafka import KafkaConsumer

    from loupe.consumers.service import reindex_lock as reindex_module
    from loupe.consumers.service.reindex_lock import ReindexBusy

    topic = make_topic("products")
    settings = Settings(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        products_topic=topic,
        state_dir=tmp_path,
        **qdrant_server.settings(),
    )
    collection = "loupe__elsewhere"
    with reindex_lock(settings, collection):  # nobody in the group: this one may run
        pass
    elsewhere = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=KafkaNames.of(settings).reindex_group(collection),
    )
    try:
        wait_for(lambda: bool(elsewhere.poll(timeout_ms=200) or elsewhere.assignment()), "join", 30)
        monkeypatch.setattr(reindex_module, "MEMBERS_EXPIRE_S", 3.0)  # a live member stays
        busy = pytest.raises(ReindexBusy, match="still has 1 member")
        with busy, reindex_lock(settings, collection):
            pass
    finally:
        elsewhere.close()


def test_collections_prune_deletes_what_kafka_keeps_of_dropped_collections(
    bootstrap_servers, make_topic, group_id, tmp_path, monkeypatch, capsys
):
    """`loupe collections --prune`: the vectors topic and groups of a collection the index no
    longer holds go; those of a collection it holds stay, and so does a dropped collection's
    that a consumer still reads (another replica on that model)."""
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from loupe.cli import main
    from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec
    from loupe.consumers.service.reindex import kafka_leftovers

    products = make_topic("products")
    settings = Settings(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        products_topic=products,
        state_dir=tmp_path,
        encode_once=True,
        vectors_topic=products + ".vectors",
    )
    names = KafkaNames.of(settings)
    catalog = build_catalog(settings)
    held = catalog.name_of("held")
    catalog.open("held").ensure_collection({"image": 4, "text": 4, "fused": 8})
    catalog.close()
    gone, busy = f"{settings.index_prefix}__gone", f"{settings.index_prefix}__busy"
    with KafkaAdmin({"bootstrap_servers": bootstrap_servers}) as admin:
        admin.create_missing([TopicSpec(names.vectors_topic(c), 1, 1) for c in (held, gone, busy)])

    def commit(group: str, collection: str) -> None:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group)
        consumer.commit(
            {TopicPartition(names.vectors_topic(collection), 0): OffsetAndMetadata(0, "", -1)}
        )
        consumer.close()

    commit(names.encode_group(held), held)
    commit(names.reindex_group(held), held)
    commit(names.encode_group(gone), gone)
    commit(names.index_group(gone) + ".b", gone)  # a replica's
    reader = KafkaConsumer(
        names.vectors_topic(busy),
        bootstrap_servers=bootstrap_servers,
        group_id=names.index_group(busy),
    )
    try:
        wait_for(lambda: bool(reader.poll(timeout_ms=200) or reader.assignment()), "join", 30)
        found = kafka_leftovers(settings, delete=False)
        assert found.topics == [names.vectors_topic(gone)]
        assert found.groups == sorted([names.encode_group(gone), names.index_group(gone) + ".b"])
        assert found.busy == [names.index_group(busy), names.vectors_topic(busy)]
        for name, value in {
            "LOUPE_BOOTSTRAP_SERVERS": bootstrap_servers,
            "LOUPE_GROUP_ID": group_id,
            "LOUPE_PRODUCTS_TOPIC": products,
            "LOUPE_STATE_DIR": str(tmp_path),
            "LOUPE_ENCODE_ONCE": "true",
            "LOUPE_VECTORS_TOPIC": products + ".vectors",
        }.items():
            monkeypatch.setenv(name, value)
        assert main(["collections", "--prune"]) == 0
        said = capsys.readouterr().out
        assert f"deleted topic {names.vectors_topic(gone)}" in said
        assert f"kept {names.index_group(busy)}: a consumer still reads it" in said
    finally:
        reader.close()
    with KafkaAdmin({"bootstrap_servers": bootstrap_servers}) as admin:
        wait_for(lambda: names.vectors_topic(gone) not in admin.topics(), "the topic deleted", 30)
        topics, groups = admin.topics(), admin.groups()
    assert {names.vectors_topic(held), names.vectors_topic(busy)} <= topics
    assert {names.encode_group(held), names.reindex_group(held)} <= groups
    assert not {names.encode_group(gone), names.index_group(gone) + ".b"} & groups
    # Once its reader has left, the busy one is a leftover like the others.
    again = kafka_leftovers(settings, delete=False)
    assert (again.topics, again.groups, again.busy) == (
        [names.vectors_topic(busy)],
        [names.index_group(busy)],
        [],
    )
