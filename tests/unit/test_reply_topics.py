"""Where a search's answer may go: the rule by name, then what the broker says of the topic."""

from __future__ import annotations

import pytest

from loupe.consumers.errors import TopicConfigUnknown
from loupe.consumers.kafka.reply_topics import (
    DEFAULT_REPLY_TO_PATTERN,
    VERDICT_TTL_S,
    Refusal,
    ReplyGate,
    ReplyTopics,
)
from loupe.consumers.settings import Settings

DEFAULT = "loupe.search.responses.v1"
OWN = ["loupe.products.v1", "loupe.search.requests.v1", "loupe.deadletter.v1"]


def _topics(pattern: str = DEFAULT_REPLY_TO_PATTERN) -> ReplyTopics:
    return ReplyTopics.of(DEFAULT, pattern, own=OWN, own_prefixes=["loupe.vectors."])


@pytest.mark.parametrize(
    ("topic", "refusal"),
    [
        (DEFAULT, None),
        ("loupe.search.responses.app-7", None),
        ("loupe.products.v1", Refusal.LOUPE_TOPIC),
        ("loupe.search.requests.v1", Refusal.LOUPE_TOPIC),
        ("loupe.deadletter.v1", Refusal.LOUPE_TOPIC),
        ("loupe.vectors.loupe_m_0123abcd", Refusal.LOUPE_TOPIC),
        ("__consumer_offsets", Refusal.INTERNAL),
        ("__transaction_state", Refusal.INTERNAL),
        ("_schemas", Refusal.INTERNAL),
        ("orders", Refusal.NOT_ALLOWED),
        ("loupe.search.responses.", Refusal.NOT_ALLOWED),  # the pattern wants a name after it
        ("xloupe.search.responses.a", Refusal.NOT_ALLOWED),  # the whole name, not a search
        ("loupe.search.responsesXa", Refusal.NOT_ALLOWED),  # dots are dots
    ],
)
def test_the_name_alone_decides_these(topic, refusal):
    verdict = _topics().refusal(topic)
    assert (verdict[0] if verdict else None) is refusal


def test_a_pattern_that_allows_everything_still_keeps_loupes_own_and_internal_topics():
    everything = _topics(".*")
    assert everything.refusal("orders") is None
    for topic in [*OWN, "loupe.vectors.x", "__consumer_offsets"]:
        assert everything.refusal(topic) is not None, topic


class _Broker:
    """What the gate asks of the broker, counted: topics and their cleanup policies."""

    def __init__(self, policies: dict[str, str | None]) -> None:
        self.policies = policies
        self.asked: list[str] = []

    def exists(self, topic: str) -> bool:
        return topic in self.policies

    def cleanup_policy(self, topic: str) -> str:
        self.asked.append(topic)
        policy = self.policies[topic]
        if policy is None:
            raise TopicConfigUnknown("DescribeConfigs not allowed")
        return policy


def _gate(broker: _Broker, clock=lambda: 0.0) -> ReplyGate:
    return ReplyGate(_topics(), broker.exists, broker.cleanup_policy, clock=clock)


def test_the_broker_decides_the_rest_and_a_topic_that_cannot_be_checked_is_refused():
    broker = _Broker(
        {
            "loupe.search.responses.ok": "delete",
            "loupe.search.responses.compacted": "compact",
            "loupe.search.responses.both": "compact,delete",
            "loupe.search.responses.secret": None,
        }
    )
    gate = _gate(broker)
    assert gate.refusal(None) is None
    assert gate.refusal(DEFAULT) is None
    assert gate.refusal("loupe.search.responses.ok") is None
    assert gate.refusal("loupe.search.responses.compacted")[0] is Refusal.COMPACTED
    assert gate.refusal("loupe.search.responses.both")[0] is Refusal.COMPACTED
    assert gate.refusal("loupe.search.responses.secret")[0] is Refusal.UNVERIFIED
    reason, message = gate.refusal("loupe.search.responses.gone")
    assert reason is Refusal.MISSING and "does not exist" in message
    # Refused by name: the broker is not asked at all.
    assert gate.refusal("loupe.products.v1")[0] is Refusal.LOUPE_TOPIC
    assert "loupe.products.v1" not in broker.asked


def test_verdicts_are_remembered_for_a_while_but_a_missing_topic_is_asked_again():
    now = [0.0]
    broker = _Broker({"loupe.search.responses.ok": "delete"})
    gate = _gate(broker, clock=lambda: now[0])
    for _ in range(3):
        assert gate.refusal("loupe.search.responses.ok") is None
    assert broker.asked == ["loupe.search.responses.ok"]
    broker.policies["loupe.search.responses.ok"] = "compact"  # an operator changed it
    now[0] = VERDICT_TTL_S + 1
    assert gate.refusal("loupe.search.responses.ok")[0] is Refusal.COMPACTED
    assert gate.refusal("loupe.search.responses.new")[0] is Refusal.MISSING
    broker.policies["loupe.search.responses.new"] = "delete"  # created since
    assert gate.refusal("loupe.search.responses.new") is None


def test_a_topic_the_broker_refused_to_let_loupe_write_is_refused_until_the_verdict_expires():
    now = [0.0]
    broker = _Broker({"loupe.search.responses.acl": "delete"})
    gate = _gate(broker, clock=lambda: now[0])
    assert gate.refusal("loupe.search.responses.acl") is None
    gate.refuse_writes(["loupe.search.responses.acl", DEFAULT], "TOPIC_AUTHORIZATION_FAILED")
    reason, message = gate.refusal("loupe.search.responses.acl")
    assert reason is Refusal.UNWRITABLE and "may not write" in message
    assert gate.refusal(DEFAULT) is None  # the default topic is the operator's to fix
    now[0] = VERDICT_TTL_S + 1
    assert gate.refusal("loupe.search.responses.acl") is None


def test_the_pattern_setting_must_be_a_regular_expression():
    from loupe.consumers.errors import ConfigError

    with pytest.raises((ValueError, ConfigError), match="regular expression"):
        Settings(reply_to_pattern="loupe.(unclosed")
    assert Settings().reply_to_pattern == DEFAULT_REPLY_TO_PATTERN
