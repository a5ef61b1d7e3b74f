"""Property: no input bytes crash a parser with anything but ``InvalidEvent``."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loupe.schemas.errors import InvalidEvent
from loupe.schemas.products import ProductDeleted, ProductUpserted, parse_product_event
from loupe.schemas.search import (
    SearchCompleted,
    SearchRequested,
    parse_search_request,
    parse_search_response,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
PARSERS = [
    (parse_product_event, (ProductUpserted, ProductDeleted)),
    (parse_search_request, (SearchRequested,)),
    (parse_search_response, (SearchCompleted,)),
]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


def _parse_all(raw: bytes) -> None:
    for parse, types in PARSERS:
        try:
            result = parse(raw)
        except InvalidEvent as exc:
            assert str(exc), "the reason must not be empty"
            assert exc.code is not None
        else:
            assert isinstance(result, types)


@SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_invalid_event(raw):
    _parse_all(raw)


@SETTINGS
@given(json_values)
def test_random_json_only_raises_invalid_event(value):
    _parse_all(json.dumps(value).encode())


EXAMPLE_BODIES = [json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))]


@SETTINGS
@given(st.sampled_from(EXAMPLE_BODIES), st.data())
def test_examples_with_one_field_replaced_only_raise_invalid_event(body, data):
    key = data.draw(st.sampled_from(sorted(body)))
    mutated = {**body, key: data.draw(json_values)}
    _parse_all(json.dumps(mutated).encode())
