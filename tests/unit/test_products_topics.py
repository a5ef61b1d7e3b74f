"""Per-merchant products topics (LOUPE_MERCHANT_TOPICS): names, the subscription, the rule that
an event belongs to its topic's merchant, and what the settings refuse. The broker enforcing it
is tests/integration/test_secure_broker.py's to prove."""

from __future__ import annotations

import pytest
from kafka.structs import TopicPartition

from loupe.cli.main import main
from loupe.consumers.index.catalog import CollectionCard, ModelCard, offsets_in
from loupe.consumers.kafka.acls import merchant_acls, required_acls
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.settings import Settings
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.train.source import _its_merchants

PER_MERCHANT = ProductsTopics("loupe.products.v1", per_merchant=True)
SINGLE = ProductsTopics("loupe.products.v1")


class _Consumer:
    def __init__(self) -> None:
        self.subscribed: dict = {}

    def subscribe(self, topics=(), pattern=None, listener=None) -> None:
        self.subscribed = {"topics": list(topics), "pattern": pattern}


def test_a_merchants_topic_and_who_it_belongs_to():
    assert PER_MERCHANT.merchant_topic("giva") == "loupe.products.v1.giva"
    assert PER_MERCHANT.merchant_of("loupe.products.v1.giva") == "giva"
    assert PER_MERCHANT.merchant_of("loupe.products.v1.a.b") == "a.b"
    assert PER_MERCHANT.holds("loupe.products.v1.giva")
    assert not PER_MERCHANT.holds("loupe.products.v1") and not PER_MERCHANT.holds("x.giva")
    assert not PER_MERCHANT.holds("loupe.products.v1X.giva"), "the dot is not a wildcard"
    assert PER_MERCHANT.among(["b", "loupe.products.v1.z", "loupe.products.v1.a"]) == [
        "loupe.products.v1.a",
        "loupe.products.v1.z",
    ]
    with pytest.raises(ValueError, match="cannot name a topic"):
        PER_MERCHANT.merchant_topic("a/b")
    with pytest.raises(ValueError, match="cannot name a topic"):
        PER_MERCHANT.merchant_topic("x" * 240)
    # The single topic: the merchant is the field's, and any topic but the one is not it.
    assert SINGLE.holds("loupe.products.v1") and not SINGLE.holds("loupe.products.v1.giva")
    assert SINGLE.merchant_of("loupe.products.v1") is None
    SINGLE.check("loupe.products.v1", "anyone")


def test_consumers_subscribe_by_pattern_only_per_merchant():
    consumer = _Consumer()
    PER_MERCHANT.subscribe(consumer, listener=None)
    assert consumer.subscribed == {"topics": [], "pattern": PER_MERCHANT.pattern}
    SINGLE.subscribe(consumer, listener=None)
    assert consumer.subscribed == {"topics": ["loupe.products.v1"], "pattern": None}
    assert PER_MERCHANT.label == "loupe.products.v1.<merchant>" and SINGLE.label == SINGLE.base


def test_an_event_in_another_merchants_topic_is_refused():
    PER_MERCHANT.check("loupe.products.v1.giva", "giva")
    with pytest.raises(InvalidEvent) as refused:
        PER_MERCHANT.check("loupe.products.v1.giva", "tanishq")
    assert refused.value.code is ErrorCode.MERCHANT_MISMATCH
    assert "'tanishq' in loupe.products.v1.giva" in str(refused.value)


def test_card_offsets_of_every_merchants_topic():
    keyed = {"loupe.products.v1.a:0": 5, "loupe.products.v1.b:1": 7, "loupe.vectors.x:0": 9}
    assert offsets_in(keyed, PER_MERCHANT) == {
        TopicPartition("loupe.products.v1.a", 0): 5,
        TopicPartition("loupe.products.v1.b", 1): 7,
    }
    card = CollectionCard(ModelCard.of(Settings().model_profile(), "m1"))
    card.applied_offsets = {"loupe.products.v1:3": 11, **keyed}
    assert card.applied_offsets_in(SINGLE) == {TopicPartition("loupe.products.v1", 3): 11}


def test_the_settings_keep_loupes_other_topics_out_of_the_merchants_names():
    assert Settings(merchant_topics=True).products_topics() == PER_MERCHANT
    with pytest.raises(ValueError, match="LOUPE_VECTORS_TOPIC must be named otherwise"):
        Settings(merchant_topics=True, vectors_topic="loupe.products.v1.vectors")
    with pytest.raises(ValueError, match="LOUPE_DEADLETTER_TOPIC"):
        Settings(merchant_topics=True, deadletter_topic="loupe.products.v1.dead")
    Settings(vectors_topic="loupe.products.v1.vectors")  # one topic: no such rule


def test_acls_per_merchant():
    settings = Settings(merchant_topics=True)
    [reads] = [acl for acl in required_acls(settings, "ingest") if "Read" in acl.operations][:1]
    assert (reads.name, reads.pattern) == ("loupe.products.v1.", "prefixed")
    [own] = merchant_acls(settings, "giva")
    assert (own.name, own.pattern, own.operations) == (
        "loupe.products.v1.giva",
        "literal",
        ("Write", "Describe"),
    )


def test_the_cli_creates_merchant_topics_only_per_merchant(monkeypatch, capsys):
    assert main(["topics", "create", "--merchant", "giva"]) == 2
    assert "set LOUPE_MERCHANT_TOPICS=true" in capsys.readouterr().err
    monkeypatch.setenv("LOUPE_MERCHANT_TOPICS", "true")
    assert main(["topics", "create", "--merchant", "a/b"]) == 2
    assert "cannot name a topic" in capsys.readouterr().err
    assert main(["acls", "--merchant", "giva", "--user", "giva=giva-sys"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# merchant giva")
    assert (
        "User:giva-sys --operation Write --operation Describe --topic loupe.products.v1.giva"
        in (out)
    )


class _Record:
    def __init__(self, topic: str, merchant: str) -> None:
        import json

        self.topic, self.key, self.partition, self.offset = topic, f"{merchant}/p".encode(), 0, 0
        self.timestamp, self.timestamp_type = 1_700_000_000_000, 0
        self.value = json.dumps(
            {
                "type": "product.deleted",
                "event_id": "e",
                "occurred_at": "2026-01-01T00:00:00Z",
                "merchant_id": merchant,
                "product_id": "p",
            }
        ).encode()


def test_training_leaves_out_what_the_service_refuses():
    assert _its_merchants(PER_MERCHANT, _Record("loupe.products.v1.giva", "giva"))
    assert not _its_merchants(PER_MERCHANT, _Record("loupe.products.v1.giva", "other"))
    assert _its_merchants(SINGLE, _Record("loupe.products.v1", "other"))
