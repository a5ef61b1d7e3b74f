"""Where a search's answer may go: ``reply_to`` names a reply topic, and nothing else.

A request's ``reply_to`` is input from whoever may send search requests, and Loupe's producer
may write topics that request senders must never reach: the compacted products topic (the
catalog's source of truth, keyed ``<merchant>/<product>``), the vectors topics, the dead-letter
topic, Kafka's internal topics. An answer published into a compacted topic under a product's key
would, once the cleaner runs, replace that product for good. So a ``reply_to`` is checked
against an allow-list (``LOUPE_REPLY_TO_PATTERN``, whole name), and whatever the pattern says,
never goes to a topic Loupe reads or writes for itself, an internal topic, a topic that does not
exist, a compacted one, or one the broker did not let Loupe write. A refused ``reply_to`` is
answered on the default response topic with ``reply_to_refused``; the refusal is counted by
reason (``loupe_reply_to_refused_total``).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loupe.consumers.errors import TopicConfigUnknown

# Kafka's own topics (__consumer_offsets, __transaction_state, __cluster_metadata) and the
# convention of tools around it (_schemas, _confluent-*) start with an underscore.
INTERNAL_PREFIX = "_"
# The topics a request may name by default: those under this prefix (a prefixed ACL grants them).
REPLY_TOPICS_PREFIX = "loupe.search.responses."
DEFAULT_REPLY_TO_PATTERN = re.escape(REPLY_TOPICS_PREFIX) + ".+"
# How long a topic's verdict from the broker (exists, cleanup.policy, refused a write) is kept:
# an operator who fixes a topic waits at most this long, and a hostile stream of requests costs
# the broker one look-up per topic per period.
VERDICT_TTL_S = 300.0
MAX_REMEMBERED_TOPICS = 10_000  # the verdicts kept; input names the topics, so it is bounded


class Refusal(enum.StrEnum):
    """Why a ``reply_to`` was refused: the metric's label values (a closed set)."""

    NOT_ALLOWED = "not_allowed"  # outside LOUPE_REPLY_TO_PATTERN
    LOUPE_TOPIC = "loupe_topic"  # one Loupe reads or writes for itself
    INTERNAL = "internal"  # Kafka's, or a tool's, internal topic
    MISSING = "missing"  # no such topic
    COMPACTED = "compacted"  # a key in it would replace an older record for good
    UNVERIFIED = "unverified"  # the broker would not describe its configuration
    UNWRITABLE = "unwritable"  # the broker refused Loupe's write to it


@dataclass(frozen=True)
class ReplyTopics:
    """The static part of the rule: what a name alone decides.

    ``default``: the configured response topic, always allowed (the operator chose it).
    ``own``: the topics Loupe reads or writes for itself; ``own_prefixes``: name prefixes of
    its own per-collection topics (the vectors topics).
    """

    default: str
    pattern: re.Pattern[str]
    own: frozenset[str]
    own_prefixes: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, default: str, pattern: str, own: Iterable[str], own_prefixes: Iterable[str] = ()
    ) -> ReplyTopics:
        return cls(default, re.compile(pattern), frozenset(own) - {default}, tuple(own_prefixes))

    def refusal(self, topic: str) -> tuple[Refusal, str] | None:
        """Why ``topic`` may not receive answers, by its name alone; None if it may."""
        if topic == self.default:
            return None
        if topic in self.own or topic.startswith(self.own_prefixes):
            return Refusal.LOUPE_TOPIC, f"reply_to {topic!r} is one of Loupe's own topics"
        if topic.startswith(INTERNAL_PREFIX):
            return Refusal.INTERNAL, f"reply_to {topic!r} is an internal topic"
        if self.pattern.fullmatch(topic) is None:
            return (
                Refusal.NOT_ALLOWED,
                f"reply_to {topic!r} is not a reply topic (allowed: {self.pattern.pattern})",
            )
        return None


TOPICS_REFRESH_S = 10.0


@dataclass
class KnownTopics:
    """Whether a topic exists, from the cluster's topic list, asked again at most every
    ``TOPICS_REFRESH_S`` and only on a miss (a hostile stream of names costs no more)."""

    list_topics: Callable[[], set[str]]
    clock: Callable[[], float] = time.monotonic
    _known: set[str] = field(default_factory=set)
    _listed_at: float = float("-inf")

    def exists(self, topic: str) -> bool:
        if topic in self._known:
            return True
        now = self.clock()
        if now - self._listed_at >= TOPICS_REFRESH_S:
            self._known = set(self.list_topics())
            self._listed_at = now
        return topic in self._known


@dataclass
class ReplyGate:
    """The whole rule: ``ReplyTopics`` by name, then what the broker says of the topic.

    ``topic_exists`` and ``cleanup_policy`` ask the broker (the caller retries transient
    failures inside them); ``cleanup_policy`` raises ``TopicConfigUnknown`` when the broker will
    not say, and the topic is then refused: a topic that cannot be checked is not written.
    """

    topics: ReplyTopics
    topic_exists: Callable[[str], bool]
    cleanup_policy: Callable[[str], str]
    clock: Callable[[], float] = time.monotonic
    _verdicts: dict[str, tuple[float, tuple[Refusal, str] | None]] = field(default_factory=dict)

    def refusal(self, topic: str | None) -> tuple[Refusal, str] | None:
        """Why an answer may not go to ``topic`` (None: the default topic); None if it may."""
        if topic is None:
            return None
        static = self.topics.refusal(topic)
        if static is not None or topic == self.topics.default:
            return static
        now = self.clock()
        known = self._verdicts.get(topic)
        if known is not None and now - known[0] < VERDICT_TTL_S:
            return known[1]
        verdict = self._ask_broker(topic)
        if verdict is None or verdict[0] is not Refusal.MISSING:
            # A missing topic is asked again next time (it may be created any moment); the
            # existence check is the consumer's cached metadata, not a request per call.
            self._remember(topic, now, verdict)
        return verdict

    def refuse_writes(self, topics: Iterable[str], why: str) -> None:
        """The broker refused a write to ``topics`` (an ACL): refuse them as replies for a while,
        so that the requests that named them are answered on the default topic instead of
        failing again for ever."""
        now = self.clock()
        for topic in topics:
            if topic != self.topics.default:
                message = f"reply_to {topic!r} refused: Loupe may not write it ({why})"
                self._remember(topic, now, (Refusal.UNWRITABLE, message))

    def _ask_broker(self, topic: str) -> tuple[Refusal, str] | None:
        if not self.topic_exists(topic):
            return Refusal.MISSING, f"reply_to topic {topic!r} does not exist"
        try:
            policy = self.cleanup_policy(topic)
        except TopicConfigUnknown as exc:
            return Refusal.UNVERIFIED, f"reply_to {topic!r}: its configuration is unknown ({exc})"
        if "compact" in policy.split(","):
            return Refusal.COMPACTED, f"reply_to {topic!r} is compacted (cleanup.policy={policy})"
        return None

    def _remember(self, topic: str, now: float, verdict: tuple[Refusal, str] | None) -> None:
        if len(self._verdicts) >= MAX_REMEMBERED_TOPICS:
            self._verdicts.clear()  # a flood of names: forget, and ask the broker again
        self._verdicts[topic] = (now, verdict)
