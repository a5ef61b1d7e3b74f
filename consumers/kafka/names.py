"""Every name Loupe gives Kafka, written once: its topics, the consumer group of each worker (per
collection and per replica where the worker needs one) and its transactional ids.

The workers, ``loupe acls`` (which grants by these names' prefixes) and the tests all read them
here, so that a name cannot change in one place and not in another. Creating and describing
topics and groups is ``kafka_admin.KafkaAdmin``'s.

Consumer groups, ``<LOUPE_GROUP_ID>.<worker>[...]``:
- ``ingest``: the products consumer that writes the index; one for every instance that writes a
  shared index, or one per replica (``.<replica_id>``: each indexes the whole catalog into its
  own);
- ``search``: the requests consumer, shared by every instance, replicas included (a request is
  answered once);
- ``encode.<collection>`` (encode-once): the encoders of a collection, shared by every instance:
  each event is encoded once, whatever the number of indexes;
- ``index.<collection>`` (encode-once): the writers of one index, per replica;
- ``reindex.<collection>``: ``loupe reindex`` building a collection, per replica.

Transactional ids, ``<LOUPE_GROUP_ID>.<worker>.<host>.<pid>``: unique among live processes; a
restarted container (same host name, same pid 1) reuses its predecessor's, which aborts the
transaction that one left open instead of waiting it out.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loupe.consumers.kafka.products_topics import MAX_TOPIC_NAME, ProductsTopics

if TYPE_CHECKING:
    from loupe.consumers.settings import Settings

# The workers that name a group or a transactional id.
INGEST, SEARCH, ENCODE, INDEX, REINDEX = "ingest", "search", "encode", "index", "reindex"
# A topic name past Kafka's limit is cut and ends in "." and a 16-hex digest of the whole name.
DIGEST_TAIL = 17


@dataclass(frozen=True)
class KafkaNames:
    """The names of one deployment (``KafkaNames.of(settings)``)."""

    group_id: str  # LOUPE_GROUP_ID: the first part of every group and transactional id
    replica_id: str | None  # a replica with an index of its own, or None (one shared index)
    products: ProductsTopics
    search_requests: str
    search_responses: str
    dead_letters: str
    vectors: str  # LOUPE_VECTORS_TOPIC: the vectors topics are ``<vectors>.<collection>``

    @classmethod
    def of(cls, settings: Settings) -> KafkaNames:
        return cls(
            group_id=settings.group_id,
            replica_id=settings.replica_id,
            products=settings.products_topics(),
            search_requests=settings.search_requests_topic,
            search_responses=settings.search_responses_topic,
            dead_letters=settings.deadletter_topic,
            vectors=settings.vectors_topic,
        )

    # --- consumer groups ----------------------------------------------------------------

    def ingest_group(self) -> str:
        return self._of_index(INGEST)

    def search_group(self) -> str:
        return f"{self.group_id}.{SEARCH}"

    def encode_group(self, collection: str) -> str:
        return f"{self.group_id}.{ENCODE}.{collection}"

    def index_group(self, collection: str) -> str:
        return self._of_index(f"{INDEX}.{collection}")

    def reindex_group(self, collection: str) -> str:
        return self._of_index(f"{REINDEX}.{collection}")

    def _of_index(self, name: str) -> str:
        """A group that writes an index: a replica's own (``.<replica_id>``), as it writes an
        index of its own."""
        group = f"{self.group_id}.{name}"
        return group if self.replica_id is None else f"{group}.{self.replica_id}"

    def groups_of(self, worker: str) -> str:
        """The prefix every group of ``worker`` starts with (what an ACL grants by)."""
        if worker == INGEST:  # the ingest's group, or a replica's ingest.<replica_id>
            return f"{self.group_id}.{INGEST}"
        return f"{self.group_id}.{worker}."

    # --- transactional ids --------------------------------------------------------------

    def transactional_id(self, worker: str) -> str:
        """This process's transactional id for ``worker``'s producer."""
        return f"{self.transactional_ids_of(worker)}{socket.gethostname()}.{os.getpid()}"

    def transactional_ids_of(self, worker: str) -> str:
        """The prefix every transactional id of ``worker`` starts with."""
        return f"{self.group_id}.{worker}."

    # --- topics -------------------------------------------------------------------------

    def vectors_topic(self, collection: str) -> str:
        """The vectors topic of ``collection`` (a collection name is a valid topic name; a long
        one is shortened with a digest, so that two never share a topic)."""
        name = f"{self.vectors}.{collection}"
        if len(name) <= MAX_TOPIC_NAME:
            return name
        digest = hashlib.sha256(name.encode()).hexdigest()[: DIGEST_TAIL - 1]
        return f"{name[: MAX_TOPIC_NAME - DIGEST_TAIL]}.{digest}"

    @property
    def vectors_prefix(self) -> str:
        return f"{self.vectors}."

    def own_topics(self) -> list[str]:
        """Loupe's own topics that no search answer may be written to (with every topic under
        ``vectors_prefix``)."""
        return [self.products.base, self.search_requests, self.dead_letters]

    def required(self, role: str) -> list[str]:
        """The topics ``role`` (ingest, search, all) needs before it starts (per merchant, a
        merchant's products topic is read once it exists: none is required)."""
        topics = [self.dead_letters]
        if role in ("ingest", "all") and not self.products.per_merchant:
            topics.append(self.products.base)
        if role in ("search", "all"):
            topics += [self.search_requests, self.search_responses]
        return topics

    def catalog_topics(self, merchants: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The products topic; per merchant, the products topics of ``merchants``."""
        if self.products.per_merchant:
            return [self.products.merchant_topic(m) for m in merchants]
        return [self.products.base]

    def all_topics(self, merchants: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Loupe's topics that ``loupe topics create`` makes (vectors topics are made by the
        workers that use them)."""
        return [
            *self.catalog_topics(merchants),
            self.search_requests,
            self.search_responses,
            self.dead_letters,
        ]
