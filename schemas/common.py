"""Field types and bounds shared by every v1 event.

Every bound here is enforced on input that merchants and shopper apps control; the numbers are
documented in ``schemas/README.md`` and exported into the JSON Schemas.
"""

from __future__ import annotations

import binascii
import math
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# Kafka's default message.max.bytes is 1 MiB; an event must fit with room for headers.
MAX_MESSAGE_BYTES = 1_000_000
# Inline images: 512 KiB decoded is 683 KiB as base64, leaving room for text in a 1 MiB message.
MAX_INLINE_IMAGE_BYTES = 512 * 1024
MAX_INLINE_IMAGE_BASE64_CHARS = 4 * math.ceil(MAX_INLINE_IMAGE_BYTES / 3)
MAX_URL_CHARS = 2048
ALLOWED_URL_SCHEMES = ("https", "http")
ALLOWED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 5000
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_ATTRIBUTE_LIST_ITEMS = 32
MAX_VERSION = 2**63 - 1  # fits a Kafka/Java long and Qdrant's integer payload


class Contract(BaseModel):
    """Base of every contract model: immutable, strict types, unknown fields ignored."""

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="ignore",
        str_strip_whitespace=False,
        ser_json_timedelta="float",
    )


# Printable ASCII, no leading/trailing space: safe in Kafka keys, logs, headers and URLs.
_ID_PATTERN = r"^[!-~](?:[ -~]*[!-~])?$"
_MERCHANT_PATTERN = r"^[!-.0-~]+$"
_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
_ATTRIBUTE_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
AMOUNT_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,4})?$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
# For JSON Schema readers only: the models check these rules in code, with clearer messages.
# An http(s) URL with a host, no credentials, no whitespace or control characters.
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@\x00-\x1f\x7f]+(?:[/?#][^\s\x00-\x1f\x7f]*)?$"
# Standard, padded base64 (RFC 4648), as binascii's strict mode accepts it.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# Error messages say what a pattern means, not the regex.
PATTERN_HINTS = {
    _ID_PATTERN: "must be printable ASCII without leading or trailing spaces",
    _MERCHANT_PATTERN: "must be printable ASCII without spaces or '/'",
    _TOPIC_PATTERN: "must be a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)",
    _ATTRIBUTE_KEY_PATTERN: "keys are letters, digits, '_', '.', '-' (at most 64, no leading "
    "'.' or '-')",
    AMOUNT_PATTERN: 'must be a decimal string such as "12999.00" (at most 4 decimals)',
    CURRENCY_PATTERN: 'must be an ISO 4217 code such as "INR"',
}


def is_identifier(value: str) -> bool:
    """Whether ``value`` satisfies the contract's id rule (for ids taken from raw keys)."""
    return 0 < len(value) <= MAX_ID_CHARS and re.fullmatch(_ID_PATTERN, value) is not None


Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN)
]
# The product key is "<merchant_id>/<product_id>", so a merchant id may not contain "/".
MerchantId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=_MERCHANT_PATTERN)
]
# RFC 3339 with a zone offset; naive is refused. The pattern says so to JSON Schema readers, for
# whom "format": "date-time" is only an annotation unless they opt in to format checks.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
Timestamp = Annotated[AwareDatetime, Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN})]
TopicName = Annotated[str, StringConstraints(pattern=_TOPIC_PATTERN)]
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]
AttributeKey = Annotated[str, StringConstraints(pattern=_ATTRIBUTE_KEY_PATTERN)]
AttributeText = Annotated[str, StringConstraints(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


FiniteNumber = Annotated[int | float, AfterValidator(_finite)]
AttributeValue = (
    AttributeText
    | bool
    | FiniteNumber
    | Annotated[list[AttributeText], Field(max_length=MAX_ATTRIBUTE_LIST_ITEMS)]
)
Attributes = Annotated[dict[AttributeKey, AttributeValue], Field(max_length=MAX_ATTRIBUTES)]


class Price(Contract):
    """A price as a decimal string (no float rounding) and an ISO 4217 currency code."""

    amount: Annotated[str, StringConstraints(pattern=AMOUNT_PATTERN)]
    currency: Annotated[str, StringConstraints(pattern=CURRENCY_PATTERN)]

    def as_float(self) -> float:
        return float(self.amount)


def check_image_url(url: str) -> str:
    """Syntax and scheme policy for an image URL (where it may point is checked at fetch time)."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("URL contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_URL_SCHEMES:
        allowed = ", ".join(ALLOWED_URL_SCHEMES)
        raise ValueError(f"URL scheme {parts.scheme or '(none)'!r} is not allowed ({allowed})")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials (user:password@)")
    return url


class ImageRef(Contract):
    """A product or query photo: exactly one of ``url``, or ``data`` with ``media_type``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["url"],
                    "properties": {"url": {"type": "string"}, "data": {"type": "null"}},
                },
                {
                    "required": ["data", "media_type"],
                    "properties": {
                        "data": {"type": "string", "minLength": 4, "pattern": BASE64_PATTERN},
                        "media_type": {"type": "string"},
                        "url": {"type": "null"},
                    },
                },
            ]
        }
    )

    url: Annotated[str, AfterValidator(check_image_url)] | None = Field(
        default=None,
        description=f"http(s) URL, at most {MAX_URL_CHARS} characters, no credentials",
        # check_image_url's rules for JSON Schema readers (the model keeps its clearer errors).
        json_schema_extra={"pattern": URL_PATTERN, "maxLength": MAX_URL_CHARS},
    )
    data: Annotated[str, StringConstraints(max_length=MAX_INLINE_IMAGE_BASE64_CHARS)] | None = (
        Field(
            default=None,
            description=f"standard base64 (RFC 4648, padded) of at most "
            f"{MAX_INLINE_IMAGE_BYTES} bytes",
        )
    )
    media_type: Literal["image/jpeg", "image/png", "image/webp"] | None = None

    @model_validator(mode="after")
    def _exactly_one_form(self) -> ImageRef:
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of 'url' or 'data' (with 'media_type')")
        if self.data is not None:
            if self.media_type is None:
                raise ValueError("'data' needs 'media_type' (image/jpeg, image/png or image/webp)")
            size = len(self.decoded())
            if size == 0:
                raise ValueError("'data' decodes to zero bytes")
            if size > MAX_INLINE_IMAGE_BYTES:
                raise ValueError(f"'data' decodes to {size} bytes, over {MAX_INLINE_IMAGE_BYTES}")
        return self

    def decoded(self) -> bytes:
        """The inline image's bytes (raises ValueError if ``data`` is not valid base64)."""
        if self.data is None:
            raise ValueError("this image is a URL, not inline data")
        try:
            return binascii.a2b_base64(self.data, strict_mode=True)
        except binascii.Error as exc:
            raise ValueError(f"'data' is not valid base64 ({exc})") from None
