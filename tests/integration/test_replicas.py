"""Scaling search out without an index server: two `loupe serve` replicas, each with its own
embedded Qdrant Edge index, on a real broker. Each indexes every product (an ingest group of its
own), they share the search group, a replica that starts later answers only once its index has
caught up, and every request is answered exactly once, by one of them."""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest

from loupe.dev.catalog import load_catalog
from loupe.dev.drive import SearchLoad, loupe_process, serve_env
from loupe.dev.kafka import free_loopback_port
from tests.integration.processes import committed, send_products, service_topics, wait_for

pytestmark = pytest.mark.integration

PRODUCTS = 16
IDS = [f"p{i}" for i in range(PRODUCTS)]


def _metric(port: int, pattern: str) -> float:
    """The sum of the series of this replica's /metrics that match ``pattern`` (0 before it
    serves them)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(value) for value in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def _answered(port: int) -> float:
    """How many searches this replica answered."""
    return _metric(port, r'loupe_events_total\{[^}]*outcome="answered"[^}]*\}')


def _encoded(port: int) -> float:
    """How many products this replica's encode-once encoder encoded."""
    return _metric(port, r'loupe_events_total\{[^}]*outcome="encoded"[^}]*\}')


def _points(port: int) -> float:
    return _metric(port, "loupe_index_points")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:  # not listening yet, or 503 while loading or catching up
        return False


def _replicas(bootstrap: str, topics: dict[str, str], group: str, tmp_path, **settings: str):
    """``start(name)`` for replicas ``a`` and ``b`` (own state, metrics port and log), with
    their ports and logs; ``settings``: more LOUPE_* settings for both."""
    ports = {name: free_loopback_port() for name in ("a", "b")}
    logs = {name: tmp_path / f"{name}.log" for name in ports}

    def start(name: str):
        env = serve_env(
            bootstrap,
            topics,
            group=group,
            state_dir=tmp_path / name,
            metrics_port=ports[name],
            replica_id=name,
            max_poll_records="4",
            search_max_poll_records="4",
            **settings,
        )
        return loupe_process(["serve"], env, logs[name])

    return start, ports, logs


def test_replicas_each_index_every_product_and_answer_each_search_once(
    bootstrap_servers, make_topic, group_id, tmp_path
):
    catalog = load_catalog()[::14]  # one of every kind, so that titles tell products apart
    topics = service_topics(make_topic, requests=4)
    send_products(
        bootstrap_servers, topics["products"], catalog, [f"p{i}" for i in range(PRODUCTS)]
    )
    start, ports, logs = _replicas(bootstrap_servers, topics, group_id, tmp_path)

    titles = [product.title for product in catalog[:PRODUCTS]]
    procs = {"a": start("a")}
    try:
        wait_for(lambda: _ready(ports["a"]), "replica a ready", 240, [procs["a"]], [logs["a"]])
        with SearchLoad(
            bootstrap_servers,
            topics["requests"],
            topics["responses"],
            lambda n: {"text": titles[n % len(titles)], "top_k": 5},
            every_s=0.2,
        ) as shoppers:
            procs["b"] = start("b")  # joins while searches flow, with an empty index
            wait_for(
                lambda: _answered(ports["b"]) > 0,
                "replica b answering searches",
                240,
                procs.values(),
                logs.values(),
            )
            a_before = _answered(ports["a"])
            wait_for(lambda: _answered(ports["a"]) > a_before, "a still answering", 60)
            send_products(bootstrap_servers, topics["products"], catalog[PRODUCTS:], ["late"])
            for name in ports:
                wait_for(
                    lambda name=name: (
                        committed(bootstrap_servers, f"{group_id}.ingest.{name}") == PRODUCTS + 1
                    ),
                    f"replica {name} indexing the late product",
                    120,
                    procs.values(),
                    logs.values(),
                )
            shoppers.stop_sending()
            assert shoppers.wait_for_answers(120), "every search is answered"
            answers = {rid: [a for _, a in found] for rid, found in shoppers.answers.items()}
            sent = list(shoppers.sent)
        answered = {name: _answered(port) for name, port in ports.items()}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        exits = {name: proc.wait(timeout=60) for name, proc in procs.items()}
    assert exits == {"a": 0, "b": 0}, {name: logs[name].read_text()[-3000:] for name in procs}

    # Each replica indexed every product into its own index; no shared ingest group exists.
    assert committed(bootstrap_servers, f"{group_id}.ingest") == 0
    # Both served, and every request got exactly one answer, from a replica that had the
    # product asked for (a replica answering before it caught up would not have it).
    assert min(answered.values()) > 0, answered
    assert set(answers) == set(sent)
    assert all(len(found) == 1 for found in answers.values()), "one answer per request"
    for rid, [answer] in answers.items():
        asked = titles[int(rid[1:]) % len(titles)]
        assert answer["status"] == "ok", answer
        assert asked in [hit["title"] for hit in answer["hits"]], (asked, answer["hits"])
    # The later replica caught up first, then joined the search group.
    b_log = logs["b"].read_text()
    caught_up = b_log.index("replica b: caught up")
    assert caught_up < b_log.index("search consumer running"), b_log[-3000:]
    assert f"({PRODUCTS} points)" in b_log[caught_up : caught_up + 200]


def test_with_encode_once_every_replica_indexes_each_product_encoded_once(
    bootstrap_servers, make_topic, group_id, tmp_path
):
    """LOUPE_ENCODE_ONCE: the replicas share one encoders' group, each index is written from
    the vectors topic, and a replica that starts later catches up without encoding anything."""
    catalog = load_catalog()[::14]
    topics = service_topics(make_topic, requests=2)
    send_products(
        bootstrap_servers, topics["products"], catalog, [f"p{i}" for i in range(PRODUCTS)]
    )
    start, ports, logs = _replicas(
        bootstrap_servers,
        topics,
        group_id,
        tmp_path,
        encode_once="true",
        vectors_topic=topics["products"] + ".vectors",
    )

    titles = [product.title for product in catalog[:PRODUCTS]]
    procs = {"a": start("a")}
    try:
        wait_for(lambda: _ready(ports["a"]), "replica a ready", 240, [procs["a"]], [logs["a"]])
        assert _encoded(ports["a"]) == PRODUCTS
        procs["b"] = start("b")
        wait_for(lambda: _ready(ports["b"]), "replica b ready", 240, procs.values(), logs.values())
        assert _encoded(ports["b"]) == 0, "b caught up from the vectors topic, encoding nothing"
        send_products(bootstrap_servers, topics["products"], catalog[PRODUCTS:], ["late"])
        for name in ports:
            wait_for(
                lambda name=name: _points(ports[name]) == PRODUCTS + 1,
                f"replica {name} indexing the late product",
                120,
                procs.values(),
                logs.values(),
            )
        encoded = {name: _encoded(port) for name, port in ports.items()}
        with SearchLoad(
            bootstrap_servers,
            topics["requests"],
            topics["responses"],
            lambda n: {"text": titles[n % len(titles)], "top_k": 5},
            every_s=0.1,
        ) as shoppers:
            wait_for(lambda: len(shoppers.sent) >= 20, "20 searches sent", 60)
            shoppers.stop_sending()
            assert shoppers.wait_for_answers(120), "every search is answered"
            answers = {rid: [a for _, a in found] for rid, found in shoppers.answers.items()}
            sent = list(shoppers.sent)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        exits = {name: proc.wait(timeout=60) for name, proc in procs.items()}
    assert exits == {"a": 0, "b": 0}, {name: logs[name].read_text()[-3000:] for name in procs}
    # Each product encoded once in all (the late one by whichever replica owned its partition),
    # though both indexes hold every product.
    assert sum(encoded.values()) == PRODUCTS + 1, encoded
    assert set(answers) == set(sent)
    assert all(len(found) == 1 for found in answers.values()), "one answer per request"
    for rid, [answer] in answers.items():
        asked = titles[int(rid[1:]) % len(titles)]
        assert answer["status"] == "ok", answer
        assert asked in [hit["title"] for hit in answer["hits"]], (asked, answer["hits"])
    b_log = logs["b"].read_text()
    assert f"caught up ({PRODUCTS} points)" in b_log, b_log[-3000:]


def test_a_replicas_reindex_builds_from_the_vectors_topic_another_one_published(
    bootstrap_servers, make_topic, group_id, tmp_path
):
    """LOUPE_ENCODE_ONCE with replicas: replica a's reindex encodes the catalog and publishes
    the new collection's vectors; replica b's reindex to the same model builds its own index
    from that topic, encoding nothing, and leaves its index writers' group where its service
    goes on from."""
    from loupe.consumers.kafka.names import KafkaNames
    from loupe.consumers.service.reindex import Reindex, reads_vectors
    from loupe.consumers.settings import Settings

    catalog = load_catalog()[::14]
    topics = service_topics(make_topic)
    send_products(bootstrap_servers, topics["products"], catalog, IDS)

    def settings(replica: str) -> Settings:
        return Settings(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            replica_id=replica,
            state_dir=tmp_path / replica,
            products_topic=topics["products"],
            deadletter_topic=topics["deadletter"],
            search_requests_topic=topics["requests"],
            search_responses_topic=topics["responses"],
            encode_once=True,
            vectors_topic=topics["products"] + ".vectors",
        )

    outcomes, samples, said = {}, {}, {}
    for replica in ("a", "b"):
        lines: list[str] = []
        job = Reindex(settings(replica), report=lines.append, grace_s=0)
        outcomes[replica] = job.run()
        samples[replica] = job.metrics.registry.get_sample_value
        said[replica] = lines[0]
    a, b = outcomes["a"], outcomes["b"]
    assert a.collection == b.collection and a.switched and b.switched
    assert a.points == b.points == PRODUCTS
    encodes = {r: samples[r]("loupe_stage_seconds_count", {"stage": "encode"}) for r in "ab"}
    assert encodes["a"] > 0 and not encodes["b"], f"b encoded nothing: {encodes}"
    vectors_topic = KafkaNames.of(settings("b")).vectors_topic(b.collection)
    applied = samples["b"]("loupe_events_total", {"topic": vectors_topic, "outcome": "indexed"})
    assert applied == PRODUCTS, "b applied each product's vectors"
    assert "from the products topic" not in said["b"]
    assert f"building {b.collection} from {vectors_topic}, encoding nothing" in said["b"]
    assert f"from {topics['products']};" in said["a"]
    # b read the topic in its own reindex group (the operator's), to the topic's end.
    reindex_group = KafkaNames.of(settings("b")).reindex_group(b.collection)
    assert reindex_group.endswith(".b")
    assert committed(bootstrap_servers, reindex_group) == PRODUCTS
    # Run again (say after a kill), each goes on as it began: a encoding, b from the topic.
    again = {
        r: reads_vectors(Reindex(settings(r), report=print, grace_s=0).app, b.collection)[0]
        for r in "ab"
    }
    assert again == {"a": False, "b": True}
