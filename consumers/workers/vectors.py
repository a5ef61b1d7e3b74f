"""Encode once, index many: the vectors topics between the encoders and the index writers.

Each collection has its own compacted topic, ``<LOUPE_VECTORS_TOPIC>.<collection>`` (record
format: ``schemas/vectors.py``). Two consumer groups per collection keep the hop exactly once
(their names: ``kafka.names``):

- the encoders, ``<group>.encode.<collection>``, shared by every instance that serves that
  collection (replicas included), read the products topic and publish each product's vectors
  in the same transaction as their offsets: each event is encoded once, whatever the number of
  indexes;
- the index writers, ``<group>.index.<collection>`` (``.<replica>`` added for a replica), read
  the vectors topic with ``read_committed`` and apply it to their index with the version rule:
  replays are idempotent, so at least once is exactly once for the index.

A group per collection is what makes the reindex hand-over simple: after a switch, the encoders
join the new collection's group, which starts where the reindex stopped (the card's applied
offsets) unless it has committed offsets of its own; the writers join the new collection's
topic, which holds every product of that model (the reindex publishes what it encodes too). A
rollback goes back to the old groups, which resume where they left off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from loupe.consumers.index.catalog import Catalog
from loupe.consumers.index.interface import IndexPoint
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.kafka.publisher import Publisher
from loupe.schemas.vectors import SourcePosition, VectorRecord

log = logging.getLogger(__name__)


class VectorsOut:
    """Publishes a batch's vector records with the batch (``Publisher.send``), so they become
    visible with its offsets, in one transaction when the publisher has one."""

    def __init__(self, publisher: Publisher, topic: str, collection: str, partitions: int) -> None:
        self.publisher = publisher
        self.topic = topic
        self.collection = collection
        self.partitions = partitions

    def upsert(self, record, point: IndexPoint, model_version: str) -> None:
        """``record``: the products-topic record that ``point`` was made from."""
        self._send(
            record,
            point.id,
            point.merchant_id,
            point.product_id,
            point.version,
            model_version,
            vectors=point.vectors,
            payload=point.payload,
        )

    def delete(self, record, point_id: str, event, model_version: str) -> None:
        self._send(
            record, point_id, event.merchant_id, event.product_id, event.version, model_version
        )

    def _send(
        self,
        source,
        point_id: str,
        merchant_id: str,
        product_id: str,
        version: int | None,
        model_version: str,
        **vectors_and_payload,
    ) -> None:
        record = VectorRecord(
            collection=self.collection,
            point_id=point_id,
            merchant_id=merchant_id,
            product_id=product_id,
            model_version=model_version,
            version=version,
            source=SourcePosition(source.topic, source.partition, source.offset),
            **vectors_and_payload,
        )
        # The products partition's records stay in order in one vectors partition: a writer
        # that has read a vectors partition to offset N has applied its source up to a point.
        partition = source.partition % self.partitions
        self.publisher.send(self.topic, record.key(), record.to_json(), [], partition=partition)


def unplaced_start(
    catalog: Catalog,
    collection: str,
    consumer: KafkaConsumer,
    partitions: Iterable[TopicPartition],
    products: ProductsTopics,
) -> Mapping[TopicPartition, int]:
    """For an encoders' group: the partitions it has no committed offset for, and where they
    start: where ``collection``'s card says its products are applied up to, if a reindex built
    it that far and published those vectors (``vectors_topic``); else nothing: the group starts
    at the beginning, and its records fill the vectors topic."""
    card = catalog.card(collection)
    published = card is not None and card.vectors_topic is not None
    applied = card.applied_offsets_in(products) if published else {}
    starts = {}
    for tp in partitions:
        if tp in applied and consumer.committed(tp) is None:
            starts[tp] = applied[tp]
    return starts
