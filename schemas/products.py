"""Product events on ``loupe.products.v1``, keyed ``<merchant_id>/<product_id>``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError

from loupe.schemas.common import (
    MAX_DESCRIPTION_CHARS,
    MAX_ID_CHARS,
    MAX_TITLE_CHARS,
    Attributes,
    Contract,
    Identifier,
    ImageRef,
    MerchantId,
    Price,
    Timestamp,
    Version,
)
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.parsing import parse_value

PRODUCTS_TOPIC = "loupe.products.v1"


class _ProductEventBase(Contract):
    event_id: Identifier = Field(description="unique per event; used to trace it end to end")
    occurred_at: Timestamp = Field(description="RFC 3339 with a zone offset")
    merchant_id: MerchantId
    product_id: Identifier
    version: Version | None = Field(
        default=None,
        description="increases per product; an event older than what is indexed is ignored",
    )

    @property
    def key(self) -> str:
        """The Kafka message key: one product's events stay in order on one partition."""
        return product_key(self.merchant_id, self.product_id)


class ProductUpserted(_ProductEventBase):
    """A product was added or changed: index (or re-index) its photo and text."""

    type: Literal["product.upserted"] = "product.upserted"
    title: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TITLE_CHARS)]
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] = ""
    attributes: Attributes = Field(default_factory=dict)
    price: Price | None = None
    image: ImageRef


class ProductDeleted(_ProductEventBase):
    """A product was removed: delete its point."""

    type: Literal["product.deleted"] = "product.deleted"


ProductEvent = Annotated[ProductUpserted | ProductDeleted, Field(discriminator="type")]
PRODUCT_EVENT_ADAPTER: TypeAdapter[ProductUpserted | ProductDeleted] = TypeAdapter(ProductEvent)


def is_stale(incoming: int | None, current: int | None) -> bool:
    """The version rule, per product key: an event older than the one applied is ignored. Equal
    versions apply again (an idempotent replay); an unversioned event follows Kafka's order."""
    return incoming is not None and current is not None and incoming < current


def product_key(merchant_id: str, product_id: str) -> str:
    return f"{merchant_id}/{product_id}"


def parse_product_event(value: bytes | None) -> ProductUpserted | ProductDeleted:
    """Parse a ``loupe.products.v1`` value; raises ``InvalidEvent`` naming the bad field."""
    return parse_value(PRODUCT_EVENT_ADAPTER, value, "product event")


def parse_product_record(
    key: bytes | None, value: bytes | None, occurred_at: datetime
) -> ProductUpserted | ProductDeleted:
    """A ``loupe.products.v1`` record: an event, or a tombstone (a null value) that deletes the
    product its key names. The topic is compacted, and a tombstone is how a merchant lets
    compaction forget a deleted product altogether; ``occurred_at`` is the record's time (a
    tombstone carries nothing else). Raises ``InvalidEvent``."""
    if value is not None:
        return parse_product_event(value)
    text = key.decode("utf-8", "replace") if key else ""
    merchant_id, _, product_id = text.partition("/")
    try:
        return ProductDeleted(
            event_id=f"tombstone:{text}"[:MAX_ID_CHARS],
            occurred_at=occurred_at,
            merchant_id=merchant_id,
            product_id=product_id,
        )
    except ValidationError:
        raise InvalidEvent(
            ErrorCode.INVALID_EVENT,
            "a tombstone (null value) deletes the product its key names, so its key must be "
            f"<merchant_id>/<product_id>; got {text[:80]!r}",
            field="key",
        ) from None
