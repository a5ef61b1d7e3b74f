"""The index on qdrant-client: a Qdrant server (``url=``), a cluster, or its local mode (``path=``).

``QdrantStore`` is the engine: one client, the alias, the collections and their cards
(collection metadata). ``QdrantIndex`` is a handle on one collection of it. Every write waits
until Qdrant has applied it.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loupe.consumers.errors import (
    IndexAccessRefused,
    IndexCertificateUntrusted,
    IndexUnavailable,
)
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
    Topology,
    check_server_version,
    collection_name,
    filter_conditions,
    to_hit,
)
from loupe.schemas.search import SearchFilters

log = logging.getLogger(__name__)

CARD_KEY = "loupe"  # the collection metadata key that holds its card (consumers/index/catalog.py)
# The live ingest's point-count report, under a key of its own: Qdrant merges metadata updates
# key by key, so writing it leaves the card as it is.
REPORT_KEY = "loupe.report"


class QdrantStore:
    """One qdrant-client and what lives beside the collections: the alias, the cards."""

    def __init__(
        self,
        *,
        path: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        ca: str | Path | None = None,
        prefix: str = "loupe",
        timeout_s: int = 10,
        hnsw_ef: int = DEFAULT_HNSW_EF,
        acorn: bool = DEFAULT_ACORN,
        quantization: Quantization = DEFAULT_QUANTIZATION,
        topology: Topology | None = None,
    ) -> None:
        """``quantization``: for a server's new collections, as ``EdgeIndex``'s (an int8 copy
        in memory, float32 on disk to rescore); local mode searches exactly and ignores it.
        A server's existing collection keeps the storage it was created with. ``topology``:
        how a server's new collections are sharded and replicated (a cluster's). ``api_key``:
        the server's ``service.api_key``; ``ca``: the certificate that signed an ``https://``
        server's (else the system's trust store)."""
        from qdrant_client import QdrantClient

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; expected {QUANTIZATIONS}")
        if (path is None) == (url is None):
            raise ValueError("give exactly one of path (embedded Qdrant) or url (a server)")
        self.hnsw_ef, self.acorn, self.quantization = hnsw_ef, acorn, quantization
        self.topology = topology or Topology()
        self.alias = prefix
        self.embedded = path is not None
        self.url, self.api_key_sent, self.ca = url, api_key is not None, ca
        self._card_lock = threading.RLock()
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
                tls = {"verify": ssl.create_default_context(cafile=str(ca))} if ca else {}
                self.client = QdrantClient(
                    url=url, api_key=api_key, timeout=timeout_s, check_compatibility=False, **tls
                )
        except (RuntimeError, OSError, ValueError) as exc:  # e.g. a path locked by another process
            raise IndexUnavailable(f"cannot open Qdrant at {path or url}: {exc}") from exc
        if url is not None:
            self._check_version(url)

    def _check_version(self, url: str) -> None:
        """Once, at start: is this a server version Loupe supports, and does it take the key
        (and its certificate verify)? A server that does not answer yet is not a reason to fail
        here (every later call retries it); a refused key or certificate is."""
        try:
            version = self.call("info", self.client.info).version
            # "/" answers without a key: a call that needs one says now whether it is right.
            self.call("list aliases", self.client.get_aliases)
        except IndexUnavailable as exc:
            log.warning("the Qdrant server at %s did not say its version: %s", url, exc)
            return
        problem = check_server_version(version)
        if problem is not None:
            log.warning("%s: %s", url, problem)
        else:
            log.info("Qdrant server %s at %s", version, url)

    def call(self, what: str, fn, *args, **kwargs):
        """Run one client call; any failure to reach or use Qdrant is IndexUnavailable (retry)."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            with self._lock:
                return fn(*args, **kwargs)
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise IndexAccessRefused(self._refused(what, exc.status_code)) from None
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise  # our request is wrong: a bug, not an outage
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc
        except (ResponseHandlingException, ConnectionError, TimeoutError, OSError) as exc:
            untrusted = _certificate_error(exc)
            if untrusted is not None:
                raise IndexCertificateUntrusted(self._untrusted(untrusted)) from None
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc
        except RuntimeError as exc:  # the embedded client raises this once closed
            raise IndexUnavailable(f"Qdrant {what} failed: {exc}") from exc

    def _refused(self, what: str, status: int) -> str:
        if status == 403:
            why = "its API key does not allow it (a read-only key?)"
        elif self.api_key_sent:
            why = "it refused the API key"
        else:
            why = "it needs an API key and none was set"
        return (
            f"Qdrant at {self.url} answered {status} to {what}: {why}; set LOUPE_INDEX_API_KEY "
            "to the server's service.api_key"
        )

    def _untrusted(self, error: ssl.SSLCertVerificationError) -> str:
        told = (
            f"LOUPE_INDEX_CA={self.ca} did not sign it"
            if self.ca
            else "set LOUPE_INDEX_CA to the CA certificate that signed it"
        )
        return (
            f"cannot verify the TLS certificate of Qdrant at {self.url} "
            f"({error.verify_message or error.reason}): {told}"
        )

    @property
    def quantized(self) -> bool:
        return self.quantization == "int8" and not self.embedded

    def open(self, model_version: str) -> QdrantIndex:
        """A handle on the collection of ``model_version`` (made by its ``ensure_collection``)."""
        return QdrantIndex(model_version=model_version, store=self)

    # --- the catalog's primitives (consumers/index/catalog.py) ------------------------------------

    def live_collection(self) -> str | None:
        aliases = self.call("get_aliases", self.client.get_aliases).aliases
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
        self.call(
            "update_collection_aliases",
            self.client.update_collection_aliases,
            change_aliases_operations=operations,
        )
        return live

    def collections(self) -> list[str]:
        found = self.call("get_collections", self.client.get_collections).collections
        return sorted(c.name for c in found if c.name.startswith(f"{self.alias}__"))

    def drop_collection(self, collection: str) -> bool:
        if collection == self.live_collection():
            raise ValueError(f"refusing to drop {collection}: the alias {self.alias} points at it")
        return bool(self.call("delete_collection", self.client.delete_collection, collection))

    def read_card(self, collection: str) -> dict[str, Any] | None:
        return self._read_metadata(collection, CARD_KEY)

    def write_card(self, collection: str, card: Mapping[str, Any]) -> None:
        self._write_metadata(collection, CARD_KEY, card)

    def read_report(self, collection: str) -> dict[str, Any] | None:
        return self._read_metadata(collection, REPORT_KEY)

    def write_report(self, collection: str, report: Mapping[str, Any]) -> None:
        self._write_metadata(collection, REPORT_KEY, report)

    def _read_metadata(self, collection: str, key: str) -> dict[str, Any] | None:
        if not self.call("collection_exists", self.client.collection_exists, collection):
            return None
        info = self.call("get_collection", self.client.get_collection, collection)
        return dict((info.config.metadata or {}).get(key) or {}) or None

    def _write_metadata(self, collection: str, key: str, value: Mapping[str, Any]) -> None:
        self.call(
            "update_collection",
            self.client.update_collection,
            collection,
            metadata={key: dict(value)},
        )

    def card_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Serialises this process's read-modify-writes of cards. A server has no lock across
        processes: instances that report at once may overwrite each other's report, which
        only the next report mends (cards hold nothing that a lost write would corrupt)."""
        return self._card_lock

    def close(self) -> None:
        with self._lock:
            self.client.close()


class QdrantIndex:
    """A handle on one model version's collection of a ``QdrantStore`` (``Collection``).

    Without ``store`` it opens a store of its own from the keyword arguments, and closes it
    with itself (a test's, a benchmark's one collection)."""

    def __init__(
        self, *, model_version: str, store: QdrantStore | None = None, **store_options: Any
    ) -> None:
        self._owns_store = store is None
        self.store = store if store is not None else QdrantStore(**store_options)
        self.model_version = model_version
        self.collection = collection_name(self.store.alias, model_version)

    def ensure_collection(self, dims: Mapping[str, int]) -> None:
        """Create this version's collection if missing (the alias stays: ``Catalog``'s)."""
        store = self.store
        if not store.call("collection_exists", store.client.collection_exists, self.collection):
            log.info("creating collection %s (%s)", self.collection, dict(dims))
            self._create(dims)

    def _create(self, dims: Mapping[str, int]) -> None:
        from qdrant_client import models
        from qdrant_client.http.exceptions import UnexpectedResponse

        store, client = self.store, self.store.client
        try:
            store.call(
                "create_collection",
                client.create_collection,
                self.collection,
                vectors_config={
                    view: models.VectorParams(
                        size=int(dims[view]),
                        distance=models.Distance.COSINE,
                        on_disk=store.quantized or None,
                    )
                    for view in VIEWS
                },
                quantization_config=models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True
                    )
                )
                if store.quantized
                else None,
                **({} if store.embedded else store.topology.collection_options()),
            )
        except UnexpectedResponse:
            # Another instance created it between our check and our create (a fleet starting
            # at once): theirs is the same collection. Anything else is ours to report.
            if not store.call("collection_exists", client.collection_exists, self.collection):
                raise
        if store.embedded:  # embedded Qdrant ignores payload indexes (and warns)
            return
        for key, schema in [
            *((k, models.PayloadSchemaType.KEYWORD) for k in KEYWORD_FIELDS),
            *((k, models.PayloadSchemaType.FLOAT) for k in FLOAT_FIELDS),
        ]:
            store.call(
                "create_payload_index", client.create_payload_index, self.collection, key, schema
            )

    def stored_versions(self, ids: Sequence[str]) -> dict[str, int | None]:
        if not ids:
            return {}
        records = self.store.call(
            "retrieve",
            self.store.client.retrieve,
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
        self.store.call(
            "upsert", self.store.client.upsert, self.collection, points=structs, wait=True
        )

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        self.store.call(
            "delete",
            self.store.client.delete,
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
        store = self.store
        # local mode searches exactly (and warns on every search given parameters)
        params = None
        if not store.embedded:
            params = models.SearchParams(
                hnsw_ef=store.hnsw_ef,
                acorn=models.AcornSearchParams(enable=store.acorn),
                quantization=models.QuantizationSearchParams(
                    rescore=True, oversampling=RESCORE_OVERSAMPLING
                )
                if store.quantized
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
        responses = store.call(
            "query_batch_points", store.client.query_batch_points, self.collection, requests
        )
        return [[to_hit(point) for point in response.points] for response in responses]

    def count(self, exact: bool = True) -> int:
        return int(
            self.store.call("count", self.store.client.count, self.collection, exact=exact).count
        )

    def close(self) -> None:
        if self._owns_store:  # a store's handles close with the store that opened them
            self.store.close()


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


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure under ``exc`` (httpx and qdrant-client wrap it)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
