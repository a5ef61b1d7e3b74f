"""Loupe's topics at start-up and on an operator's command: checking that a role's are there,
creating them.

The names are ``kafka_names.KafkaNames``' (from ``Settings``, whose defaults are the contract's,
in ``schemas/``), so the compose stack's init container runs ``loupe topics create`` instead of
repeating them.

The products topic is the catalog's source of truth, so it is created compacted
(``cleanup.policy=compact``): Kafka keeps the latest event of every product key forever, and
``loupe train`` and ``loupe reindex`` (a new model's index) can read the whole catalog from the
beginning. Start-up warns when an existing products topic is not compacted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from loupe.consumers.errors import LoupeError
from loupe.consumers.kafka.admin import COMPACTED, KafkaAdmin, TopicShape, TopicSpec
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("ingest", "search", "all")


class TopicsMissing(LoupeError):
    """Loupe's topics are not there. Policy: stop at start-up and say which and how to fix."""


def check_topics(settings: Settings, role: str) -> None:
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        existing = admin.topics()
        missing = [t for t in KafkaNames.of(settings).required(role) if t not in existing]
        if missing:
            # A broker lists only the topics the principal may describe: one without that ACL
            # sees an existing topic as missing.
            hidden = (
                f", or hidden from user {settings.sasl_plain_username!r} by its ACLs (Describe: "
                "`loupe acls` lists them)"
                if settings.sasl_plain_username
                else ""
            )
            raise TopicsMissing(
                f"topics missing on {settings.bootstrap_servers}{hidden}: {', '.join(missing)}; "
                "create them with `loupe topics create` (the compose stack does), or in "
                "development start with `loupe serve --create-topics`"
            )
        if role in ("ingest", "all"):
            for topic in settings.products_topics().among(existing):
                warn_unless_compacted(admin, topic)


def cleanup_policy(settings: Settings, topic: str) -> str:
    """The topic's ``cleanup.policy`` as the broker reports it (``KafkaAdmin.cleanup_policy``)."""
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        return admin.cleanup_policy(topic)


def warn_unless_compacted(admin: KafkaAdmin, topic: str) -> bool:
    """Log a warning if ``topic`` (a products topic) is not compacted; return whether it is."""
    policy = admin.cleanup_policy(topic)
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


def ensure_topics(
    settings: Settings,
    partitions: int = 3,
    replication_factor: int = 1,
    merchants: Iterable[str] = (),
) -> list[str]:
    """Create whichever of Loupe's topics are missing (the products topics compacted); return
    the names created."""
    names = KafkaNames.of(settings)
    specs = [
        TopicSpec(t, partitions, replication_factor, COMPACTED if names.products.holds(t) else {})
        for t in names.all_topics(tuple(merchants))
    ]
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        return admin.create_missing(specs)


def ensure_vectors_topic(settings: Settings, collection: str) -> tuple[str, int]:
    """Create ``collection``'s vectors topic if it is missing (compacted, with the products
    topic's partitions and replicas: as durable as it); returns its name and partition count."""
    topic = KafkaNames.of(settings).vectors_topic(collection)
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        shapes = admin.shapes([settings.products_topic, topic])
        if topic in shapes:
            return topic, shapes[topic].partitions
        products = shapes.get(settings.products_topic, TopicShape(1, 1))
        spec = TopicSpec(topic, products.partitions, products.replication_factor, COMPACTED)
        admin.create_missing([spec])  # or another instance made it a moment ago, alike
        return topic, products.partitions
