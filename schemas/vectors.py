"""The vectors topic's records: what ingest computed for one product, for index writers to apply.

With encode-once (``LOUPE_ENCODE_ONCE``), the instances that encode publish each product's
vectors once, and every index (each replica's embedded one, a Qdrant server) is written from
these records: N indexes cost one encode, and an index that starts late catches up at index
speed. One compacted topic per collection (``<prefix>.<collection>``), keyed by the product's
point id, so compaction keeps each product's latest record of that model.

The value is JSON in the shape Qdrant's Kafka sink connector reads (``collection_name``, ``id``,
``vector`` as named vectors, ``payload``), plus a ``loupe`` object with what Loupe's own writers
need: the operation, the product's version (the version rule), the model version, and the source
event's position in the products topic. A deleted product is a record with ``"op": "delete"``
and no vectors, not a tombstone: a tombstone carries no version, and compaction would drop it
after ``delete.retention.ms``, so an index that catches up later would keep the deleted product.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loupe.schemas.errors import ErrorCode, InvalidEvent

VECTOR_RECORD_SCHEMA = 1
VIEWS = ("image", "text", "fused")
MAX_VECTOR_RECORD_BYTES = 1024 * 1024  # three float vectors and a payload: tens of KB
MAX_DIMS = 8192


@dataclass(frozen=True)
class SourcePosition:
    """Where in the products topic the event that made a record was."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class VectorRecord:
    """One product of one model: its vectors and payload, or its deletion (``vectors`` None)."""

    collection: str
    point_id: str
    merchant_id: str
    product_id: str
    model_version: str
    version: int | None
    source: SourcePosition
    vectors: Mapping[str, np.ndarray] | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deleted(self) -> bool:
        return self.vectors is None

    def key(self) -> bytes:
        return self.point_id.encode()

    def to_json(self) -> bytes:
        loupe = {
            "schema": VECTOR_RECORD_SCHEMA,
            "op": "delete" if self.deleted else "upsert",
            "merchant_id": self.merchant_id,
            "product_id": self.product_id,
            "model_version": self.model_version,
            "version": self.version,
            "source": {
                "topic": self.source.topic,
                "partition": self.source.partition,
                "offset": self.source.offset,
            },
        }
        value: dict[str, Any] = {"collection_name": self.collection, "id": self.point_id}
        if self.vectors is not None:
            value["vector"] = _VECTORS_HERE
            value["payload"] = dict(self.payload)
        value["loupe"] = loupe
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        if self.vectors is not None:
            text = text.replace(json.dumps(_VECTORS_HERE), _vectors_json(self.vectors), 1)
        return text.encode()


# Where the vectors go in a record's JSON: written apart, with 9 significant digits (what a
# float32 needs to read back as itself), a third shorter than json's 17 for a double.
_VECTORS_HERE = "\u0000vectors"


def _vectors_json(vectors: Mapping[str, np.ndarray]) -> str:
    parts = []
    for view, vector in vectors.items():
        values = np.asarray(vector, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"vector {view} holds a non-finite number")
        parts.append(f'"{view}":[' + ",".join(f"{x:.9g}" for x in values.tolist()) + "]")
    return "{" + ",".join(parts) + "}"


def parse_vector_record(value: bytes | None) -> VectorRecord:
    """A record of the vectors topic, checked; ``InvalidEvent`` names what is wrong."""
    if value is None or not value:
        raise InvalidEvent(ErrorCode.INVALID_ENCODING, "empty value (a tombstone?)")
    if len(value) > MAX_VECTOR_RECORD_BYTES:
        raise InvalidEvent(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"vector record of {len(value)} bytes exceeds {MAX_VECTOR_RECORD_BYTES}",
        )
    try:
        raw = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(ErrorCode.INVALID_JSON, f"vector record is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("loupe"), dict):
        raise _invalid("loupe", "not a Loupe vector record (no `loupe` object)")
    meta = raw["loupe"]
    if meta.get("schema") != VECTOR_RECORD_SCHEMA:
        raise _invalid("loupe.schema", f"unsupported schema {meta.get('schema')!r}")
    source = meta.get("source")
    if not isinstance(source, dict):
        raise _invalid("loupe.source", "missing")
    op = meta.get("op")
    if op not in ("upsert", "delete"):
        raise _invalid("loupe.op", f"must be upsert or delete, got {op!r}")
    version = meta.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise _invalid("loupe.version", "must be an integer or null")
    record = VectorRecord(
        collection=_text(raw, "collection_name"),
        point_id=_text(raw, "id"),
        merchant_id=_text(meta, "merchant_id", "loupe."),
        product_id=_text(meta, "product_id", "loupe."),
        model_version=_text(meta, "model_version", "loupe."),
        version=version,
        source=SourcePosition(
            topic=_text(source, "topic", "loupe.source."),
            partition=_count(source, "partition"),
            offset=_count(source, "offset"),
        ),
        vectors=_vectors(raw.get("vector")) if op == "upsert" else None,
        payload=raw.get("payload") or {} if op == "upsert" else {},
    )
    if not isinstance(record.payload, dict):
        raise _invalid("payload", "must be an object")
    return record


def _vectors(raw: Any) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict) or set(raw) != set(VIEWS):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise _invalid("vector", f"must name the vectors {list(VIEWS)}, got {got}")
    vectors = {}
    for view, values in raw.items():
        if not isinstance(values, list) or not 0 < len(values) <= MAX_DIMS:
            raise _invalid(f"vector.{view}", f"must be a list of 1 to {MAX_DIMS} numbers")
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise _invalid(f"vector.{view}", "must hold finite numbers only")
        vectors[view] = np.asarray(values, dtype=np.float32)
    return vectors


def _text(raw: Mapping[str, Any], name: str, where: str = "") -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value or len(value) > 512:
        raise _invalid(f"{where}{name}", "must be a non-empty string of at most 512 characters")
    return value


def _count(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _invalid(f"loupe.source.{name}", "must be a non-negative integer")
    return value


def _invalid(field_name: str, message: str) -> InvalidEvent:
    return InvalidEvent(ErrorCode.INVALID_EVENT, f"{field_name}: {message}", field=field_name)
