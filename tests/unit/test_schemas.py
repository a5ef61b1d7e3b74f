"""The v1 event contract: examples, round trips, rejections with the right field, drift."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from loupe.schemas import export
from loupe.schemas.common import MAX_INLINE_IMAGE_BYTES, MAX_MESSAGE_BYTES
from loupe.schemas.deadletter import DeadLetter, deadletter_headers
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.products import ProductUpserted, parse_product_event
from loupe.schemas.search import parse_search_request, parse_search_response

EXAMPLES = Path(export.__file__).parent / "examples"
PARSERS = {
    "product": (parse_product_event, "product-event"),
    "search.requested": (parse_search_request, "search-request"),
    "search.completed": (parse_search_response, "search-response"),
}


def _parser_for(name: str):
    for prefix, entry in PARSERS.items():
        if name.startswith(prefix):
            return entry
    raise AssertionError(f"no parser for example {name}")


def _example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.json"))


def test_there_is_an_example_for_every_event_type():
    types = {_example(n)["type"] for n in EXAMPLE_NAMES}
    assert types == {"product.upserted", "product.deleted", "search.requested", "search.completed"}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_validate_and_round_trip(name):
    parse, _ = _parser_for(name)
    raw = (EXAMPLES / name).read_bytes()
    event = parse(raw)
    again = parse(event.model_dump_json().encode())
    assert again == event
    assert again.model_dump() == event.model_dump()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_satisfy_the_exported_json_schema(name):
    _, schema_name = _parser_for(name)
    schema = json.loads((export.JSON_DIR / f"{schema_name}.schema.json").read_text())
    Draft202012Validator(schema).validate(_example(name))


def test_exported_json_schemas_match_the_models():
    assert export.drifted() == [], "run `loupe schemas export` and commit schemas/json"


def test_drift_is_detected(tmp_path):
    export.export(tmp_path)
    path = tmp_path / "search-request.schema.json"
    path.write_text(path.read_text().replace('"maximum": 100', '"maximum": 1000'))
    assert export.drifted(tmp_path) == ["search-request"]


def _mutated(name: str, **changes) -> bytes:
    body = _example(name)
    for dotted, value in changes.items():
        target = body
        *path, last = dotted.split("__")
        for part in path:
            target = target[part]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return json.dumps(body).encode()


_DROP = object()
UPSERT = "product.upserted.json"
INLINE = "product.upserted.inline.json"
SEARCH = "search.requested.text.json"
RESPONSE = "search.completed.ok.json"

INVALID = [
    # (case, parser, raw bytes, code, text the message must contain)
    ("not json", parse_product_event, b"{not json", ErrorCode.INVALID_JSON, "not valid JSON"),
    ("empty value", parse_product_event, b"", ErrorCode.INVALID_ENCODING, "empty"),
    ("tombstone", parse_product_event, None, ErrorCode.INVALID_ENCODING, "empty"),
    ("non-UTF-8", parse_product_event, b'{"type": "\xff"}', ErrorCode.INVALID_ENCODING, "UTF-8"),
    ("JSON array", parse_product_event, b"[1, 2]", ErrorCode.INVALID_EVENT, "object"),
    (
        "no type tag",
        parse_product_event,
        _mutated(UPSERT, type=_DROP),
        ErrorCode.INVALID_EVENT,
        "'type': missing",
    ),
    (
        "wrong type tag",
        parse_product_event,
        _mutated(UPSERT, type="product.created"),
        ErrorCode.INVALID_EVENT,
        "'type'",
    ),
    (
        "search tag on products",
        parse_product_event,
        (EXAMPLES / SEARCH).read_bytes(),
        ErrorCode.INVALID_EVENT,
        "'type'",
    ),
    (
        "missing product_id",
        parse_product_event,
        _mutated(UPSERT, product_id=_DROP),
        ErrorCode.INVALID_EVENT,
        "'product_id': Field required",
    ),
    (
        "empty merchant_id",
        parse_product_event,
        _mutated(UPSERT, merchant_id=""),
        ErrorCode.INVALID_EVENT,
        "'merchant_id'",
    ),
    (
        "slash in merchant_id",
        parse_product_event,
        _mutated(UPSERT, merchant_id="a/b"),
        ErrorCode.INVALID_EVENT,
        "'merchant_id'",
    ),
    (
        "control char in id",
        parse_product_event,
        _mutated(UPSERT, product_id="a\nb"),
        ErrorCode.INVALID_EVENT,
        "'product_id'",
    ),
    (
        "overlong id",
        parse_product_event,
        _mutated(UPSERT, event_id="e" * 129),
        ErrorCode.INVALID_EVENT,
        "'event_id'",
    ),
    (
        "id as number",
        parse_product_event,
        _mutated(UPSERT, product_id=42),
        ErrorCode.INVALID_EVENT,
        "'product_id': Input should be a valid string",
    ),
    (
        "naive timestamp",
        parse_product_event,
        _mutated(UPSERT, occurred_at="2026-11-27T10:15:00"),
        ErrorCode.INVALID_EVENT,
        "'occurred_at': Input should have timezone info",
    ),
    (
        "epoch timestamp",
        parse_product_event,
        _mutated(UPSERT, occurred_at=1795780000),
        ErrorCode.INVALID_EVENT,
        "'occurred_at'",
    ),
    (
        "negative version",
        parse_product_event,
        _mutated(UPSERT, version=-1),
        ErrorCode.INVALID_EVENT,
        "'version'",
    ),
    (
        "version as string",
        parse_product_event,
        _mutated(UPSERT, version="3"),
        ErrorCode.INVALID_EVENT,
        "'version'",
    ),
    (
        "both image forms",
        parse_product_event,
        _mutated(
            UPSERT,
            image={"url": "https://a.example/x.jpg", "data": "AAAA", "media_type": "image/png"},
        ),
        ErrorCode.INVALID_EVENT,
        "exactly one of 'url' or 'data'",
    ),
    (
        "neither image form",
        parse_product_event,
        _mutated(UPSERT, image={}),
        ErrorCode.INVALID_EVENT,
        "exactly one of 'url' or 'data'",
    ),
    (
        "no image",
        parse_product_event,
        _mutated(UPSERT, image=_DROP),
        ErrorCode.INVALID_EVENT,
        "'image': Field required",
    ),
    (
        "bad base64",
        parse_product_event,
        _mutated(INLINE, image__data="not base64!!"),
        ErrorCode.INVALID_EVENT,
        "not valid base64",
    ),
    (
        "data without media type",
        parse_product_event,
        _mutated(INLINE, image__media_type=_DROP),
        ErrorCode.INVALID_EVENT,
        "needs 'media_type'",
    ),
    (
        "disallowed media type",
        parse_product_event,
        _mutated(INLINE, image__media_type="image/svg+xml"),
        ErrorCode.INVALID_EVENT,
        "'image.media_type'",
    ),
    (
        "oversize inline image",
        parse_product_event,
        _mutated(
            INLINE, image__data=base64.b64encode(b"\0" * (MAX_INLINE_IMAGE_BYTES + 3)).decode()
        ),
        ErrorCode.INVALID_EVENT,
        "'image.data'",
    ),
    (
        "ftp scheme",
        parse_product_event,
        _mutated(UPSERT, image__url="ftp://a.example/x.jpg"),
        ErrorCode.INVALID_EVENT,
        "scheme 'ftp' is not allowed",
    ),
    (
        "file scheme",
        parse_product_event,
        _mutated(UPSERT, image__url="file:///etc/passwd"),
        ErrorCode.INVALID_EVENT,
        "scheme 'file' is not allowed",
    ),
    (
        "credentials in URL",
        parse_product_event,
        _mutated(UPSERT, image__url="https://u:p@a.example/x.jpg"),
        ErrorCode.INVALID_EVENT,
        "credentials",
    ),
    (
        "oversize title",
        parse_product_event,
        _mutated(UPSERT, title="t" * 501),
        ErrorCode.INVALID_EVENT,
        "'title'",
    ),
    (
        "oversize description",
        parse_product_event,
        _mutated(UPSERT, description="d" * 5001),
        ErrorCode.INVALID_EVENT,
        "'description'",
    ),
    (
        "nested attribute",
        parse_product_event,
        _mutated(UPSERT, attributes={"a": {"b": 1}}),
        ErrorCode.INVALID_EVENT,
        "'attributes.a",
    ),
    (
        "too many attributes",
        parse_product_event,
        _mutated(UPSERT, attributes={f"k{i}": i for i in range(65)}),
        ErrorCode.INVALID_EVENT,
        "'attributes'",
    ),
    (
        "bad price amount",
        parse_product_event,
        _mutated(UPSERT, price={"amount": "12,99", "currency": "INR"}),
        ErrorCode.INVALID_EVENT,
        "'price.amount'",
    ),
    (
        "price as float",
        parse_product_event,
        _mutated(UPSERT, price={"amount": 12.5, "currency": "INR"}),
        ErrorCode.INVALID_EVENT,
        "'price.amount'",
    ),
    (
        "bad currency",
        parse_product_event,
        _mutated(UPSERT, price={"amount": "1", "currency": "inr"}),
        ErrorCode.INVALID_EVENT,
        "'price.currency'",
    ),
    (
        "oversize message",
        parse_product_event,
        b" " * (MAX_MESSAGE_BYTES + 1),
        ErrorCode.MESSAGE_TOO_LARGE,
        "limit",
    ),
    (
        "no query",
        parse_search_request,
        _mutated(SEARCH, text=_DROP),
        ErrorCode.INVALID_EVENT,
        "at least one of 'image' and 'text'",
    ),
    (
        "blank text",
        parse_search_request,
        _mutated(SEARCH, text="   "),
        ErrorCode.INVALID_EVENT,
        "at least one of",
    ),
    (
        "oversize text",
        parse_search_request,
        _mutated(SEARCH, text="x" * 1001),
        ErrorCode.INVALID_EVENT,
        "'text'",
    ),
    (
        "top_k zero",
        parse_search_request,
        _mutated(SEARCH, top_k=0),
        ErrorCode.INVALID_EVENT,
        "'top_k'",
    ),
    (
        "oversize top_k",
        parse_search_request,
        _mutated(SEARCH, top_k=101),
        ErrorCode.INVALID_EVENT,
        "'top_k'",
    ),
    (
        "top_k as float",
        parse_search_request,
        _mutated(SEARCH, top_k=5.0),
        ErrorCode.INVALID_EVENT,
        "'top_k'",
    ),
    (
        "bad reply_to",
        parse_search_request,
        _mutated(SEARCH, reply_to="no spaces please"),
        ErrorCode.INVALID_EVENT,
        "'reply_to'",
    ),
    (
        "inverted price range",
        parse_search_request,
        _mutated(SEARCH, filters={"price_min": 10, "price_max": 5}),
        ErrorCode.INVALID_EVENT,
        "price_min (10) is above price_max (5)",
    ),
    (
        "category not a list",
        parse_search_request,
        _mutated(SEARCH, filters={"category": "ring"}),
        ErrorCode.INVALID_EVENT,
        "'filters.category'",
    ),
    (
        "NaN-free price",
        parse_search_request,
        b'{"type":"search.requested","request_id":"r",'
        b'"occurred_at":"2026-01-01T00:00:00Z","text":"x","filters":{"price_max":Infinity}}',
        ErrorCode.INVALID_EVENT,
        "'filters.price_max'",
    ),
    (
        "error without code",
        parse_search_response,
        _mutated(RESPONSE, status="error"),
        ErrorCode.INVALID_EVENT,
        "'error' is set exactly when status is 'error'",
    ),
    (
        "unknown error code",
        parse_search_response,
        _mutated("search.completed.error.json", error={"code": "oops", "message": "m"}),
        ErrorCode.INVALID_EVENT,
        "'error.code'",
    ),
]


@pytest.mark.parametrize(
    ("parse", "raw", "code", "needle"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_messages_are_rejected_with_the_reason(parse, raw, code, needle):
    with pytest.raises(InvalidEvent) as info:
        parse(raw)
    assert info.value.code == code
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value), "the reason must fit one header line"


SCHEMA_OF_PARSER = {
    parse_product_event: "product-event",
    parse_search_request: "search-request",
    parse_search_response: "search-response",
}
# Rules JSON Schema cannot state: comparing two fields (said in the field's description), and
# strict integers (JSON Schema's "integer" includes 5.0, which the models refuse).
NOT_EXPRESSIBLE = {"inverted price range", "top_k as float"}


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_or_none(raw: bytes | None):
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (TypeError, ValueError):
        return None  # not JSON at all (or Infinity/NaN): no JSON Schema reader gets that far


# Cases that are JSON messages (not bytes refused before any schema applies).
SCHEMA_CASES = [
    case
    for case in INVALID
    if case[0] not in NOT_EXPRESSIBLE
    and _json_or_none(case[2]) is not None
    and len(case[2]) <= MAX_MESSAGE_BYTES
]


@pytest.mark.parametrize(
    ("parse", "raw"), [case[1:3] for case in SCHEMA_CASES], ids=[case[0] for case in SCHEMA_CASES]
)
def test_what_the_models_refuse_the_exported_json_schemas_refuse(parse, raw):
    body = json.loads(raw)
    with pytest.raises(InvalidEvent):
        parse(raw)
    schema = json.loads((export.JSON_DIR / f"{SCHEMA_OF_PARSER[parse]}.schema.json").read_text())
    errors = list(Draft202012Validator(schema).iter_errors(body))
    assert errors, "the JSON Schema accepts a message the model refuses"


def test_the_rules_json_schema_cannot_state_are_described():
    schema = json.loads((export.JSON_DIR / "search-request.schema.json").read_text())
    assert "``price_min`` may not be above" in schema["$defs"]["SearchFilters"]["description"]


def test_unknown_fields_are_ignored_so_producers_can_evolve():
    event = parse_product_event(_mutated(UPSERT, colour_profile="sRGB", schema_rev=7))
    assert isinstance(event, ProductUpserted)
    assert not hasattr(event, "colour_profile")


def test_inline_image_decodes_to_its_bytes():
    event = parse_product_event((EXAMPLES / INLINE).read_bytes())
    assert event.image.decoded().startswith(b"\x89PNG\r\n\x1a\n")


def test_key_keeps_one_products_events_together():
    event = parse_product_event((EXAMPLES / UPSERT).read_bytes())
    assert event.key == "giva/RING-0042"


def test_models_are_frozen():
    event = parse_product_event((EXAMPLES / UPSERT).read_bytes())
    with pytest.raises(ValueError):
        event.title = "changed"


# --- dead letters ---------------------------------------------------------------------------


def test_dead_letter_headers_round_trip_and_keep_the_original():
    original = [("traceparent", b"00-abc-01"), ("loupe.stage", b"stale")]
    headers = deadletter_headers(
        original,
        code=ErrorCode.IMAGE_FETCH_FAILED,
        message="GET https://cdn.example.com/x.jpg: HTTP 404",
        stage="fetch",
        topic="loupe.products.v1",
        partition=3,
        offset=1234,
    )
    letter = DeadLetter.from_record(b"giva/R1", b"\x00raw", headers)
    assert letter.key == b"giva/R1" and letter.value == b"\x00raw"
    assert letter.headers == [("traceparent", b"00-abc-01")]
    assert letter.error_code is ErrorCode.IMAGE_FETCH_FAILED
    assert letter.stage == "fetch"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "loupe.products.v1",
        3,
        1234,
    )


def test_dead_letter_message_is_bounded():
    headers = deadletter_headers(
        [],
        code=ErrorCode.INVALID_EVENT,
        message="x" * 5000,
        stage="parse",
        topic="t",
        partition=0,
        offset=0,
    )
    message = dict(headers)["loupe.error.message"].decode()
    assert len(message) == 1000 and message.endswith("…")


def test_reading_a_record_that_is_not_a_dead_letter_says_so():
    with pytest.raises(ValueError, match="not a Loupe dead letter"):
        DeadLetter.from_record(b"k", b"v", [("loupe.error.code", b"invalid_json")])


@pytest.mark.parametrize(
    "value", ["r-1", "giva/RING 42", "", " lead", "tail ", "a\nb", "é", "x" * 129]
)
def test_is_identifier_agrees_with_the_contract(value):
    from pydantic import TypeAdapter, ValidationError

    from loupe.schemas.common import Identifier, is_identifier

    try:
        TypeAdapter(Identifier).validate_python(value)
        valid = True
    except ValidationError:
        valid = False
    assert is_identifier(value) is valid
