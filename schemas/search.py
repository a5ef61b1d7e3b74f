"""Search requests (``loupe.search.requests.v1``) and responses (``loupe.search.responses.v1``),
both keyed by ``request_id``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

from loupe.schemas.common import (
    CURRENCY_PATTERN,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_TITLE_CHARS,
    AttributeKey,
    Attributes,
    AttributeText,
    Contract,
    FiniteNumber,
    Identifier,
    ImageRef,
    MerchantId,
    Price,
    Timestamp,
    TopicName,
)
from loupe.schemas.errors import ErrorCode
from loupe.schemas.parsing import parse_value

SEARCH_REQUESTS_TOPIC = "loupe.search.requests.v1"
SEARCH_RESPONSES_TOPIC = "loupe.search.responses.v1"
CORRELATION_HEADER = "loupe.request_id"

MAX_TOP_K = 100
DEFAULT_TOP_K = 10
MAX_QUERY_TEXT_CHARS = 1000
MAX_FILTER_VALUES = 20
MAX_FILTER_ATTRIBUTES = 16
MAX_ERROR_MESSAGE_CHARS = 1000

FilterValues = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_ATTRIBUTE_VALUE_CHARS)]],
    Field(max_length=MAX_FILTER_VALUES),
]
QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_TEXT_CHARS)]
NonNegative = Annotated[FiniteNumber, Field(ge=0)]


class SearchFilters(Contract):
    """Restrict hits. Lists match any of their values; ``attributes`` match exactly.
    ``price_min`` may not be above ``price_max`` (a rule JSON Schema cannot state)."""

    category: FilterValues | None = None
    subcategory: FilterValues | None = None
    material: FilterValues | None = None
    price_min: NonNegative | None = None
    price_max: NonNegative | None = None
    currency: Annotated[str, StringConstraints(pattern=CURRENCY_PATTERN)] | None = None
    attributes: Annotated[
        dict[AttributeKey, AttributeText | bool | FiniteNumber],
        Field(max_length=MAX_FILTER_ATTRIBUTES),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _price_range(self) -> SearchFilters:
        if (
            self.price_min is not None
            and self.price_max is not None
            and self.price_min > self.price_max
        ):
            raise ValueError(f"price_min ({self.price_min}) is above price_max ({self.price_max})")
        return self


class SearchRequested(Contract):
    """A shopper's query: a photo, text, or both."""

    # _has_a_query, for JSON Schema readers.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["image"], "properties": {"image": {"type": "object"}}},
                {
                    "required": ["text"],
                    "properties": {"text": {"type": "string", "pattern": r"\S"}},
                },
            ]
        }
    )

    type: Literal["search.requested"] = "search.requested"
    request_id: Identifier
    occurred_at: Timestamp
    merchant_id: MerchantId | None = Field(
        default=None, description="scope the search to one merchant's catalog"
    )
    image: ImageRef | None = None
    text: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_TEXT_CHARS)] | None
    ) = None
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = DEFAULT_TOP_K
    filters: SearchFilters = Field(default_factory=SearchFilters)
    reply_to: TopicName | None = Field(
        default=None, description=f"topic for the response (default {SEARCH_RESPONSES_TOPIC})"
    )

    @model_validator(mode="after")
    def _has_a_query(self) -> SearchRequested:
        if self.image is None and (self.text is None or not self.text.strip()):
            raise ValueError("give at least one of 'image' and 'text'")
        return self


class HitScores(Contract):
    """Per-view cosine similarities that are known for this hit (null where not computed)."""

    image: float | None = None
    text: float | None = None
    fused: float | None = None


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class PhotoRegion(Contract):
    """A part of the shopper's photo, upright as shown: its left and top edges and its size,
    as shares of the photo's width and height."""

    left: Share
    top: Share
    width: Share
    height: Share


class SearchHit(Contract):
    product_id: Identifier
    merchant_id: MerchantId
    score: float = Field(description="cosine similarity in the view the query used")
    scores: HitScores
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)]
    image_url: str | None = None
    attributes: Attributes = Field(default_factory=dict)
    price: Price | None = None
    region: PhotoRegion | None = Field(
        default=None,
        description="where in the shopper's photo the product was found, when Loupe matched a "
        "part of the photo rather than the whole (a product lying in a wider scene); null when "
        "the whole photo matched, or the query had no photo",
    )


class SearchError(Contract):
    code: ErrorCode
    message: Annotated[str, StringConstraints(max_length=MAX_ERROR_MESSAGE_CHARS)]


class SearchCompleted(Contract):
    """Exactly one per request: hits (``status: ok``) or an error with a code."""

    # _status_matches_error, for JSON Schema readers.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"status": {"const": "error"}}, "required": ["status"]},
            "then": {
                "required": ["error"],
                "properties": {"error": {"type": "object"}, "hits": {"maxItems": 0}},
            },
            "else": {"properties": {"error": {"type": "null"}}},
        }
    )

    type: Literal["search.completed"] = "search.completed"
    request_id: Identifier
    status: Literal["ok", "error"]
    error: SearchError | None = None
    hits: Annotated[list[SearchHit], Field(max_length=MAX_TOP_K)] = Field(default_factory=list)
    model_version: str
    took_ms: Annotated[float, Field(ge=0)]
    completed_at: Timestamp

    @model_validator(mode="after")
    def _status_matches_error(self) -> SearchCompleted:
        if (self.status == "error") != (self.error is not None):
            raise ValueError("'error' is set exactly when status is 'error'")
        if self.status == "error" and self.hits:
            raise ValueError("an error response carries no hits")
        return self


SearchRequest = Annotated[SearchRequested, Field(discriminator="type")]
SearchResponse = Annotated[SearchCompleted, Field(discriminator="type")]
SEARCH_REQUEST_ADAPTER: TypeAdapter[SearchRequested] = TypeAdapter(SearchRequest)
SEARCH_RESPONSE_ADAPTER: TypeAdapter[SearchCompleted] = TypeAdapter(SearchResponse)


def parse_search_request(value: bytes | None) -> SearchRequested:
    """Parse a ``loupe.search.requests.v1`` value; raises ``InvalidEvent`` naming the field."""
    return parse_value(SEARCH_REQUEST_ADAPTER, value, "search request")


def parse_search_response(value: bytes | None) -> SearchCompleted:
    """Parse a ``loupe.search.responses.v1`` value (for shopper apps and tests)."""
    return parse_value(SEARCH_RESPONSE_ADAPTER, value, "search response")
