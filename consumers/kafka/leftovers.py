"""What Kafka keeps of collections the index no longer has: their vectors topics (encode-once)
and their encoders', index writers' and reindexes' groups (``kafka.names``).

A running service drops a retired collection once its grace is over, from its own index. The
Kafka side is shared (every replica's encoders write one vectors topic, and a replica whose
index still holds the collection reads it), and deleting needs rights the service's principals
do not have, so the operator removes it: ``loupe collections --prune``.

A leftover is named after a collection under the index's prefix that the index does not hold.
One that a running consumer still reads (a group with members: another replica still on that
model, say) is kept, with the topic it reads, and reported as busy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from loupe.consumers.kafka.admin import KafkaAdmin
from loupe.consumers.kafka.names import DIGEST_TAIL, ENCODE, INDEX, REINDEX, KafkaNames
from loupe.consumers.kafka.products_topics import MAX_TOPIC_NAME


@dataclass
class Leftovers:
    topics: list[str] = field(default_factory=list)  # to delete
    groups: list[str] = field(default_factory=list)  # to delete
    busy: list[str] = field(default_factory=list)  # groups with members, and what they keep

    def __bool__(self) -> bool:
        return bool(self.topics or self.groups)


def find_leftovers(
    admin: KafkaAdmin, names: KafkaNames, index_prefix: str, collections: Iterable[str]
) -> Leftovers:
    """The vectors topics and groups of collections named ``<index_prefix>__...`` that are not
    among ``collections`` (what the index holds: live, building or retired)."""
    known = set(collections)
    ours = f"{index_prefix}__"
    held = {names.vectors_topic(c) for c in known}
    topics = {
        topic
        for topic in admin.topics()
        if topic.startswith(names.vectors_prefix + ours) and topic not in held
    }
    groups: dict[str, str] = {}  # leftover group -> what follows its worker's prefix
    for group in admin.groups():
        for worker in (ENCODE, INDEX, REINDEX):
            prefix = names.groups_of(worker)
            rest = group[len(prefix) :]
            if group.startswith(prefix + ours) and not _of_any(rest, known):
                groups[group] = rest
    found = Leftovers()
    busy_rests = []
    for group, rest in sorted(groups.items()):
        if admin.group_members(group):
            found.busy.append(group)
            busy_rests.append(rest)
        else:
            found.groups.append(group)
    for topic in sorted(topics):
        if any(_reads(rest, topic, names.vectors_prefix) for rest in busy_rests):
            found.busy.append(topic)
        else:
            found.topics.append(topic)
    return found


def delete_leftovers(admin: KafkaAdmin, leftovers: Leftovers) -> None:
    """Delete ``leftovers``' groups, then its topics: the data goes last, so that a failure
    midway leaves it (and a second run finds what is left)."""
    if leftovers.groups:
        admin.delete_groups(leftovers.groups)
    if leftovers.topics:
        admin.delete_topics(leftovers.topics)


def _of_any(rest: str, collections: set[str]) -> bool:
    """Whether a group's name after its worker's prefix (``<collection>`` or, for a replica,
    ``<collection>.<replica>``) is one of ``collections``'s."""
    return any(rest == c or rest.startswith(c + ".") for c in collections)


def _reads(group_rest: str, topic: str, vectors_prefix: str) -> bool:
    """Whether a group named ``...<group_rest>`` is one of the collection whose vectors topic is
    ``topic`` (a name cut to Kafka's limit matches by its head)."""
    part = topic[len(vectors_prefix) :]
    if group_rest == part or group_rest.startswith(part + "."):
        return True
    cut = len(topic) == MAX_TOPIC_NAME
    return cut and group_rest.startswith(part[:-DIGEST_TAIL])  # a cut name: only its head
