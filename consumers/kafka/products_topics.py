"""Where the catalog lives: one products topic (the default), or a topic per merchant under the
products topic's name (``LOUPE_MERCHANT_TOPICS``): ``loupe.products.v1.<merchant_id>``.

In the per-merchant mode the broker decides who writes for whom (a merchant's producer gets
Write on its own topic only), so the merchant of a product is the topic's, not a field its
sender fills in: an event whose ``merchant_id`` differs from its topic's is refused
(``merchant_mismatch``, dead-lettered). Loupe's consumers subscribe by pattern, so a new
merchant's topic is read from its first event, after the consumer's next metadata refresh.
docs/security.md ("Tenancy") compares the two modes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from loupe.schemas.errors import ErrorCode, InvalidEvent

# The merchant part of a per-merchant topic: what a Kafka topic name may hold.
MERCHANT_IN_TOPIC = r"[A-Za-z0-9._-]+"
MAX_TOPIC_NAME = 249  # Kafka's limit on a topic's name


@dataclass(frozen=True)
class ProductsTopics:
    """The products topic ``base``, or (``per_merchant``) the topics ``<base>.<merchant_id>``."""

    base: str
    per_merchant: bool = False

    @property
    def pattern(self) -> str:
        """What a consumer subscribes to in the per-merchant mode (the whole name)."""
        return f"^{re.escape(self.base)}\\.{MERCHANT_IN_TOPIC}$"

    @property
    def label(self) -> str:
        """How logs and metrics name them."""
        return f"{self.base}.<merchant>" if self.per_merchant else self.base

    def subscribe(self, consumer, listener) -> None:
        """Subscribe ``consumer`` to these topics (by pattern, per merchant)."""
        if self.per_merchant:
            consumer.subscribe(pattern=self.pattern, listener=listener)
        else:
            consumer.subscribe([self.base], listener=listener)

    def merchant_topic(self, merchant_id: str) -> str:
        """The topic of ``merchant_id``'s products; ValueError if no topic can be named so."""
        name = f"{self.base}.{merchant_id}"
        if not re.fullmatch(MERCHANT_IN_TOPIC, merchant_id) or len(name) > MAX_TOPIC_NAME:
            raise ValueError(
                f"merchant id {merchant_id!r} cannot name a topic ({self.base}.<merchant_id>: "
                f"letters, digits, '.', '_', '-', at most {MAX_TOPIC_NAME} characters in all)"
            )
        return name

    def holds(self, topic: str) -> bool:
        """Whether ``topic`` is one of these products topics."""
        if self.per_merchant:
            return re.fullmatch(self.pattern, topic) is not None
        return topic == self.base

    def merchant_of(self, topic: str) -> str | None:
        """The merchant a per-merchant topic belongs to; None in the single-topic mode."""
        if not self.per_merchant or not self.holds(topic):
            return None
        return topic[len(self.base) + 1 :]

    def among(self, names: Iterable[str]) -> list[str]:
        """The products topics among ``names`` (a broker's topic list), sorted."""
        return sorted(name for name in names if self.holds(name))

    def check(self, topic: str, merchant_id: str) -> None:
        """Refuse an event for ``merchant_id`` read from another merchant's topic."""
        owner = self.merchant_of(topic)
        if owner is not None and owner != merchant_id:
            raise InvalidEvent(
                ErrorCode.MERCHANT_MISMATCH,
                f"merchant_id {merchant_id!r} in {topic}, which holds merchant {owner!r}'s "
                "products only",
                field="merchant_id",
            )
