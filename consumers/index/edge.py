"""The index on Qdrant Edge (PyPI ``qdrant-edge-py``): Qdrant's own Rust engine in this
process, on disk, with a write-ahead log, HNSW and payload indexes.

The same scheme as ``QdrantIndex``: one shard per model version (``<dir>/<collection>``), the
named cosine vectors ``image``, ``text`` and ``fused``, point ids from (merchant, product), and
an alias ``<prefix>`` naming the live collection. Qdrant Edge has no aliases nor collection
metadata, so the alias is a small JSON file replaced atomically (``aliases.json``), and each
collection's card is ``<collection>.card.json`` beside its shard, both changed under an
exclusive lock file. Every call on a shard is serialised; a shard opens in one process at a
time (its write-ahead log holds a lock), so another process may build another collection
beside it (``loupe reindex``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loupe.consumers.errors import IndexUnavailable
from loupe.consumers.index.interface import (
    DEFAULT_ACORN,
    DEFAULT_HNSW_EF,
    DEFAULT_QUANTIZATION,
    FLOAT_FIELDS,
    INT8_QUANTILE,
    KEYWORD_FIELDS,
    QUANTIZATIONS,
    RESCORE_OVERSAMPLING,
    VIEWS,
    IndexHit,
    IndexPoint,
    IndexQuery,
    Quantization,
    collection_name,
    filter_conditions,
    to_hit,
)
from loupe.schemas.search import SearchFilters

log = logging.getLogger(__name__)

ALIASES_FILE = "aliases.json"
CARD_SUFFIX = ".card.json"  # <collection>.card.json beside the shard: what made it, its state
REPORT_SUFFIX = ".report.json"  # the live ingest's point-count report, beside the card


class EdgeStore:
    """The shards under ``path``, the alias file and the cards beside them."""

    def __init__(
        self,
        *,
        path: str,
        prefix: str = "loupe",
        hnsw_ef: int = DEFAULT_HNSW_EF,
        acorn: bool = DEFAULT_ACORN,
        quantization: Quantization = DEFAULT_QUANTIZATION,
    ) -> None:
        """``quantization``: ``none`` keeps every vector as float32 in memory; ``int8`` keeps
        an int8 copy in memory for the search and the float32 vectors on disk (the page cache)
        to rescore its candidates: a quarter of the memory, for a catalog of a million. A shard
        opened with the other setting takes it on: its config is rewritten when it opens, and
        its segments change at the next optimization."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; expected {QUANTIZATIONS}")
        try:
            import qdrant_edge  # noqa: F401  (fail here, clearly, if the package is missing)
        except ImportError:
            raise IndexUnavailable(
                "the embedded HNSW index needs the PyPI package qdrant-edge-py; "
                "pip install qdrant-edge-py"
            ) from None
        self.root = Path(path)
        self.alias = prefix
        self.hnsw_ef, self.acorn = hnsw_ef, acorn
        self.quantization = quantization
        self._files_thread_lock = threading.RLock()
        self._files_lock_depth = 0
        self._files_lock_handle: Any = None

    def open(self, model_version: str) -> EdgeIndex:
        """A handle on the shard of ``model_version`` (opened by its ``ensure_collection``)."""
        return EdgeIndex(model_version=model_version, store=self)

    def close(self) -> None:
        """Nothing to close: each shard closes with its handle."""

    def storage(self) -> dict[str, Any]:
        """How each named vector is stored (``quantization``)."""
        if self.quantization == "none":
            return {}
        from qdrant_edge import Memory, ScalarQuantizationConfig, ScalarType

        return {
            "memory": Memory.Cached,  # float32 on disk, read through the page cache
            "quantization_config": ScalarQuantizationConfig(
                ScalarType.Int8, quantile=INT8_QUANTILE, memory=Memory.Pinned
            ),
        }

    def live_collection(self) -> str | None:
        return self._aliases().get(self.alias)

    def switch_alias(self, collection: str) -> str | None:
        with self.card_lock():
            aliases = self._aliases()
            live = aliases.get(self.alias)
            if live != collection:
                log.info("alias %s -> %s (was %s)", self.alias, collection, live)
                _write_atomically(self.root / ALIASES_FILE, {**aliases, self.alias: collection})
            return live

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and d.name.startswith(f"{self.alias}__")
        )

    def drop_collection(self, collection: str) -> bool:
        """Delete a collection's shard and card. Only a shard no handle has open may go (its
        write-ahead log's lock says so, in this process or another)."""
        if collection == self.live_collection():
            raise ValueError(f"refusing to drop {collection}: the alias {self.alias} points at it")
        shard_dir = self.root / collection
        if not shard_dir.is_dir():
            return False
        if _wal_in_use(shard_dir):
            raise IndexUnavailable(f"cannot drop {collection}: another process has it open")
        # Renamed first, so a crash mid-delete leaves no half shard under the collection's name.
        doomed = self.root / f".dropping.{collection}.{os.getpid()}"
        os.replace(shard_dir, doomed)
        shutil.rmtree(doomed)
        (self.root / f"{collection}{CARD_SUFFIX}").unlink(missing_ok=True)
        (self.root / f"{collection}{REPORT_SUFFIX}").unlink(missing_ok=True)
        log.info("dropped collection %s", collection)
        return True

    def read_card(self, collection: str) -> dict[str, Any] | None:
        return self._read_json(f"{collection}{CARD_SUFFIX}")

    def write_card(self, collection: str, card: Mapping[str, Any]) -> None:
        with self.card_lock():
            _write_atomically(self.root / f"{collection}{CARD_SUFFIX}", dict(card))

    def read_report(self, collection: str) -> dict[str, Any] | None:
        return self._read_json(f"{collection}{REPORT_SUFFIX}")

    def write_report(self, collection: str, report: Mapping[str, Any]) -> None:
        with self.card_lock():
            _write_atomically(self.root / f"{collection}{REPORT_SUFFIX}", dict(report))

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None

    def _aliases(self) -> dict[str, str]:
        try:
            return json.loads((self.root / ALIASES_FILE).read_text())
        except FileNotFoundError:
            return {}

    @contextlib.contextmanager
    def card_lock(self) -> Iterator[None]:
        """Serialise read-modify-writes of the alias and card files, across processes (an
        exclusive flock) and threads; re-entrant within a thread."""
        with self._files_thread_lock:
            if self._files_lock_depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self._files_lock_handle = open(self.root / ".files.lock", "a")  # noqa: SIM115
                fcntl.flock(self._files_lock_handle, fcntl.LOCK_EX)
            self._files_lock_depth += 1
            try:
                yield
            finally:
                self._files_lock_depth -= 1
                if self._files_lock_depth == 0:
                    fcntl.flock(self._files_lock_handle, fcntl.LOCK_UN)
                    self._files_lock_handle.close()


class EdgeIndex:
    """A handle on one model version's shard of an ``EdgeStore`` (``Collection``). Every call on
    it is serialised.

    Without ``store`` it makes a store of its own from the keyword arguments (a test's, a
    benchmark's one collection)."""

    def __init__(
        self, *, model_version: str, store: EdgeStore | None = None, **store_options: Any
    ) -> None:
        self.store = store if store is not None else EdgeStore(**store_options)
        self.model_version = model_version
        self.collection = collection_name(self.store.alias, model_version)
        self._lock = threading.RLock()
        self._shard: Any = None

    def ensure_collection(self, dims: Mapping[str, int]) -> None:
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeShard,
            EdgeVectorParams,
            PayloadSchemaType,
            UpdateOperation,
        )

        shard_dir = self.store.root / self.collection
        config = EdgeConfig(
            vectors={
                view: EdgeVectorParams(
                    size=int(dims[view]), distance=Distance.Cosine, **self.store.storage()
                )
                for view in VIEWS
            }
        )
        with self._lock:
            try:
                if shard_dir.is_dir() and any(shard_dir.iterdir()):
                    self._shard = EdgeShard.load(str(shard_dir), config)
                else:
                    log.info("creating embedded HNSW shard %s (%s)", shard_dir, dict(dims))
                    shard_dir.mkdir(parents=True, exist_ok=True)
                    self._shard = EdgeShard.create(str(shard_dir), config)
                    for key in KEYWORD_FIELDS:
                        self._shard.update(
                            UpdateOperation.create_field_index(key, PayloadSchemaType.Keyword)
                        )
                    for key in FLOAT_FIELDS:
                        self._shard.update(
                            UpdateOperation.create_field_index(key, PayloadSchemaType.Float)
                        )
            except (OSError, RuntimeError, ValueError) as exc:
                raise IndexUnavailable(f"cannot open the shard in {shard_dir}: {exc}") from exc

    def optimize(self) -> bool:
        """Run Qdrant's segment optimizers now (merges segments, builds the HNSW and payload
        indexes); blocks every other call meanwhile. True if anything changed."""
        return bool(self._call("optimize", lambda shard: shard.optimize()))

    def close(self) -> None:
        with self._lock:
            if self._shard is not None:
                self._shard.close()
                self._shard = None

    def _call(self, what: str, fn, *args: Any) -> Any:
        with self._lock:
            if self._shard is None:
                raise IndexUnavailable(f"embedded index {what}: the shard is not open")
            try:
                return fn(self._shard, *args)
            except (OSError, RuntimeError) as exc:
                raise IndexUnavailable(f"embedded index {what} failed: {exc}") from exc

    # --- the Collection interface -------------------------------------------------------------

    def stored_versions(self, ids: Sequence[str]) -> dict[str, int | None]:
        if not ids:
            return {}
        records = self._call(
            "retrieve", lambda shard: shard.retrieve(list(ids), ["version"], False)
        )
        return {str(r.id): (r.payload or {}).get("version") for r in records}

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        from qdrant_edge import Point, UpdateOperation

        if not points:
            return
        structs = [
            Point(
                p.id,
                {view: vec.astype(np.float32).tolist() for view, vec in p.vectors.items()},
                dict(p.payload),
            )
            for p in points
        ]
        # Acknowledged once in the write-ahead log: a crash after this keeps the write.
        self._call("upsert", lambda shard: shard.update(UpdateOperation.upsert_points(structs)))

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_edge import UpdateOperation

        if ids:
            self._call(
                "delete", lambda shard: shard.update(UpdateOperation.delete_points(list(ids)))
            )

    def search_batch(self, queries: Sequence[IndexQuery]) -> list[list[IndexHit]]:
        from qdrant_edge import (
            AcornSearchParams,
            QuantizationSearchParams,
            Query,
            QueryBatchRequest,
            QueryRequest,
            SearchParams,
        )

        if not queries:
            return []
        params = SearchParams(
            hnsw_ef=self.store.hnsw_ef,
            acorn=AcornSearchParams(enable=self.store.acorn),
            # int8 ranks the candidates; the float32 vectors rescore twice the hits asked for
            quantization=QuantizationSearchParams(rescore=True, oversampling=RESCORE_OVERSAMPLING)
            if self.store.quantization != "none"
            else None,
        )
        requests = []
        for query in queries:
            if query.view not in VIEWS:
                raise ValueError(f"unknown view {query.view!r}; expected one of {VIEWS}")
            requests.append(
                QueryRequest(
                    limit=query.top_k,
                    query=Query.Nearest(query.vector.astype(np.float32).tolist(), query.view),
                    filter=_edge_filter(query.merchant_id, query.filters),
                    with_payload=True,
                    with_vector=list(query.with_vectors) or False,
                    params=params,
                )
            )
        results = self._call("query", lambda shard: shard.query_batch(QueryBatchRequest(requests)))
        return [[to_hit(point) for point in points] for points in results]

    def count(self, exact: bool = True) -> int:
        from qdrant_edge import CountRequest

        return int(self._call("count", lambda shard: shard.count(CountRequest(exact=exact))))


def _edge_filter(merchant_id: str | None, filters: SearchFilters) -> Any:
    from qdrant_edge import FieldCondition, Filter, MatchAny, MatchValue, RangeFloat

    must = []
    for kind, key, *values in filter_conditions(merchant_id, filters):
        if kind == "match":
            must.append(FieldCondition(key, match=MatchValue(values[0])))
        elif kind == "any":
            must.append(FieldCondition(key, match=MatchAny(values[0])))
        else:
            gte, lte = values
            must.append(FieldCondition(key, range=RangeFloat(gte=gte, lte=lte)))
    return Filter(must=must) if must else None


def _write_atomically(path: Path, content: Mapping[str, Any]) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _wal_in_use(shard_dir: Path) -> bool:
    """Whether a process holds the shard open: Qdrant's write-ahead log holds an exclusive
    ``flock`` on its directory while the shard is open (a second open fails with WouldBlock)."""
    wal = shard_dir / "wal"
    if not wal.is_dir():
        return False
    handle = os.open(wal, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    finally:
        os.close(handle)
