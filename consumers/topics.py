"""Loupe's topics: which a role needs, checking them at start-up, creating them.

The names come from ``Settings`` (whose defaults are the contract's, in ``schemas/``), so the
compose stack's init container runs ``loupe topics create`` instead of repeating them.
"""

from __future__ import annotations

import contextlib
import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from loupe.consumers.errors import LoupeError
from loupe.consumers.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("ingest", "search", "all")


class TopicsMissing(LoupeError):
    """Loupe's topics are not there. Policy: stop at start-up and say which and how to fix."""


def required_topics(settings: Settings, role: str) -> list[str]:
    topics = [settings.deadletter_topic]
    if role in ("ingest", "all"):
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
        raise TopicsMissing(
            f"topics missing on {settings.bootstrap_servers}: {', '.join(missing)}; create them "
            "with `loupe topics create` (the compose stack does), or in development start with "
            "`loupe serve --create-topics`"
        )


def all_topics(settings: Settings) -> list[str]:
    return [
        settings.products_topic,
        settings.search_requests_topic,
        settings.search_responses_topic,
        settings.deadletter_topic,
    ]


def ensure_topics(
    settings: Settings, partitions: int = 3, replication_factor: int = 1
) -> list[str]:
    """Create whichever of Loupe's topics are missing; return the names created."""
    admin = KafkaAdminClient(**settings.kafka_client_config(), client_id="loupe-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
            for t in all_topics(settings)
            if t not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
        return [t.name for t in missing]
    finally:
        admin.close()
