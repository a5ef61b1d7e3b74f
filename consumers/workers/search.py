"""The search consumer: every request gets exactly one visible answer, then its offset commits.

A request is encoded (photo, text or both), searched in the view that fits (image only ->
``image``, text only -> ``text``, both -> ``fused``, with the image view's best match first;
a photo alone can keep that match's kind after it: ``ranking.py``) within the merchant scope
and filters, and answered on ``reply_to`` or the default response topic, keyed and correlated
by ``request_id``.
A request that cannot be served is answered with ``status: "error"`` and also dead-lettered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from kafka import KafkaConsumer
from kafka.errors import TopicAuthorizationFailedError

from loupe.consumers.errors import (
    IndexUnavailable,
    ItemFailed,
    ModelRejected,
    TopicConfigUnknown,
    UnexpectedItemError,
)
from loupe.consumers.index.interface import IndexHit, IndexQuery, ProductPayload
from loupe.consumers.kafka.io import TRANSIENT_KAFKA, Abandoned
from loupe.consumers.kafka.reply_topics import KnownTopics, ReplyGate, ReplyTopics
from loupe.consumers.workers.batch import BatchWorker, WorkerBasics, refused
from loupe.consumers.workers.image_fetch import ImageFetcher
from loupe.encoders.fused import EncodeInput
from loupe.encoders.images import upright_size
from loupe.encoders.items import Region
from loupe.encoders.regions import photo_box
from loupe.ranking import KIND_CANDIDATES, anchored, best_of, kind_kept
from loupe.schemas.common import Price, is_identifier
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.search import (
    CORRELATION_HEADER,
    HitScores,
    PhotoRegion,
    SearchCompleted,
    SearchError,
    SearchHit,
    SearchRequested,
    parse_search_request,
)

log = logging.getLogger(__name__)


class SearchService(BatchWorker):
    role = "search"

    def __init__(
        self,
        basics: WorkerBasics,
        *,
        consumer: KafkaConsumer,
        fetcher: ImageFetcher,
        topic: str,
        response_topic: str,
        encode_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        fetch_workers: int = 8,
        photo_kind_weight: float = 0.0,
        reply_topics: ReplyTopics | None = None,
        cleanup_policy: Callable[[str], str] | None = None,
    ) -> None:
        """``reply_topics``: where a ``reply_to`` may point (by default: only at the response
        topic); ``cleanup_policy``: a topic's ``cleanup.policy`` as the broker reports it."""
        super().__init__(basics, consumer=consumer, topic=topic)
        self.fetcher = fetcher
        self.response_topic = response_topic
        self.encode_lock = encode_lock
        self.photo_kind_weight = photo_kind_weight  # ranking.kind_kept; 0: the image view alone
        self._answered: list[SearchRequested] = []
        self._fetch_pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")
        nowhere_else = ReplyTopics.of(response_topic, r"(?!)", own=[topic])
        self.replies = _reply_gate(self, reply_topics or nowhere_else, cleanup_policy or _unknown)

    def handle(self, records: list[Any]) -> None:
        """Answer every request of the batch, together: photos fetched concurrently, all
        queries encoded in one call, one batched index query, then every answer. The answers
        go out with the batch's offsets, in one transaction (``BatchWorker``)."""
        self._answered = []
        started = time.perf_counter()
        queries = [q for q in (self._accept(record, started) for record in records) if q]
        self._fetch(queries)
        self._encode([q for q in queries if q.ok])
        self._search([q for q in queries if q.ok])
        for query in queries:
            self._finish(query)

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=True)
        super().close()

    def after_commit(self, records: list[Any]) -> None:
        now = time.time()
        for request in self._answered:
            self.metrics.request_latency.observe(max(0.0, now - request.occurred_at.timestamp()))

    # --- the stages of a batch; each request that fails gets its own error ------------------

    def _accept(self, record: Any, started: float) -> _Query | None:
        """Parse a request; one that cannot be served as asked is answered here."""
        try:
            request = parse_search_request(record.value)
        except InvalidEvent as exc:
            # No trustworthy request_id or reply_to: answer on the default topic under the key.
            request_id = (record.key or b"").decode("utf-8", "replace")[:128] or "unknown"
            self._respond_error(record, request_id, None, exc.code, str(exc), "parse", started)
            return None
        refusal = self.replies.refusal(request.reply_to)
        if refusal is not None:  # (dead-lettered too: its warning names the request)
            reason, message = refusal
            self.metrics.reply_to_refused.labels(reason=reason.value).inc()
            self._respond_error(
                record, request.request_id, None, ErrorCode.REPLY_TO_REFUSED,
                f"{message}; answered on the default response topic instead", "publish", started,
            )  # fmt: skip
            self._answered.append(request)
            return None
        return _Query(record, request, started)

    def on_aborted(self, records: list[Any], cause: BaseException) -> None:
        """An ACL refused a write: requests that named a reply topic are answered on the default
        one on the replay (not failed for ever); else an ACL is missing: stop, naming it."""
        named = _reply_topics_of(records) - {self.response_topic}
        if not isinstance(cause, TopicAuthorizationFailedError) or not named:
            refused(self.role, cause)
            return
        log.warning("search: the broker refused a write to a reply topic of %s: %s", named, cause)
        self.replies.refuse_writes(named, "TOPIC_AUTHORIZATION_FAILED")

    def _fetch(self, queries: list[_Query]) -> None:
        with self.metrics.timer("fetch"):
            load = self.fetcher.load
            futures = {
                id(q): self._fetch_pool.submit(self._guarded, "fetch", load, q.request.image)
                for q in queries
                if q.request.image is not None
            }
            for query in queries:
                future = futures.get(id(query))
                if future is None:
                    continue
                while not wait([future], timeout=1.0).done:
                    self.keep_alive_if_due()  # a slow server must not cost the group
                result = future.result()
                if isinstance(result, ItemFailed):
                    query.error = result
                else:
                    query.image, query.media_type = result

    def _guarded(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Abandoned:
            raise  # shutting down mid-retry: the batch is replayed, not answered
        except ItemFailed as exc:
            return exc
        except Exception as exc:  # this request's failure, not the worker's
            log.exception("a search's %s failed unexpectedly", stage)
            return UnexpectedItemError(stage, exc)

    def _encode(self, queries: list[_Query]) -> None:
        if not queries:
            return
        items = [
            EncodeInput(image=q.image, media_type=q.media_type, text=q.request.text)
            for q in queries
        ]
        self.keep_alive_if_due()
        with self.metrics.timer("encode"), self.encode_lock():
            encoded = self.encoder.encode_queries(items)  # fails items, never the batch
        for query, result in zip(queries, encoded, strict=True):
            if result.ok:
                query.vectors, query.regions = result.vectors, result.regions
            else:
                query.error = ModelRejected(result.error)

    def _search(self, queries: list[_Query]) -> None:
        if not queries:
            return
        # Each query asked with its whole photo, and a photo query with its parts too (_Ask).
        asks = [_asks(q, self.photo_kind_weight) for q in queries]
        flat = [ask for per_query in asks for ask in per_query]
        lookups = [a.lookup for a in flat if a.searched]
        batch = lookups + [a.anchor for a in flat if a.anchor is not None]
        self.keep_alive_if_due()
        with self.metrics.timer("search"):
            try:
                found = self._retry(
                    "search", lambda: self.index.search_batch(batch), (IndexUnavailable,)
                )
            except (Abandoned, IndexUnavailable):
                raise
            except Exception:
                # Something about one query broke the batch: search them one by one, so that
                # only that one fails.
                log.exception(
                    "a batched search failed; searching its %d queries alone", len(queries)
                )
                found = [self._guarded("search", self._search_one, lookup) for lookup in batch]
        hits, bests = iter(found[: len(lookups)]), iter(found[len(lookups) :])
        for per_query in asks:
            for ask in per_query:
                ask.hits = next(hits) if ask.searched else per_query[0].hits
                ask.best = next(bests) if ask.anchor is not None else []
        for query, per_query in zip(queries, asks, strict=True):
            _answer(query, per_query, self.photo_kind_weight, self.encoder.fit)

    def _search_one(self, lookup: IndexQuery) -> list[IndexHit]:
        return self._retry(
            "search", lambda: self.index.search_batch([lookup]), (IndexUnavailable,)
        )[0]

    def _finish(self, query: _Query) -> None:
        request = query.request
        self._answered.append(request)
        if query.error is not None:
            error = query.error
            self._respond_error(
                query.record, request.request_id, request.reply_to, error.code, str(error),
                error.stage, query.started,
            )  # fmt: skip
            return
        self._respond(
            request.request_id,
            request.reply_to,
            SearchCompleted(
                request_id=request.request_id,
                status="ok",
                hits=query.hits,
                model_version=self.encoder.model_version,
                took_ms=(time.perf_counter() - query.started) * 1000,
                completed_at=datetime.now(UTC),
            ),
        )
        self.metrics.events.labels(topic=self.topic, outcome="answered").inc()

    def _respond(self, request_id: str, reply_to: str | None, response: SearchCompleted) -> None:
        self.publisher.send(
            reply_to or self.response_topic,
            request_id.encode(),
            fit_response(response),
            [(CORRELATION_HEADER, request_id.encode())],
        )

    def _respond_error(
        self, record, request_id, reply_to, code: ErrorCode, message: str, stage, started: float
    ) -> None:
        self._respond(
            request_id,
            reply_to,
            SearchCompleted(
                request_id=request_id if is_identifier(request_id) else "unknown",
                status="error",
                error=SearchError(code=code, message=message[:1000]),
                model_version=self.encoder.model_version,
                took_ms=(time.perf_counter() - started) * 1000,
                completed_at=datetime.now(UTC),
            ),
        )
        self.publisher.dead_letter(record, code, message, stage)
        self.metrics.events.labels(topic=self.topic, outcome="answered_error").inc()

    def _retry(self, what: str, fn, transient):
        return self.retry(what, fn, transient, stage="search")


@dataclass
class _Query:
    """One request on its way through a batch: what it has, or why it failed."""

    record: Any
    request: SearchRequested
    started: float
    image: bytes | None = None
    media_type: str | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)  # where its product may be in the photo
    hits: list[SearchHit] = field(default_factory=list)
    error: ItemFailed | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Ask:
    """One way to ask the index for a query's answer: with the whole photo, or with a part
    where its product is (``encoders/regions.py``); ``ranking.best_of`` merges them."""

    lookup: IndexQuery
    anchor: IndexQuery | None  # photo + text: the image view's best match
    vectors: dict[str, np.ndarray]  # the query's, the image view's the part's for a part
    box: tuple[float, float, float, float] | None = None  # the part, in the model's square
    searched: bool = True  # False: the part's answer shares the whole's lookup (photo + text)
    hits: list[IndexHit] | ItemFailed = field(default_factory=list)
    best: list[IndexHit] | ItemFailed = field(default_factory=list)


def _asks(query: _Query, photo_kind_weight: float) -> list[_Ask]:
    """The whole photo's ask, then one per part where the encoder found them."""
    whole = _Ask(_index_query(query, photo_kind_weight), _anchor_query(query), query.vectors)
    if whole.lookup.view == "text":
        return [whole]
    return [whole, *(_part_ask(whole, query.vectors, region) for region in query.regions)]


def _part_ask(whole: _Ask, vectors: dict[str, np.ndarray], region: Region) -> _Ask:
    """``whole``'s ask with the part's image vector: a photo alone searches with it; photo +
    text only anchors with it (its fused view's ranking is the whole's)."""
    searched = whole.lookup.view == "image"
    lookup = dataclasses.replace(whole.lookup, vector=region.image) if searched else whole.lookup
    anchor = whole.anchor
    if anchor is not None:
        anchor = dataclasses.replace(anchor, vector=region.image)
    return _Ask(lookup, anchor, {**vectors, "image": region.image}, region.box, searched)


def _answer(query: _Query, asks: list[_Ask], photo_kind_weight: float, fit: str) -> None:
    """``query``'s hits from its asks' results, ranked as ``ranking.py`` says: each product at
    its closest part's score, the whole photo being one (``ranking.best_of``); a hit found by a
    part of the photo (``fit`` made the model's square of it) says which part."""
    results = [r for a in asks for r in (a.hits, a.best)]
    failed = next((r for r in results if isinstance(r, ItemFailed)), None)
    if failed is not None:
        query.error = failed
        return
    whole = asks[0]
    lookup, anchor = whole.lookup, whole.anchor
    upright: list[tuple[int, int] | None] = []  # the photo's size, from its header, read once

    def hit(found: IndexHit, view: str, ask: _Ask) -> SearchHit:
        region = None
        if ask.box is not None:  # found by a part: say where it is in the photo
            if not upright:
                upright.append(upright_size(query.image))
            region = _photo_region(upright[0], ask.box, fit)
        return _hit(found, view, ask.vectors, region)

    def point(found: IndexHit) -> str:
        return found.id

    searched = [a for a in asks if a.searched]  # photo + text: the whole's fused ranking alone
    merged = best_of([a.hits for a in searched], key=point, score=lambda h: h.score)
    if _keeps_kind(lookup, photo_kind_weight):
        merged = kind_kept(
            merged,
            query.request.top_k,
            photo_kind_weight,
            score=lambda pair: pair[0].score,
            fused=lambda pair: pair[0].vectors.get("fused"),
        )
    top_k = query.request.top_k
    ranked = [hit(found, lookup.view, searched[source]) for found, source in merged[:top_k]]
    first = None
    bests = best_of([a.best for a in asks], key=point, score=lambda h: h.score)
    if anchor is not None and bests:
        found, source = bests[0]
        first = hit(found, anchor.view, asks[source])
        score = getattr(first.scores, lookup.view)
        if score is not None:  # scored in the view the query used, as the others
            first = first.model_copy(update={"score": score})
    query.hits = anchored(
        ranked, first, query.request.top_k, key=lambda h: (h.merchant_id, h.product_id)
    )


def _index_query(query: _Query, photo_kind_weight: float = 0.0) -> IndexQuery:
    """The view that fits the query: fused for photo + text, else the one it has. A photo alone
    whose answer keeps the best match's kind asks for more candidates, with their fused
    vectors (``ranking.kind_kept``)."""
    vectors = query.vectors
    view = "fused" if "fused" in vectors else ("image" if "image" in vectors else "text")
    lookup = _lookup(query, view, query.request.top_k)
    if _keeps_kind(lookup, photo_kind_weight):
        lookup = dataclasses.replace(
            lookup,
            top_k=max(lookup.top_k, KIND_CANDIDATES),
            with_vectors=[*lookup.with_vectors, "fused"],
        )
    return lookup


def _keeps_kind(lookup: IndexQuery, photo_kind_weight: float) -> bool:
    """A photo alone, answered by ``ranking.kind_kept``."""
    return lookup.view == "image" and photo_kind_weight > 0


def _anchor_query(query: _Query) -> IndexQuery | None:
    """For a photo + text query, the image view's best match; None for the others."""
    if "fused" not in query.vectors or "image" not in query.vectors:
        return None
    return _lookup(query, "image", 1)


def _lookup(query: _Query, view: str, top_k: int) -> IndexQuery:
    """A search of ``view`` within the request's scope and filters, returning the hits' other
    views' vectors so that they are scored in every view the query has."""
    return IndexQuery(
        view=view,
        vector=query.vectors[view],
        top_k=top_k,
        merchant_id=query.request.merchant_id,
        filters=query.request.filters,
        with_vectors=[v for v in query.vectors if v != view],
    )


def _photo_region(
    size: tuple[int, int] | None, box: tuple[float, float, float, float], fit: str
) -> PhotoRegion | None:
    """``box`` (shares of the model's square) in shares of the upright photo of ``size``; None
    where the photo's header could not be read again (``size`` None)."""
    if size is None:
        return None
    left, top, width, height = photo_box(box, *size, fit)
    return PhotoRegion(left=left, top=top, width=width, height=height)


def _unknown(topic: str) -> str:
    raise TopicConfigUnknown(f"no way to describe topic {topic!r} was given")


def _reply_gate(
    worker: BatchWorker, topics: ReplyTopics, cleanup_policy: Callable[[str], str]
) -> ReplyGate:
    """``topics``' rule, asking the broker through ``worker``'s retries."""
    return ReplyGate(
        topics,
        KnownTopics(
            lambda: worker.retry("list topics", worker.consumer.topics, TRANSIENT_KAFKA)
        ).exists,
        lambda topic: worker.retry(
            "describe a reply topic", lambda: cleanup_policy(topic), TRANSIENT_KAFKA
        ),
    )


def _reply_topics_of(records: list[Any]) -> set[str]:
    """The ``reply_to`` topics the batch's requests name."""
    named = set()
    for record in records:
        with contextlib.suppress(InvalidEvent):
            reply_to = parse_search_request(record.value).reply_to
            if reply_to is not None:
                named.add(reply_to)
    return named


# Under Kafka's default 1 MiB message.max.bytes, with room for the key and headers.
MAX_RESPONSE_BYTES = 900_000


def fit_response(response: SearchCompleted, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """The response as JSON, under ``limit`` bytes: a hit list with large attributes is sent
    without attributes first, then without its lowest-ranked hits, never rejected by the broker."""
    raw = response.model_dump_json().encode()
    if len(raw) <= limit:
        return raw
    slim = response.model_copy(
        update={"hits": [h.model_copy(update={"attributes": {}}) for h in response.hits]}
    )
    raw = slim.model_dump_json().encode()
    hits = list(slim.hits)
    while len(raw) > limit and hits:
        hits.pop()
        raw = slim.model_copy(update={"hits": hits}).model_dump_json().encode()
    log.warning(
        "response %s over %d bytes: sent without attributes and with %d of %d hits",
        response.request_id,
        limit,
        len(hits),
        len(response.hits),
    )
    return raw


def _hit(
    hit: IndexHit, view: str, query: dict[str, np.ndarray], region: PhotoRegion | None = None
) -> SearchHit:
    scores: dict[str, float | None] = {"image": None, "text": None, "fused": None}
    scores[view] = hit.score
    for other, vector in hit.vectors.items():
        if other in query:
            scores[other] = float(np.dot(query[other], vector))
    payload = ProductPayload.from_dict(hit.payload)
    price = None
    if payload.price_amount and payload.currency:
        price = Price(amount=payload.price_amount, currency=payload.currency)
    return SearchHit(
        product_id=payload.product_id,
        merchant_id=payload.merchant_id,
        score=hit.score,
        scores=HitScores(**scores),
        title=payload.title or "",
        image_url=payload.image_url,
        attributes=payload.attributes or {},
        price=price,
        region=region,
    )
