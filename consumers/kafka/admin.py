"""Loupe's one door to Kafka's admin API: listing, creating, describing and deleting topics, and
listing, counting and deleting groups. Every admin client Loupe makes is made here, with the
deployment's connection and security options; the names it is asked about come from
``kafka.names``.

kafka-python's admin answers some failures in-band rather than raising (a topic it cannot
describe comes back with an error code, a config it will not describe comes back empty): the
methods here turn those into return values a caller can read, or into ``LoupeError``s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kafka.errors
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import TopicPartition

from loupe.consumers.errors import TopicConfigUnknown

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
GROUP_LOOKUP_S = 30.0  # how long a group's coordinator may take to appear


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create if it is missing."""

    name: str
    partitions: int
    replication_factor: int = 1
    configs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicShape:
    """What the broker says of an existing topic."""

    partitions: int
    replication_factor: int


class KafkaAdmin:
    """An admin client for one piece of work (``with KafkaAdmin(config) as admin: ...``).

    ``client_config``: ``Settings.kafka_client_config()`` (or a bare
    ``{"bootstrap_servers": ...}`` in development); ``options``: kafka-python's admin options
    (timeouts). Connecting happens here, so a broker that cannot be reached or that refuses
    the credentials raises from the constructor."""

    def __init__(
        self, client_config: Mapping[str, Any], client_id: str = "loupe-admin", **options: Any
    ) -> None:
        self.client = KafkaAdminClient(**client_config, client_id=client_id, **options)

    def __enter__(self) -> KafkaAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def topics(self) -> set[str]:
        """The topics this principal may describe (a broker hides the others)."""
        return set(self.client.list_topics())

    def shapes(self, topics: Sequence[str]) -> dict[str, TopicShape]:
        """The partition count and replication factor of each of ``topics`` that exists."""
        shapes = {}
        for described in self.client.describe_topics(list(topics)):
            partitions = described.get("partitions") or []
            if described.get("error_code") or not partitions:
                continue  # no such topic (or not ours to describe)
            replicas = len(partitions[0].get("replica_nodes") or []) or 1
            shapes[described["name"]] = TopicShape(len(partitions), replicas)
        return shapes

    def create_missing(self, specs: Sequence[TopicSpec]) -> list[str]:
        """Create whichever of ``specs`` do not exist; return the names created. A topic that
        another process made a moment ago counts as there."""
        existing = self.topics()
        missing = [spec for spec in specs if spec.name not in existing]
        if not missing:
            return []
        new = [
            NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=spec.replication_factor,
                topic_configs=dict(spec.configs),
            )
            for spec in missing
        ]
        with contextlib.suppress(TopicAlreadyExistsError):
            self.client.create_topics(new)
        names = [spec.name for spec in missing]
        log.info("created topics %s", names)
        return names

    def cleanup_policy(self, topic: str) -> str:
        """The topic's ``cleanup.policy`` as the broker reports it (``delete``, ``compact``, or
        both, comma-separated); ``TopicConfigUnknown`` if the broker will not say."""
        described = self.client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
        # kafka-python drops a resource's error code: a refused or unknown topic comes back empty.
        entry = described.get("topic", {}).get(topic, {}).get("cleanup.policy")
        if entry is None:
            raise TopicConfigUnknown(
                f"the broker did not describe topic {topic!r} (DescribeConfigs not allowed, or no "
                "such topic)"
            )
        return str(entry["value"])

    def group_members(self, group: str) -> int:
        """How many consumers are members of ``group`` now."""
        deadline = time.monotonic() + GROUP_LOOKUP_S
        while True:
            try:
                described = self.client.describe_groups([group])  # {group: {"members": [...]}}
                break
            except KafkaError as exc:
                # A broker creates its offsets topic, and so its group coordinators, on first
                # use: until then a lookup answers "coordinator not available". Retriable.
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return sum(len(g.get("members") or []) for g in described.values())

    def groups(self) -> set[str]:
        """The consumer groups this principal may describe."""
        return {g["group_id"] for g in self.client.list_groups() if g.get("group_id")}

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """The offsets ``group`` has committed, by partition (none for a group that never
        committed). Raises kafka-python's error while its coordinator is missing or moving."""
        offsets = self.client.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    def create_acls(self, entries: Sequence[Any]) -> None:
        """Create kafka-python ACL ``entries``; the first the broker refuses raises."""
        result = self.client.create_acls(list(entries))
        if result.get("failed"):
            raise KafkaError(f"the broker refused ACLs: {result['failed']}")

    def delete_groups(self, groups: Sequence[str]) -> None:
        """Delete ``groups`` (their committed offsets). A group the broker would not delete
        raises its error (``GroupAuthorizationFailedError``: no Delete ACL)."""
        results = self.client.delete_groups(list(groups))  # {group: "OK" or the error's name}
        for group, result in sorted(results.items()):
            if result != "OK":
                error = getattr(kafka.errors, result, KafkaError)
                raise error(group)  # as the broker names a refused resource
        log.info("deleted groups %s", list(groups))

    def delete_topics(self, topics: Sequence[str]) -> None:
        """Delete ``topics``; the first refusal raises."""
        self.client.delete_topics(list(topics))
        log.info("deleted topics %s", list(topics))

    def answers(self) -> bool:
        """Whether the cluster answers a request now."""
        try:
            self.client.describe_cluster()
            return True
        except (KafkaError, OSError):
            return False
