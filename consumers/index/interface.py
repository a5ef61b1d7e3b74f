"""The vector index's interface, whatever engine holds it: points, queries, payloads, filters.

One collection per model version (vectors from different models are not comparable), with the
named vectors ``image``, ``text`` and ``fused`` (cosine), and an alias ``<prefix>`` pointing at
the live collection so a re-index can switch atomically. Point ids derive from
(merchant_id, product_id), so a replayed event rewrites the same point.

Two engines implement it: Qdrant Edge in this process (``edge_index.py``) and qdrant-client, a
server or its local mode (``qdrant_index.py``). Each has a store (``CollectionStore``: the
alias, the collections and their cards, read through ``consumers/index/catalog.py``) and handles on
one collection each (``Collection``: what ingest writes and search reads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, get_args

import numpy as np

from loupe.schemas.search import SearchFilters

log = logging.getLogger(__name__)

POINT_NAMESPACE = uuid.UUID("5b1f3c52-4c1e-4f57-9d0f-6c6f75706531")  # Loupe's own namespace
VIEWS = ("image", "text", "fused")


def point_id(merchant_id: str, product_id: str) -> str:
    """Deterministic and unambiguous (a JSON pair, so "a/b"+"c" differs from "a"+"b/c")."""
    return str(uuid.uuid5(POINT_NAMESPACE, json.dumps([merchant_id, product_id])))


@dataclass(frozen=True)
class IndexPoint:
    merchant_id: str
    product_id: str
    vectors: Mapping[str, np.ndarray]
    payload: Mapping[str, Any]
    version: int | None = None

    @property
    def id(self) -> str:
        return point_id(self.merchant_id, self.product_id)


@dataclass(frozen=True)
class IndexHit:
    id: str
    score: float
    payload: dict[str, Any]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexQuery:
    """One search of a batch: a vector in one view, its scope and filters."""

    view: str
    vector: np.ndarray
    top_k: int
    merchant_id: str | None
    filters: SearchFilters
    with_vectors: Sequence[str] = ()


@dataclass(frozen=True)
class ProductPayload:
    """What a point carries besides its vectors: written by ingest, read by search, and the
    fields both engines index for filters (``KEYWORD_FIELDS``, ``FLOAT_FIELDS``)."""

    merchant_id: str
    product_id: str
    title: str
    description: str  # the first 500 characters
    attributes: dict[str, Any]
    # Lower-cased copies of the attributes a shopper filters by (keyword indexes).
    category: str | None
    subcategory: str | None
    material: str | None
    price: float | None  # for range filters
    price_amount: str | None  # the exact decimal, for the answer
    currency: str | None
    image_url: str | None
    version: int | None  # the event's, for the version rule on replays
    model_version: str
    event_id: str | None
    indexed_at: str  # ISO 8601

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProductPayload:
        """A stored payload; fields it lacks (a point from an older Loupe) read as empty."""
        values = {name: raw.get(name, empty) for name, empty in _PAYLOAD_EMPTY.items()}
        values["attributes"] = dict(values["attributes"] or {})  # a dict of its own, never None
        return cls(**values)


# Each payload field and what it reads as when a stored point lacks it (once, not per hit).
_PAYLOAD_EMPTY: dict[str, Any] = {
    f.name: {"title": "", "description": ""}.get(f.name) for f in fields(ProductPayload)
}

# The payload fields filters match exactly, and the ones they compare as numbers.
KEYWORD_FIELDS = ("merchant_id", "category", "subcategory", "material", "currency")
FLOAT_FIELDS = ("price",)


class Collection(Protocol):
    """A handle on one model version's collection: what ingest writes and search reads."""

    collection: str
    model_version: str

    # Create (or open) the collection; never moves the alias: only the Catalog does.
    def ensure_collection(self, dims: Mapping[str, int]) -> None: ...
    def stored_versions(self, ids: Sequence[str]) -> dict[str, int | None]: ...
    def upsert(self, points: Sequence[IndexPoint]) -> None: ...
    def delete(self, ids: Sequence[str]) -> None: ...
    def search_batch(self, queries: Sequence[IndexQuery]) -> list[list[IndexHit]]: ...
    def count(self, exact: bool = True) -> int: ...
    def close(self) -> None: ...


class CollectionStore(Protocol):
    """An engine's collections and what lives beside them (the alias, each one's card), in the
    engine's own terms; ``consumers/index/catalog.py`` gives them their meaning."""

    alias: str

    def open(self, model_version: str) -> Collection: ...
    def live_collection(self) -> str | None: ...
    def switch_alias(self, collection: str) -> str | None: ...
    def collections(self) -> list[str]: ...
    def drop_collection(self, collection: str) -> bool: ...
    def read_card(self, collection: str) -> dict[str, Any] | None: ...
    def write_card(self, collection: str, card: Mapping[str, Any]) -> None: ...
    # The live ingest's point-count report, a record of its own beside the card: its writer
    # never rewrites the card's state (a reindex in another process may be retiring it).
    def read_report(self, collection: str) -> dict[str, Any] | None: ...
    def write_report(self, collection: str, report: Mapping[str, Any]) -> None: ...
    def card_lock(self) -> contextlib.AbstractContextManager[Any]: ...
    def close(self) -> None: ...


# How the engines that search a graph (Qdrant Edge, a Qdrant server; qdrant-client's local mode
# searches exactly) search it. ``hnsw_ef``: the search breadth (Qdrant's default follows
# ef_construct, 100). ACORN: under a selective filter, also walk the neighbours of neighbours the
# filter removed; it rescues filters unrelated to what the photo shows, at a cost that grows with
# the catalog, so it is off. Both chosen with bench.index_scale; the measurements are in
# docs/architecture.md, "Index engines".
DEFAULT_HNSW_EF = 128
DEFAULT_ACORN = False
# How Edge and a server store a new collection's vectors: none (float32 in memory) or int8 (an
# int8 copy in memory ranks, the float32 vectors on disk rescore): a quarter of the memory and
# the same top ten (measured in docs/architecture.md, "Index engines").
Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
DEFAULT_QUANTIZATION: Quantization = "int8"
# int8's details, the same for both engines: the share of values its range covers (outliers are
# clipped), and how many candidates per hit asked for the float32 vectors rescore.
INT8_QUANTILE = 0.99
RESCORE_OVERSAMPLING = 2.0

# The Qdrant server versions Loupe supports: tested against 1.18 (the test suite's server and
# the compose stack's), and the client it locks (1.20) speaks to servers one minor version
# either side of its own.
SUPPORTED_SERVER_VERSIONS = ((1, 18), (1, 21))  # [from, to] minor versions, inclusive


def check_server_version(version: str) -> str | None:
    """None if Loupe supports a Qdrant server of ``version``, else what to do about it."""
    first, last = SUPPORTED_SERVER_VERSIONS
    supported = f"{first[0]}.{first[1]} to {last[0]}.{last[1]}"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"cannot read the Qdrant server's version {version!r}; Loupe supports {supported}"
    if first <= (major, minor) <= last:
        return None
    return (
        f"the Qdrant server is {version}; Loupe supports {supported} (qdrant-client may send "
        "requests it does not understand): run a supported server"
    )


@dataclass(frozen=True)
class Topology:
    """How a Qdrant server's collections are spread over a cluster: ``shards`` per collection,
    each held by ``replication_factor`` peers, a write acknowledged once ``write_consistency``
    of them applied it. The defaults fit a single node."""

    shards: int = 1
    replication_factor: int = 1
    write_consistency: int = 1

    def __post_init__(self) -> None:
        if min(self.shards, self.replication_factor, self.write_consistency) < 1:
            raise ValueError(f"every part of the topology must be at least 1: {self}")
        if self.write_consistency > self.replication_factor:
            raise ValueError(
                f"write_consistency ({self.write_consistency}) cannot exceed "
                f"replication_factor ({self.replication_factor})"
            )

    def collection_options(self) -> dict[str, int]:
        return {
            "shard_number": self.shards,
            "replication_factor": self.replication_factor,
            "write_consistency_factor": self.write_consistency,
        }


def collection_name(prefix: str, model_version: str) -> str:
    name = f"{prefix}__{model_version}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:255]


def to_hit(point: Any) -> IndexHit:
    """A scored point of either client (they share these attribute names) as an ``IndexHit``."""
    stored = point.vector if isinstance(point.vector, dict) else {}
    return IndexHit(
        id=str(point.id),
        score=float(point.score),
        payload=dict(point.payload or {}),
        vectors={k: np.asarray(v, dtype=np.float32) for k, v in stored.items()},
    )


def _hits(points: Sequence[Any]) -> list[IndexHit]:
    return [to_hit(point) for point in points]


def filter_conditions(merchant_id: str | None, filters: SearchFilters) -> list[tuple]:
    """Merchant scope and a request's filters as backend-neutral conditions, each one of
    ``("match", key, value)``, ``("any", key, values)`` or ``("range", key, gte, lte)``; every
    backend turns them into its own filter, so all of them filter alike."""
    conditions: list[tuple] = []
    if merchant_id is not None:
        conditions.append(("match", "merchant_id", merchant_id))
    for key in ("category", "subcategory", "material"):
        values = getattr(filters, key)
        if values:
            conditions.append(("any", key, [v.lower() for v in values]))
    if filters.price_min is not None or filters.price_max is not None:
        conditions.append(("range", "price", filters.price_min, filters.price_max))
    if filters.currency is not None:
        conditions.append(("match", "currency", filters.currency))
    for key, value in filters.attributes.items():
        if isinstance(value, bool | str) or float(value).is_integer():
            exact = value if not isinstance(value, float) else int(value)
            conditions.append(("match", f"attributes.{key}", exact))
        else:
            conditions.append(("range", f"attributes.{key}", value, value))
    return conditions
