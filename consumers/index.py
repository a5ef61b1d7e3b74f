"""The vector index: Qdrant, embedded (``path=``) or a server (``url=``), behind a small interface.

One collection per model version (vectors from different models are not comparable), with the
named vectors ``image``, ``text`` and ``fused`` (cosine), and an alias ``<prefix>`` pointing at
the live collection so a re-index can switch atomically. Point ids derive from
(merchant_id, product_id), so a replayed event rewrites the same point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np

from loupe.consumers.errors import IndexUnavailable
from loupe.schemas.search import SearchFilters

log = logging.getLogger(__name__)

POINT_NAMESPACE = uuid.UUID("5b1f3c52-4c1e-4f57-9d0f-6c6f75706531")  # Loupe's own namespace
VIEWS = ("image", "text", "fused")
FILTER_KEYWORDS = ("merchant_id", "category", "subcategory", "material", "currency")


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


class VectorIndex(Protocol):
    """What the consumers need from an index; a second backend implements just this."""

    collection: str
    model_version: str

    def ensure_collection(self, dims: Mapping[str, int], *, make_live: bool = True) -> None: ...
    def stored_versions(self, ids: Sequence[str]) -> dict[str, int | None]: ...
    def upsert(self, points: Sequence[IndexPoint]) -> None: ...
    def delete(self, ids: Sequence[str]) -> None: ...
    def search_batch(self, queries: Sequence[IndexQuery]) -> list[list[IndexHit]]: ...
    def count(self, exact: bool = True) -> int: ...
    def close(self) -> None: ...

    # The lifecycle of collections (consumers/lifecycle.py): which one is live, what each is.
    def for_version(self, model_version: str) -> VectorIndex: ...
    def live_collection(self) -> str | None: ...
    def switch_alias(self, collection: str) -> str | None: ...
    def collections(self) -> list[str]: ...
    def drop_collection(self, collection: str) -> bool: ...
    def read_card(self, collection: str) -> dict[str, Any] | None: ...
    def write_card(self, collection: str, card: Mapping[str, Any]) -> None: ...
    def card_lock(self) -> contextlib.AbstractContextManager[Any]: ...


# How the engines that search a graph (Qdrant Edge, a Qdrant server; qdrant-client's local mode
# searches exactly) search it. ``hnsw_ef``: the search breadth (Qdrant's default follows
# ef_construct, 100). 128: at a million clustered points 64 found 0.968 of the exact top ten
# and 128 found 0.999 (filtered: 0.994 and 1.000), at a p99 of 3.5 ms; at 100k both found all.
# ACORN: under a selective filter, also walk the neighbours of neighbours the filter removed
# (Qdrant applies it only when the filter keeps under 40% of the points): it rescues filters
# unrelated to what the photo shows, at a cost that grows with the catalog, so it is off.
# Chosen with bench.index_scale (docs/architecture.md, "Index engines").
DEFAULT_HNSW_EF = 128
DEFAULT_ACORN = False
# How Edge and a server store a new collection's vectors: none (float32 in memory) or int8 (an
# int8 copy in memory ranks, the float32 vectors on disk rescore). int8: a quarter of the
# memory, an HNSW build 3.5 times faster (13 s against 49 s at 20k points) and the same top
# ten, which is what lets one machine hold a million products (docs/architecture.md).
Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
DEFAULT_QUANTIZATION: Quantization = "int8"
# int8's details, the same for both engines: the share of values its range covers (outliers are
# clipped), and how many candidates per hit asked for the float32 vectors rescore.
INT8_QUANTILE = 0.99
RESCORE_OVERSAMPLING = 2.0

CARD_KEY = "loupe"  # the collection metadata key that holds its card (consumers/lifecycle.py)


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


class QdrantIndex:
    """``VectorIndex`` over qdrant-client. Every write waits until Qdrant has applied it."""

    def __init__(
        self,
        *,
        model_version: str,
        path: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        prefix: str = "loupe",
        timeout_s: int = 10,
        hnsw_ef: int = DEFAULT_HNSW_EF,
        acorn: bool = DEFAULT_ACORN,
        quantization: Quantization = DEFAULT_QUANTIZATION,
        topology: Topology | None = None,
        _shared: QdrantIndex | None = None,
    ) -> None:
        """``quantization``: for a server's new collections, as ``EdgeIndex``'s (an int8 copy
        in memory, float32 on disk to rescore); local mode searches exactly and ignores it.
        A server's existing collection keeps the storage it was created with. ``topology``:
        how a server's new collections are sharded and replicated (a cluster's)."""
        from qdrant_client import QdrantClient

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; expected {QUANTIZATIONS}")
        self.hnsw_ef, self.acorn, self.quantization = hnsw_ef, acorn, quantization
        self.topology = topology or Topology()
        self.alias = prefix
        self.collection = collection_name(prefix, model_version)
        self.model_version = model_version
        if _shared is not None:  # a sibling collection on the same client (for_version)
            self.embedded, self._lock, self.client = _shared.embedded, _shared._lock, _shared.client
            self._card_lock = _shared._card_lock
            self._owns_client = False
            return
        self._owns_client = True
        self._card_lock = threading.RLock()
        if (path is None) == (url is None):
            raise ValueError("give exactly one of path (embedded Qdrant) or url (a server)")
        self.embedded = path is not None
        # qdrant-client's embedded mode is not safe for concurrent use: an upsert in one thread
        # during a search in another raised IndexError in its payload-mask code. Every call on
        # it is serialised; a server does its own concurrency control.
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self.embedded else contextlib.nullcontext()
        )
        try:
            if path is not None:
                self.client = QdrantClient(path=path)
            else:
                # Loupe checks the server's version itself, once, against the versions it
                # supports (check_server_version), instead of the client's warning per start.
                self.client = QdrantClient(
                    url=url, api_key=api_key, timeout=timeout_s, check_compatibility=False
                )
        except (RuntimeError, OSError, ValueError) as exc:  # e.g. a path locked by another process
            raise IndexUnavailable(f"cannot open Qdrant at {path or url}: {exc}") from exc
        if url is not None:
            self._check_version(url)

    def _check_version(self, url: str) -> None:
        """Once, at start: is this a server version Loupe supports? A server that does not
        answer yet is not a reason to fail here (every later call retries it)."""
        try:
            version = self._call("info", self.client.info).version
        except IndexUnavailable as exc:
            log.warning("the Qdrant server at %s did not say its version: %s", url, exc)
            return
        problem = check_server_version(version)
        if problem is not None:
            log.warning("%s: %s", url, problem)
        else:
            log.info("Qdrant server %s at %s", version, url)

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one client call; any failure to reach or use Qdrant is IndexUnavailable (retry)."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            with self._lock:
                return fn(*args, **kwargs)
        except UnexpectedResponse as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise  # our request is wrong: a bug, not an outage
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc
        except (ResponseHandlingException, ConnectionError, TimeoutError, OSError) as exc:
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc
        except RuntimeError as exc:  # the embedded client raises this once closed
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc

    def ensure_collection(self, dims: Mapping[str, int], *, make_live: bool = True) -> None:
        """Create this version's collection if missing; with ``make_live``, point the alias at
        it when the alias points nowhere or elsewhere (a re-index passes False: it switches
        only once the new collection has caught up)."""
        if not self._call("collection_exists", self.client.collection_exists, self.collection):
            log.info("creating collection %s (%s)", self.collection, dict(dims))
            self._create(dims)
        if make_live and self.live_collection() != self.collection:
            self.switch_alias(self.collection)

    def _create(self, dims: Mapping[str, int]) -> None:
        from qdrant_client import models
        from qdrant_client.http.exceptions import UnexpectedResponse

        try:
            self._call(
                "create_collection",
                self.client.create_collection,
                self.collection,
                vectors_config={
                    view: models.VectorParams(
                        size=int(dims[view]),
                        distance=models.Distance.COSINE,
                        on_disk=self._quantized or None,
                    )
                    for view in VIEWS
                },
                quantization_config=models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True
                    )
                )
                if self._quantized
                else None,
                **({} if self.embedded else self.topology.collection_options()),
            )
        except UnexpectedResponse:
            # Another instance created it between our check and our create (a fleet starting
            # at once): theirs is the same collection. Anything else is ours to report.
            if not self._call("collection_exists", self.client.collection_exists, self.collection):
                raise
        if not self.embedded:  # embedded Qdrant ignores payload indexes (and warns)
            for key in FILTER_KEYWORDS:
                self._call(
                    "create_payload_index",
                    self.client.create_payload_index,
                    self.collection,
                    key,
                    models.PayloadSchemaType.KEYWORD,
                )
            self._call(
                "create_payload_index",
                self.client.create_payload_index,
                self.collection,
                "price",
                models.PayloadSchemaType.FLOAT,
            )

    def for_version(self, model_version: str) -> QdrantIndex:
        return QdrantIndex(
            model_version=model_version,
            prefix=self.alias,
            topology=self.topology,
            hnsw_ef=self.hnsw_ef,
            acorn=self.acorn,
            quantization=self.quantization,
            _shared=self,
        )

    @property
    def _quantized(self) -> bool:
        return self.quantization == "int8" and not self.embedded

    def live_collection(self) -> str | None:
        aliases = self._call("get_aliases", self.client.get_aliases).aliases
        return {a.alias_name: a.collection_name for a in aliases}.get(self.alias)

    def switch_alias(self, collection: str) -> str | None:
        """Point the alias at ``collection`` in one atomic operation; returns where it pointed."""
        from qdrant_client import models

        live = self.live_collection()
        if live == collection:
            return live
        log.info("alias %s -> %s (was %s)", self.alias, collection, live)
        operations: list[Any] = []
        if live is not None:
            operations.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.alias))
            )
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=self.alias)
            )
        )
        self._call(
            "update_collection_aliases",
            self.client.update_collection_aliases,
            change_aliases_operations=operations,
        )
        return live

    def collections(self) -> list[str]:
        found = self._call("get_collections", self.client.get_collections).collections
        return sorted(c.name for c in found if c.name.startswith(f"{self.alias}__"))

    def drop_collection(self, collection: str) -> bool:
        if collection == self.live_collection():
            raise ValueError(f"refusing to drop {collection}: the alias {self.alias} points at it")
        return bool(self._call("delete_collection", self.client.delete_collection, collection))

    def read_card(self, collection: str) -> dict[str, Any] | None:
        if not self._call("collection_exists", self.client.collection_exists, collection):
            return None
        info = self._call("get_collection", self.client.get_collection, collection)
        return dict((info.config.metadata or {}).get(CARD_KEY) or {}) or None

    def card_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialises this process's read-modify-writes of cards. A server has no lock across
        processes: instances that report at once may overwrite each other's report, which
        only the next report mends (cards hold nothing that a lost write would corrupt)."""
        return self._card_lock

    def write_card(self, collection: str, card: Mapping[str, Any]) -> None:
        self._call(
            "update_collection",
            self.client.update_collection,
            collection,
            metadata={CARD_KEY: dict(card)},
        )

    def stored_versions(self, ids: Sequence[str]) -> dict[str, int | None]:
        if not ids:
            return {}
        records = self._call(
            "retrieve",
            self.client.retrieve,
            self.collection,
            ids=list(ids),
            with_payload=["version"],
            with_vectors=False,
        )
        return {str(r.id): (r.payload or {}).get("version") for r in records}

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        from qdrant_client import models

        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.id,
                vector={view: vec.astype(np.float32).tolist() for view, vec in p.vectors.items()},
                payload=dict(p.payload),
            )
            for p in points
        ]
        self._call("upsert", self.client.upsert, self.collection, points=structs, wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        self._call(
            "delete",
            self.client.delete,
            self.collection,
            points_selector=models.PointIdsList(points=list(ids)),
            wait=True,
        )

    def search_batch(self, queries: Sequence[IndexQuery]) -> list[list[IndexHit]]:
        """Several searches (any views, each with its own filters) in one call to Qdrant."""
        from qdrant_client import models

        if not queries:
            return []
        for query in queries:
            if query.view not in VIEWS:
                raise ValueError(f"unknown view {query.view!r}; expected one of {VIEWS}")
        # local mode searches exactly (and warns on every search given parameters)
        params = None
        if not self.embedded:
            params = models.SearchParams(
                hnsw_ef=self.hnsw_ef,
                acorn=models.AcornSearchParams(enable=self.acorn),
                quantization=models.QuantizationSearchParams(
                    rescore=True, oversampling=RESCORE_OVERSAMPLING
                )
                if self._quantized
                else None,
            )
        requests = [
            models.QueryRequest(
                query=query.vector.astype(np.float32).tolist(),
                using=query.view,
                filter=build_filter(query.merchant_id, query.filters),
                limit=query.top_k,
                with_payload=True,
                with_vector=list(query.with_vectors) or False,
                params=params,
            )
            for query in queries
        ]
        responses = self._call(
            "query_batch_points", self.client.query_batch_points, self.collection, requests
        )
        return [_hits(response.points) for response in responses]

    def count(self, exact: bool = True) -> int:
        return int(self._call("count", self.client.count, self.collection, exact=exact).count)

    def close(self) -> None:
        if self._owns_client:  # a sibling's client closes with the index that opened it
            with self._lock:
                self.client.close()


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


def build_filter(merchant_id: str | None, filters: SearchFilters):
    """Merchant scope and the request's filters as one Qdrant filter (None when empty)."""
    from qdrant_client import models

    must: list[Any] = []
    for kind, key, *values in filter_conditions(merchant_id, filters):
        if kind == "match":
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=values[0])))
        elif kind == "any":
            must.append(models.FieldCondition(key=key, match=models.MatchAny(any=values[0])))
        else:
            gte, lte = values
            must.append(models.FieldCondition(key=key, range=models.Range(gte=gte, lte=lte)))
    return models.Filter(must=must) if must else None
