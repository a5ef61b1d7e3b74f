"""The search consumer: every request gets exactly one visible answer, then its offset commits.

A request is encoded (photo, text or both), searched in the view that fits (image only ->
``image``, text only -> ``text``, both -> ``fused``) within the merchant scope and filters, and
answered on ``reply_to`` or the default response topic, keyed and correlated by ``request_id``.
A request that cannot be served is answered with ``status: "error"`` and also dead-lettered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from loupe.consumers.errors import IndexUnavailable, ItemFailed, UnexpectedItemError
from loupe.consumers.image_fetch import ImageFetcher
from loupe.consumers.index import IndexHit, VectorIndex
from loupe.consumers.kafka_io import TRANSIENT_KAFKA, Abandoned, Backoff, Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.worker import BatchWorker
from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.schemas.common import Price, is_identifier
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.search import (
    CORRELATION_HEADER,
    HitScores,
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
        *,
        consumer: KafkaConsumer,
        publisher: Publisher,
        index: VectorIndex,
        encoder: FusedEncoder,
        fetcher: ImageFetcher,
        metrics: LoupeMetrics,
        topic: str,
        response_topic: str,
        encode_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        poll_timeout_ms: int = 200,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            consumer=consumer,
            publisher=publisher,
            metrics=metrics,
            topic=topic,
            poll_timeout_ms=poll_timeout_ms,
            backoff=backoff,
        )
        self.index = index
        self.encoder = encoder
        self.fetcher = fetcher
        self.response_topic = response_topic
        self.encode_lock = encode_lock
        self._answered: list[SearchRequested] = []
        self._known_topics: set[str] = set()
        self._topics_checked_at = float("-inf")

    def handle(self, records: list[Any]) -> None:
        """Answer every request of the batch; done once the broker acknowledged the answers."""
        self._answered = []
        for record in records:
            self.keep_alive_if_due()  # each request may fetch a photo: stay in the group
            answered = self._answer(record)
            if answered is not None:
                self._answered.append(answered)
        # The answers go out with the batch's offsets, in one transaction (BatchWorker).

    def after_commit(self, records: list[Any]) -> None:
        now = time.time()
        for request in self._answered:
            self.metrics.request_latency.observe(max(0.0, now - request.occurred_at.timestamp()))

    def _answer(self, record: Any) -> SearchRequested | None:
        started = time.perf_counter()
        try:
            request = parse_search_request(record.value)
        except InvalidEvent as exc:
            # No trustworthy request_id or reply_to: answer on the default topic under the key.
            request_id = (record.key or b"").decode("utf-8", "replace")[:128] or "unknown"
            self._respond_error(record, request_id, None, exc.code, str(exc), "parse", started)
            return None
        if request.reply_to is not None and not self._topic_exists(request.reply_to):
            # Sending there would block until a metadata timeout, and again on every retry.
            message = f"reply_to topic {request.reply_to!r} does not exist; answered here instead"
            self._respond_error(
                record,
                request.request_id,
                None,
                ErrorCode.INVALID_EVENT,
                message,
                "publish",
                started,
            )
            return request
        try:
            hits = self._search(request)
        except Abandoned:
            raise  # shutting down mid-retry: the batch is replayed, not answered
        except ItemFailed as exc:  # the photo could not be fetched, decoded or encoded
            self._respond_error(
                record, request.request_id, request.reply_to, exc.code, str(exc), exc.stage, started
            )
            return request
        except Exception as exc:  # this request's failure, not the worker's
            log.exception(
                "search %s failed unexpectedly; answering with an error", request.request_id
            )
            failed = UnexpectedItemError("search", exc)
            self._respond_error(
                record, request.request_id, request.reply_to, failed.code, str(failed), "search",
                started,
            )  # fmt: skip
            return request
        self._respond(
            request.request_id,
            request.reply_to,
            SearchCompleted(
                request_id=request.request_id,
                status="ok",
                hits=hits,
                model_version=self.encoder.model_version,
                took_ms=(time.perf_counter() - started) * 1000,
                completed_at=datetime.now(UTC),
            ),
        )
        self.metrics.events.labels(topic=self.topic, outcome="answered").inc()
        return request

    def _search(self, request: SearchRequested) -> list[SearchHit]:
        image, media_type = None, None
        if request.image is not None:
            with self.metrics.timer("fetch"):
                image, media_type = self.fetcher.load(request.image)
        item = EncodeInput(image=image, media_type=media_type, text=request.text)
        with self.metrics.timer("encode"), self.encode_lock():
            encoded = self.encoder.encode_queries([item])[0]
        if not encoded.ok:
            raise encoded.error
        query = encoded.vectors
        view = "fused" if "fused" in query else ("image" if "image" in query else "text")
        other_views = [v for v in query if v != view]
        with self.metrics.timer("search"):
            found = self._retry(
                "search",
                lambda: self.index.search(
                    view,
                    query[view],
                    top_k=request.top_k,
                    merchant_id=request.merchant_id,
                    filters=request.filters,
                    with_vectors=other_views,
                ),
                (IndexUnavailable,),
            )
        return [_hit(h, view, query) for h in found]

    def _respond(self, request_id: str, reply_to: str | None, response: SearchCompleted) -> None:
        self.publisher.send(
            reply_to or self.response_topic,
            request_id.encode(),
            fit_response(response),
            [(CORRELATION_HEADER, request_id.encode())],
        )

    def _topic_exists(self, topic: str) -> bool:
        """Known topics, refreshed from the cluster at most every TOPICS_REFRESH_S on a miss."""
        if topic in self._known_topics:
            return True
        now = time.monotonic()
        if now - self._topics_checked_at >= TOPICS_REFRESH_S:
            self._known_topics = self.retry("list topics", self.consumer.topics, TRANSIENT_KAFKA)
            self._topics_checked_at = now
        return topic in self._known_topics

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


TOPICS_REFRESH_S = 10.0
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


def _hit(hit: IndexHit, view: str, query: dict[str, np.ndarray]) -> SearchHit:
    scores: dict[str, float | None] = {"image": None, "text": None, "fused": None}
    scores[view] = hit.score
    for other, vector in hit.vectors.items():
        if other in query:
            scores[other] = float(np.dot(query[other], vector))
    payload = hit.payload
    price = None
    if payload.get("price_amount") and payload.get("currency"):
        price = Price(amount=payload["price_amount"], currency=payload["currency"])
    return SearchHit(
        product_id=payload["product_id"],
        merchant_id=payload["merchant_id"],
        score=hit.score,
        scores=HitScores(**scores),
        title=payload.get("title", ""),
        image_url=payload.get("image_url"),
        attributes=payload.get("attributes") or {},
        price=price,
    )
