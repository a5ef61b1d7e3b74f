"""Raw Kafka value bytes to a contract model, or an ``InvalidEvent`` that names the field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from loupe.schemas.common import MAX_MESSAGE_BYTES, PATTERN_HINTS
from loupe.schemas.errors import ErrorCode, InvalidEvent

T = TypeVar("T")

MAX_REASONS = 3  # reasons quoted in one message: enough to fix the event, short enough for a header


def parse_value(adapter: TypeAdapter[T], value: bytes | None, what: str) -> T:
    """Validate ``value`` against ``adapter``; every failure is an ``InvalidEvent``."""
    if value is None or len(value) == 0:
        raise InvalidEvent(ErrorCode.INVALID_ENCODING, f"empty {what} (null or zero-length value)")
    if len(value) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"{what} is {len(value)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
        )
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(
            ErrorCode.INVALID_ENCODING,
            f"{what} is not UTF-8: byte {exc.start} ({value[exc.start : exc.start + 1]!r})",
        ) from None
    try:
        return adapter.validate_json(value)
    except ValidationError as exc:
        raise _invalid_event(exc, what) from None


def _invalid_event(exc: ValidationError, what: str) -> InvalidEvent:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return InvalidEvent(
            ErrorCode.INVALID_JSON,
            f"{what} is not valid JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}",
        )
    reasons = [_describe(error) for error in errors[:MAX_REASONS]]
    more = f" (and {len(errors) - MAX_REASONS} more)" if len(errors) > MAX_REASONS else ""
    first_field = _field(errors[0]["loc"]) if errors else None
    if errors and errors[0]["type"].startswith("union_tag"):
        first_field = "type"
    return InvalidEvent(
        ErrorCode.INVALID_EVENT, f"invalid {what}: " + "; ".join(reasons) + more, first_field
    )


def _field(loc: tuple[Any, ...]) -> str | None:
    # A discriminated union puts the tag first ("product.upserted", "image", "url"): drop it.
    parts = [str(p) for p in loc if not (isinstance(p, str) and "." in p and p == loc[0])]
    return ".".join(parts) or None


def _describe(error: Any) -> str:
    field = _field(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_not_found":
        return "field 'type': missing (the event type tag)"
    if error["type"] == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        message = PATTERN_HINTS.get(pattern, message)
    if error["type"] == "union_tag_invalid":
        return f"field 'type': {message}"
    return f"field '{field}': {message}" if field else message
