"""Loupe's topics: which a role needs, checking them at start-up, creating them.

The names come from ``Settings`` (whose defaults are the contract's, in ``schemas/``), so the
compose stack's init container runs ``loupe topics create`` instead of repeating them.

The products topic is the catalog's source of truth, so it is created compacted
(``cleanup.policy=compact``): Kafka keeps the latest event of every product key forever, and
``loupe train`` and ``loupe reindex`` (a new model's index) can read the whole catalog from the
beginning. Start-up warns when an existing products topic is not compacted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from loupe.consumers.errors import LoupeError, TopicConfigUnknown
from loupe.consumers.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("ingest", "search", "all")
COMPACTED = {"cleanup.policy": "compact"}


class TopicsMissing(LoupeError):
    """Loupe's topics are not there. Policy: stop at start-up and say which and how to fix."""


def required_topics(settings: Settings, role: str) -> list[str]:
    """The topics ``role`` needs before it starts (per merchant, a merchant's products topic is
    read once it exists: none is required)."""
    topics = [settings.deadletter_topic]
    if role in ("ingest", "all") and not settings.merchant_topics:
        topics.append(settings.products_topic)
    if role in ("search", "all"):
        topics += [settings.search_requests_topic, settings.search_responses_topic]
    return topics


def check_topics(settings: Settings, role: str) -> None:
    admin = KafkaAdminClient(**settings.kafka_client_config(), client_id="loupe-admin")
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    missing = [t for t in required_topics(settings, role) if t not in existing]
    if missing:
        # A broker lists only the topics the principal may describe: one without that ACL sees
        # an existing topic as missing.
        hidden = (
            f", or hidden from user {settings.sasl_plain_username!r} by its ACLs (Describe: "
            "`loupe acls` lists them)"
            if settings.sasl_plain_username
            else ""
        )
        raise TopicsMissing(
            f"topics missing on {settings.bootstrap_servers}{hidden}: {', '.join(missing)}; "
            "create them with `loupe topics create` (the compose stack does), or in development "
            "start with `loupe serve --create-topics`"
        )
    if role in ("ingest", "all"):
        for topic in settings.products_topics().among(existing):
            warn_unless_compacted(settings, topic)


def cleanup_policy(settings: Settings, topic: str) -> str:
    """The topic's ``cleanup.policy`` as the broker reports it (``delete``, ``compact``, or
    both, comma-separated)."""
    admin = KafkaAdminClient(**settings.kafka_client_config(), client_id="loupe-admin")
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
    finally:
        admin.close()
    # kafka-python drops a resource's error code: a refused or unknown topic comes back empty.
    entry = described.get("topic", {}).get(topic, {}).get("cleanup.policy")
    if entry is None:
        raise TopicConfigUnknown(
            f"the broker did not describe topic {topic!r} (DescribeConfigs not allowed, or no "
            "such topic)"
        )
    return str(entry["value"])


def warn_unless_compacted(settings: Settings, topic: str | None = None) -> bool:
    """Log a warning if the products topic (or ``topic``, a merchant's) is not compacted;
    return whether it is."""
    topic = topic or settings.products_topic
    policy = cleanup_policy(settings, topic)
    compacted = "compact" in policy.split(",")
    if not compacted:
        log.warning(
            "the products topic %s is not compacted (cleanup.policy=%s): products whose last "
            "event is older than the topic's retention vanish from it, so `loupe train` and a "
            "new model's ingest cannot see them. Make it the catalog's source of truth: "
            "kafka-configs.sh --alter --entity-type topics --entity-name %s --add-config "
            "cleanup.policy=compact",
            topic,
            policy,
            topic,
        )
    return compacted


def all_topics(settings: Settings, merchants: Iterable[str] = ()) -> list[str]:
    """Loupe's topics; per merchant, the products topics of ``merchants`` in place of the
    products topic."""
    products = settings.products_topics()
    catalog = (
        [products.merchant_topic(m) for m in merchants]
        if settings.merchant_topics
        else [settings.products_topic]
    )
    return [
        *catalog,
        settings.search_requests_topic,
        settings.search_responses_topic,
        settings.deadletter_topic,
    ]


def ensure_topics(
    settings: Settings,
    partitions: int = 3,
    replication_factor: int = 1,
    merchants: Iterable[str] = (),
) -> list[str]:
    """Create whichever of Loupe's topics are missing (per merchant, ``merchants``' products
    topics, compacted); return the names created."""
    products = settings.products_topics()
    admin = KafkaAdminClient(**settings.kafka_client_config(), client_id="loupe-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(
                t,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs=COMPACTED if products.holds(t) else {},
            )
            for t in all_topics(settings, merchants)
            if t not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
        return [t.name for t in missing]
    finally:
        admin.close()
