"""Least privilege, proven on a broker that allows nothing else: SASL_SSL with SCRAM-SHA-512,
TLS certificates made here, the KRaft ``StandardAuthorizer`` with
``allow.everyone.if.no.acl.found=false``. Loupe's three principals get exactly the ACLs that
``loupe acls`` prints (and deploy/README.md lists), and run the whole service through it:
topics created, products upserted, updated and deleted with encode-once and transactions on,
searches answered (one on a reply topic of the app's), a reindex. A wrong password, and a
principal lacking an ACL, stop at once with one line that says what to fix; no secret reaches
a log, at ``-v`` too."""

from __future__ import annotations

import base64
import json
import signal
import time
import uuid
from datetime import UTC, datetime

import pytest
from kafka import KafkaConsumer, KafkaProducer

from loupe.consumers.kafka.acls import PRINCIPALS, required_acls
from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec
from loupe.consumers.settings import Settings
from loupe.dev.catalog import load_catalog
from loupe.dev.drive import loupe_process
from loupe.dev.kafka import BrokerSecurity, LocalKafkaBroker
from loupe.dev.tls import make_certificates
from tests.integration.processes import wait_for

pytestmark = pytest.mark.integration

# Each mode's users, and one given the search ACLs less one: what an operator who forgot a
# line gets.
SHORT_OF_ONE = "search-short"
MERCHANTS = ("shop-a", "shop-b")  # per-merchant topics: each merchant's system a user
MODES = ("direct", "once", "tenant")
USERS = [f"{p}-{mode}" for p in PRINCIPALS for mode in MODES] + [SHORT_OF_ONE, *MERCHANTS]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """The secured broker, its bootstrap address, and the passwords of Loupe's principals."""
    root = tmp_path_factory.mktemp("secure-kafka")
    users = {user: f"pw-{user}-{uuid.uuid4().hex}" for user in USERS}
    security = BrokerSecurity(make_certificates(root / "certs"), users=users)
    broker = LocalKafkaBroker(state_dir=root / "broker", security=security, die_with_parent=True)
    state = broker.start()
    try:
        yield broker, state.bootstrap_servers, security
    finally:
        broker.stop()


def _env(secure, user: str, password: str | None = None, **settings: str) -> dict[str, str]:
    """A `loupe` process's environment as ``user`` (its own password unless one is given)."""
    import os

    _, bootstrap, security = secure
    env = {
        **os.environ,
        "LOUPE_BOOTSTRAP_SERVERS": bootstrap,
        "LOUPE_SECURITY_PROTOCOL": "SASL_SSL",
        "LOUPE_SASL_MECHANISM": "SCRAM-SHA-512",
        "LOUPE_SASL_PLAIN_USERNAME": user,
        "LOUPE_SASL_PLAIN_PASSWORD": password or security.users[user],
        "LOUPE_SSL_CAFILE": str(security.certificates.ca),
    }
    env.update({f"LOUPE_{name.upper()}": value for name, value in settings.items()})
    return env


def _admin(secure) -> dict:
    broker, bootstrap, _ = secure
    return broker.client_config(bootstrap)


def _upserted(product, product_id: str, title: str | None = None, merchant: str = "m") -> dict:
    return {
        "type": "product.upserted",
        "event_id": uuid.uuid4().hex,
        "occurred_at": datetime.now(UTC).isoformat(),
        "merchant_id": merchant,
        "product_id": product_id,
        "title": title or product.title,
        "attributes": product.attributes(),
        "image": {
            "data": base64.b64encode(product.image_path.read_bytes()).decode(),
            "media_type": "image/jpeg",
        },
    }


def _send(secure, topic: str, bodies: list[dict], key) -> None:
    producer = KafkaProducer(**_admin(secure))
    for body in bodies:
        producer.send(topic, key=key(body).encode(), value=json.dumps(body).encode())
    producer.flush()
    producer.close()


def _search(text: str, reply_to: str | None = None, merchant: str | None = None) -> dict:
    body = {
        "type": "search.requested",
        "request_id": f"r-{uuid.uuid4().hex[:10]}",
        "occurred_at": datetime.now(UTC).isoformat(),
        "text": text,
        "top_k": 5,
        **({"merchant_id": merchant} if merchant else {}),
    }
    return body if reply_to is None else {**body, "reply_to": reply_to}


def _reindex(secure, user: str, tmp_path, log_path, *flags: str, **settings: str) -> None:
    """`loupe reindex` as ``user`` to another model (another image weight), to its switch. With a
    grace, as in production: the search process reads the old collection until it sees the
    switch, and the ingest process would drop a collection whose grace is over."""
    env = _env(secure, user, state_dir=str(tmp_path / "operator"), image_weight="0.7", **settings)
    args = [*flags, "reindex", "--grace-s", "600", "--metrics-port", "0"]
    assert loupe_process(args, env, log_path).wait(timeout=300) == 0, log_path.read_text()[-4000:]
    assert "switched:" in log_path.read_text()


def _prune(secure, user: str, settings: Settings, log_path, env: dict[str, str]) -> None:
    """A dropped collection's leftovers, made as the admin; then `loupe collections --prune` as
    ``user`` deletes them."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from loupe.consumers.kafka.names import KafkaNames

    names = KafkaNames.of(settings)
    gone = f"{env['index_prefix']}__gone"
    topic = names.vectors_topic(gone) if settings.encode_once else settings.products_topic
    groups = [names.reindex_group(gone)]
    if settings.encode_once:
        groups += [names.encode_group(gone), names.index_group(gone)]
        with KafkaAdmin(_admin(secure)) as admin:
            admin.create_missing([TopicSpec(topic, 1, 1)])
    for group in groups:
        consumer = KafkaConsumer(**_admin(secure), group_id=group)
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
        consumer.close()
    prune = loupe_process(["-v", "collections", "--prune"], _env(secure, user, **env), log_path)
    assert prune.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    said = log_path.read_text()
    for group in groups:
        assert f"deleted group {group}" in said, said[-3000:]
    assert (f"deleted topic {topic}" in said) is settings.encode_once, said[-3000:]


def _stop(procs: dict, answers: Answers) -> dict[str, int]:
    """SIGTERM the services (each finishes its batch); their exit codes."""
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    exits = {role: proc.wait(timeout=60) for role, proc in procs.items()}
    answers.reader.close()
    return exits


class Answers:
    """Every committed answer on some topics, read as a shopper-facing app (the admin) reads."""

    def __init__(self, secure, *topics: str) -> None:
        self.reader = KafkaConsumer(
            *topics,
            **_admin(secure),
            group_id=None,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        self.found: dict[str, tuple[str, dict]] = {}

    def wait(self, request_ids: list[str], timeout_s: float, procs=(), logs=()) -> None:
        def arrived() -> bool:
            for batch in self.reader.poll(timeout_ms=300).values():
                for record in batch:
                    answer = json.loads(record.value)
                    self.found[answer["request_id"]] = (record.topic, answer)
            return set(request_ids) <= set(self.found)

        wait_for(arrived, f"answers to {request_ids}", timeout_s, procs, logs)


@pytest.mark.parametrize("encode_once", [False, True], ids=["direct", "encode-once"])
def test_each_principal_runs_loupe_with_exactly_the_documented_acls(
    encode_once, secure, qdrant_server, index_prefix, tmp_path
):
    """Users of their own per mode (one broker), each granted ``loupe acls``' list for it."""
    broker, bootstrap, security = secure
    mode = "once" if encode_once else "direct"
    users = {principal: f"{principal}-{mode}" for principal in PRINCIPALS}
    names = {
        "products_topic": f"{mode}.products",
        "search_requests_topic": f"{mode}.requests",
        "search_responses_topic": f"{mode}.responses",
        "deadletter_topic": f"{mode}.deadletter",
        "group_id": f"loupe-{mode}",
        "vectors_topic": f"{mode}.vectors",
    }
    settings = Settings(bootstrap_servers=bootstrap, encode_once=encode_once, **names)
    for principal, user in users.items():
        broker.grant(bootstrap, user, required_acls(settings, principal))
    reply_topic = f"loupe.search.responses.app-{mode}"
    common = {
        **qdrant_server.settings(),
        **names,
        "index_prefix": index_prefix,
        "encode_once": str(encode_once).lower(),
        "alias_poll_interval_ms": "300",
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("operator", "ingest", "search")}

    # The operator creates Loupe's topics; the app's reply topic is the app's to create.
    topics = loupe_process(
        ["-v", "topics", "create"], _env(secure, users["operator"], **names), logs["operator"]
    )
    assert topics.wait(timeout=120) == 0, logs["operator"].read_text()[-3000:]
    with KafkaAdmin(_admin(secure)) as admin:
        admin.create_missing([TopicSpec(reply_topic, 1)])

    catalog = load_catalog()[::14][:6]
    ids = [f"p{i}" for i in range(len(catalog))]
    product_key = lambda body: f"{body['merchant_id']}/{body['product_id']}"  # noqa: E731
    _send(
        secure,
        settings.products_topic,
        [_upserted(product, pid) for product, pid in zip(catalog, ids, strict=True)],
        product_key,
    )
    procs = {
        role: loupe_process(
            ["-v", "serve", "--role", role],
            _env(secure, users[role], metrics_port="0", state_dir=str(tmp_path / role), **common),
            logs[role],
        )
        for role in ("ingest", "search")
    }
    answers = Answers(secure, settings.search_responses_topic, reply_topic)
    try:
        # An update and a delete, after the first ingest.
        renamed = "Sapphire halo ring renamed"
        _send(
            secure,
            settings.products_topic,
            [
                _upserted(catalog[0], ids[0], title=renamed),
                {
                    "type": "product.deleted",
                    "event_id": uuid.uuid4().hex,
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "merchant_id": "m",
                    "product_id": ids[1],
                },
            ],
            product_key,
        )
        asks = [
            _search(renamed),
            _search(catalog[1].title),
            _search(catalog[2].title, reply_to=reply_topic),
        ]

        def searched() -> list[dict]:
            _send(secure, settings.search_requests_topic, asks, lambda body: body["request_id"])
            answers.wait(
                [a["request_id"] for a in asks], 240, procs.values(), [logs[r] for r in procs]
            )
            return [answers.found[a["request_id"]] for a in asks]

        # Searches are answered once the index holds the update and the delete.
        def current() -> bool:
            nonlocal asks
            found = searched()
            titles = [[hit["title"] for hit in answer["hits"]] for _, answer in found]
            if renamed in titles[0] and catalog[1].title not in titles[1]:
                return True
            asks = [_search(a["text"], a.get("reply_to")) for a in asks]
            time.sleep(1.0)
            return False

        wait_for(current, "answers that reflect the update and the delete", 300)
        found = searched()
        assert [answer["status"] for _, answer in found] == ["ok"] * 3, found
        assert [topic for topic, _ in found] == [settings.search_responses_topic] * 2 + [
            reply_topic
        ]
        assert catalog[2].title in [hit["title"] for hit in found[2][1]["hits"]]
        first_model = found[0][1]["model_version"]

        # The operator rebuilds the index under another model; the fleet follows the switch.
        _reindex(secure, users["operator"], tmp_path, logs["operator"], "-v", **common)

        def new_model() -> bool:
            nonlocal asks
            asks = [_search(renamed)]
            return searched()[0][1]["model_version"] != first_model

        wait_for(new_model, "answers from the reindexed model", 120)
    finally:
        exits = _stop(procs, answers)
    assert exits == {"ingest": 0, "search": 0}, {r: logs[r].read_text()[-3000:] for r in procs}

    # The operator prunes what Kafka keeps of a collection the index no longer holds (left
    # here by the admin: its groups, and with encode-once its vectors topic).
    _prune(secure, users["operator"], settings, logs["operator"], common)

    # No password, of any principal, in any log line, at -v.
    for name, path in logs.items():
        text = path.read_text()
        assert "DEBUG" in text, f"{name} ran at -v"
        for user, password in security.users.items():
            assert password not in text, f"{user}'s password in {name}'s log"


def _loupe(args: list[str], env: dict[str, str], log_path, timeout_s: float = 120) -> str:
    """Run ``loupe <args>`` to its end; its exit code must be non-zero. Returns its output."""
    proc = loupe_process(args, env, log_path)
    assert proc.wait(timeout=timeout_s) != 0, log_path.read_text()[-3000:]
    return log_path.read_text()


def test_a_wrong_password_stops_start_up_with_one_line_naming_the_settings(secure, tmp_path):
    wrong = f"wrong-{uuid.uuid4().hex}"
    started = time.monotonic()
    output = _loupe(
        ["-v", "serve", "--role", "search"],
        _env(secure, "search-direct", password=wrong, state_dir=str(tmp_path), metrics_port="0"),
        tmp_path / "serve.log",
    )
    took = time.monotonic() - started
    last = output.strip().splitlines()[-1]
    assert last.startswith("loupe: error: Kafka at "), output[-3000:]
    assert "refused Loupe's credentials (user 'search-direct', SCRAM-SHA-512)" in last
    assert "LOUPE_SASL_PLAIN_PASSWORD" in last
    assert took < 60, f"refused credentials are not waited on ({took:.0f} s)"
    assert wrong not in output, "the wrong password is not logged either"


def test_a_principal_lacking_an_acl_stops_with_the_acl_named(secure, tmp_path):
    """The search ACLs less the group's: `serve` stops (no retry loop) with the missing ACL;
    without the Create ACLs, `topics create` says so in one line."""
    broker, bootstrap, _ = secure
    names = {
        "products_topic": f"short.products.{uuid.uuid4().hex[:8]}",
        "search_requests_topic": f"short.requests.{uuid.uuid4().hex[:8]}",
        "search_responses_topic": f"short.responses.{uuid.uuid4().hex[:8]}",
        "deadletter_topic": f"short.deadletter.{uuid.uuid4().hex[:8]}",
        "group_id": f"short-{uuid.uuid4().hex[:8]}",
    }
    with KafkaAdmin(_admin(secure)) as admin:
        admin.create_missing([TopicSpec(names[k], 1) for k in names if k.endswith("_topic")])
    settings = Settings(bootstrap_servers=bootstrap, **names)
    acls = [acl for acl in required_acls(settings, "search") if acl.resource != "group"]
    broker.grant(bootstrap, SHORT_OF_ONE, acls)
    env = _env(secure, SHORT_OF_ONE, state_dir=str(tmp_path), metrics_port="0", **names)

    output = _loupe(["serve", "--role", "search"], env, tmp_path / "serve.log", timeout_s=180)
    last = output.strip().splitlines()[-1]
    assert last.startswith("loupe serve: the search worker stopped: the broker refused"), output[
        -3000:
    ]
    assert f"needs Read on group {names['group_id']}.search;" in last, last
    assert "Traceback" not in output, "a missing ACL is not a bug: no traceback"

    output = _loupe(["topics", "create"], env, tmp_path / "topics.log")
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"loupe: error: the broker refused '{SHORT_OF_ONE}'"), output[-3000:]
    assert "TopicAuthorizationFailedError" in last and "loupe acls operator" in last, last


def test_per_merchant_topics_let_the_broker_decide_who_writes_for_whom(
    secure, qdrant_server, index_prefix, tmp_path
):
    """LOUPE_MERCHANT_TOPICS: each merchant's system may write its own products topic only
    (the broker refuses the other's), an event claiming another merchant in its own topic is
    dead-lettered, and ingest, search and a reindex read every merchant's topic."""
    from kafka.errors import TopicAuthorizationFailedError

    from loupe.consumers.kafka.acls import merchant_acls

    broker, bootstrap, _ = secure
    users = {principal: f"{principal}-tenant" for principal in PRINCIPALS}
    names = {
        "products_topic": "tenant.products",
        "search_requests_topic": "tenant.requests",
        "search_responses_topic": "tenant.responses",
        "deadletter_topic": "tenant.deadletter",
        "group_id": "loupe-tenant",
    }
    settings = Settings(bootstrap_servers=bootstrap, merchant_topics=True, **names)
    for principal, user in users.items():
        broker.grant(bootstrap, user, required_acls(settings, principal))
    for merchant in MERCHANTS:
        broker.grant(bootstrap, merchant, merchant_acls(settings, merchant))
    common = {
        **qdrant_server.settings(),
        **names,
        "merchant_topics": "true",
        "index_prefix": index_prefix,
        "alias_poll_interval_ms": "300",
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("operator", "ingest", "search")}
    create = ["topics", "create", *(arg for m in MERCHANTS for arg in ("--merchant", m))]
    topics = loupe_process(create, _env(secure, users["operator"], **common), logs["operator"])
    assert topics.wait(timeout=120) == 0, logs["operator"].read_text()[-3000:]
    topic_of = {m: settings.products_topics().merchant_topic(m) for m in MERCHANTS}
    assert "tenant.products.shop-a: created (compacted)" in logs["operator"].read_text()

    catalog = load_catalog()[::14][:3]
    key = lambda body: f"{body['merchant_id']}/{body['product_id']}"  # noqa: E731

    def publish_as(merchant: str, topic: str, bodies: list[dict]) -> None:
        producer = KafkaProducer(**broker.client_config(bootstrap, merchant), acks="all")
        try:
            for body in bodies:
                producer.send(topic, key=key(body).encode(), value=json.dumps(body).encode()).get(
                    timeout=30
                )
        finally:
            producer.close()

    publish_as("shop-a", topic_of["shop-a"], [_upserted(catalog[0], "a1", merchant="shop-a")])
    publish_as("shop-b", topic_of["shop-b"], [_upserted(catalog[1], "b1", merchant="shop-b")])
    # shop-a cannot write shop-b's topic: the broker refuses it.
    with pytest.raises(TopicAuthorizationFailedError):
        publish_as("shop-a", topic_of["shop-b"], [_upserted(catalog[2], "x", merchant="shop-b")])
    # In its own topic it can claim to be shop-b: Loupe refuses that event.
    forged = _upserted(catalog[2], "forged", merchant="shop-b")
    publish_as("shop-a", topic_of["shop-a"], [forged])

    procs = {
        role: loupe_process(
            ["serve", "--role", role],
            _env(secure, users[role], metrics_port="0", state_dir=str(tmp_path / role), **common),
            logs[role],
        )
        for role in ("ingest", "search")
    }
    service_logs = [logs[role] for role in procs]
    answers = Answers(secure, settings.search_responses_topic)
    try:

        def asked(*requests: dict) -> list[dict]:
            _send(secure, settings.search_requests_topic, list(requests), lambda b: b["request_id"])
            ids = [r["request_id"] for r in requests]
            answers.wait(ids, 240, procs.values(), service_logs)
            return [answers.found[i][1] for i in ids]

        def hits(answer: dict) -> list[tuple[str, str]]:
            return [(hit["merchant_id"], hit["product_id"]) for hit in answer["hits"]]

        wait_for(
            lambda: ("shop-b", "b1") in hits(asked(_search(catalog[1].title))[0]),
            "both merchants' products indexed",
            240,
        )
        mine, theirs = asked(
            _search(catalog[0].title, merchant="shop-a"),
            _search(catalog[2].title, merchant="shop-b"),
        )
        assert hits(mine)[0] == ("shop-a", "a1"), mine
        assert ("shop-b", "forged") not in hits(theirs), "the forged product is not indexed"
        assert {h[0] for h in hits(theirs)} <= {"shop-b"}, theirs

        # The reindex reads every merchant's topic too.
        _reindex(secure, users["operator"], tmp_path, logs["operator"], **common)
        before = mine["model_version"]
        wait_for(
            lambda: (
                asked(_search(catalog[0].title, merchant="shop-a"))[0]["model_version"] != before
            ),
            "answers from the reindexed model",
            120,
        )
        [after] = asked(_search(catalog[1].title, merchant="shop-b"))
        assert hits(after)[0] == ("shop-b", "b1"), after
    finally:
        exits = _stop(procs, answers)
    assert exits == {"ingest": 0, "search": 0}, {r: logs[r].read_text()[-3000:] for r in procs}

    # The forged event is in the dead letters, with its reason.
    letters = KafkaConsumer(
        settings.deadletter_topic,
        **_admin(secure),
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        consumer_timeout_ms=5000,
    )
    found = [dict(record.headers) for record in letters]
    letters.close()
    codes = [headers.get("loupe.error.code") for headers in found]
    assert codes.count(b"merchant_mismatch") >= 1, found
    with KafkaAdmin(_admin(secure)) as admin:
        assert set(topic_of.values()) <= admin.topics()
