"""Product events on ``loupe.products.v1``, keyed ``<merchant_id>/<product_id>``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, TypeAdapter

from loupe.schemas.common import (
    MAX_DESCRIPTION_CHARS,
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


def product_key(merchant_id: str, product_id: str) -> str:
    return f"{merchant_id}/{product_id}"


def parse_product_event(value: bytes | None) -> ProductUpserted | ProductDeleted:
    """Parse a ``loupe.products.v1`` value; raises ``InvalidEvent`` naming the bad field."""
    return parse_value(PRODUCT_EVENT_ADAPTER, value, "product event")
