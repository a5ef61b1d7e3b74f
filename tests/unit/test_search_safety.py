"""Search answers always fit a Kafka message; non-retriable Kafka errors are not retried."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from loupe.consumers.kafka.io import Backoff
from loupe.consumers.workers.search import fit_response
from loupe.schemas.search import HitScores, SearchCompleted, SearchHit, parse_search_response


def _response(hits: int, attribute_chars: int) -> SearchCompleted:
    attributes = {f"k{i}": "x" * attribute_chars for i in range(64)}
    return SearchCompleted(
        request_id="r1",
        status="ok",
        hits=[
            SearchHit(
                product_id=f"p{i}",
                merchant_id="m",
                score=0.5,
                scores=HitScores(image=0.5),
                title="t" * 500,
                attributes=attributes,
            )
            for i in range(hits)
        ],
        model_version="v",
        took_ms=1.0,
        completed_at=datetime.now(UTC),
    )


def test_small_responses_are_sent_as_they_are():
    response = _response(3, 10)
    assert parse_search_response(fit_response(response)) == response


def test_huge_attributes_are_dropped_before_any_hit():
    response = _response(100, 256)  # 100 hits x 64 attributes x 256 chars: ~1.7 MB
    assert len(response.model_dump_json()) > 1_000_000
    fitted = parse_search_response(fit_response(response))
    assert len(fitted.hits) == 100
    assert all(hit.attributes == {} for hit in fitted.hits)


def test_hits_are_cut_from_the_end_when_even_that_is_too_big():
    response = _response(100, 0)
    raw = fit_response(response, limit=20_000)
    assert len(raw) <= 20_000
    fitted = parse_search_response(raw)
    assert 0 < len(fitted.hits) < 100
    assert [h.product_id for h in fitted.hits] == [f"p{i}" for i in range(len(fitted.hits))]


def test_non_retriable_kafka_errors_are_raised_at_once():
    calls = []

    def send():
        calls.append(1)
        raise MessageSizeTooLargeError("too big")

    with pytest.raises(MessageSizeTooLargeError):
        Backoff(initial_s=0.01).retry("send", send, (Exception,), should_stop=lambda: False)
    assert len(calls) == 1


def test_retriable_kafka_errors_are_retried_until_they_pass():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise KafkaTimeoutError("broker away")
        return "ok"

    assert (
        Backoff(initial_s=0.001, cap_s=0.002).retry(
            "send", flaky, (KafkaTimeoutError,), should_stop=lambda: False
        )
        == "ok"
    )
    assert len(calls) == 3
