"""A small client for Loupe's Kafka API, as a shopper-facing app would use it.

Requests are built with the contract's own models (so a bad request fails here, naming the
field, not in the service), photos are shrunk on the client before they are sent (the model reads
224 pixels; a 12-MP phone photo is 3 MB, over the 512 KiB inline limit), and answers are matched
to their request by key.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from loupe.encoders.profile import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from loupe.schemas.common import MAX_INLINE_IMAGE_BYTES, ImageRef
from loupe.schemas.errors import LoupeError
from loupe.schemas.search import SearchCompleted, SearchFilters, SearchRequested

# Plenty for the model's 224-pixel input, with room for crops and future backbones.
CLIENT_PHOTO_SIDE = 1024
_JPEG_QUALITIES = (90, 80, 70, 60)


class PhotoUnusable(LoupeError):
    """A local photo could not be read or shrunk. Policy: tell the user which file and why."""


class FilterInvalid(LoupeError):
    """A ``KEY=VALUE`` search filter is malformed. Policy: name the filter, send nothing."""


def shrink_photo(data: bytes, *, side: int = CLIENT_PHOTO_SIDE, name: str = "photo") -> bytes:
    """A JPEG of at most ``side`` pixels on its long side and at most 512 KiB, upright (EXIF
    orientation applied, so the service sees what the camera saw). Small JPEGs pass unchanged."""
    if len(data) > MAX_IMAGE_BYTES:
        raise PhotoUnusable(f"{name} is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise PhotoUnusable(
                    f"{name} is {image.width} x {image.height} pixels, over the "
                    f"{MAX_IMAGE_PIXELS}-pixel limit"
                )
            fits = image.format == "JPEG" and max(image.size) <= side
            if fits and len(data) <= MAX_INLINE_IMAGE_BYTES and not _exif_rotated(image):
                return data
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, much faster
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise PhotoUnusable(f"{name} is not an image Pillow can read ({exc})") from exc
    upright.thumbnail((side, side), Image.Resampling.LANCZOS)
    for quality in _JPEG_QUALITIES:
        out = io.BytesIO()
        upright.save(out, format="JPEG", quality=quality)
        if out.tell() <= MAX_INLINE_IMAGE_BYTES:
            return out.getvalue()
    raise PhotoUnusable(f"{name} does not fit in {MAX_INLINE_IMAGE_BYTES} bytes even as a JPEG")


def _exif_rotated(image: Image.Image) -> bool:
    return image.getexif().get(0x0112, 1) != 1  # 0x0112: the EXIF orientation tag


_LIST_FILTERS = ("category", "subcategory", "material")
_NUMBER_FILTERS = ("price_min", "price_max")


def parse_filters(pairs: list[str]) -> SearchFilters:
    """``["category=ring", "price_max=5000", "stone=ruby"]`` as the contract's filters; any other
    key filters on an attribute. Raises ``FilterInvalid`` naming the filter."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FilterInvalid(f"filter {pair!r}: expected KEY=VALUE, e.g. category=ring")
        if key in _LIST_FILTERS:
            fields.setdefault(key, []).append(value)
        elif key in _NUMBER_FILTERS:
            try:
                fields[key] = float(value)
            except ValueError:
                raise FilterInvalid(f"filter {key}: {value!r} is not a number") from None
        elif key == "currency":
            fields[key] = value
        else:
            fields.setdefault("attributes", {})[key] = value
    try:
        return SearchFilters.model_validate(fields)
    except ValueError as exc:
        raise FilterInvalid(f"filters: {first_error(exc)}") from None


def first_error(exc: ValueError) -> str:
    """A validation error's first problem, as ``field: message``."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(exc)


def search_request(
    *,
    photo: bytes | None = None,
    media_type: str = "image/jpeg",
    image_url: str | None = None,
    text: str | None = None,
    top_k: int = 10,
    merchant_id: str | None = None,
    filters: SearchFilters | Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> SearchRequested:
    """A validated ``search.requested`` event (raises pydantic's ``ValidationError``)."""
    image = None
    if photo is not None:
        image = ImageRef(data=base64.b64encode(photo).decode(), media_type=media_type)
    elif image_url is not None:
        image = ImageRef(url=image_url)
    if filters is not None and not isinstance(filters, SearchFilters):
        filters = SearchFilters.model_validate(dict(filters))
    return SearchRequested(
        request_id=request_id or f"cli-{uuid.uuid4().hex[:12]}",
        occurred_at=datetime.now(UTC),
        merchant_id=merchant_id,
        image=image,
        text=text,
        top_k=top_k,
        filters=filters or SearchFilters(),
    )


def encode_request(request: SearchRequested) -> tuple[bytes, bytes]:
    """The Kafka key and value of a request."""
    return request.request_id.encode(), request.model_dump_json(exclude_none=True).encode()


def read_photo(path: Path) -> bytes:
    """A local photo's bytes, shrunk for sending (see ``shrink_photo``)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PhotoUnusable(f"{path}: {exc.strerror}") from None
    if size > MAX_IMAGE_BYTES:
        raise PhotoUnusable(f"{path} is {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    return shrink_photo(path.read_bytes(), name=str(path))


def await_answers(
    consumer: Any, request_ids: set[str], timeout_s: float
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(request_id, value)`` for each awaited request's answer as it arrives, until all
    have come or ``timeout_s`` has passed. ``consumer`` reads the response topic from before the
    requests were sent."""
    waiting = {rid.encode(): rid for rid in request_ids}
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                rid = waiting.pop(record.key, None) if record.key is not None else None
                if rid is not None:
                    yield rid, record.value


def describe_answer(response: SearchCompleted) -> list[str]:
    """A person-readable table of an answer."""
    if response.status == "error":
        return [f"error {response.error.code}: {response.error.message}"]
    lines = [
        f"{len(response.hits)} hits in {response.took_ms:.0f} ms (model {response.model_version})",
        f"{'#':>2} {'score':>6} {'image':>6} {'text':>6} {'fused':>6}  {'price':>12}  title",
    ]
    for rank, hit in enumerate(response.hits, start=1):
        s = hit.scores
        cells = [f"{v:6.3f}" if v is not None else "     -" for v in (s.image, s.text, s.fused)]
        price = f"{hit.price.amount} {hit.price.currency}" if hit.price else ""
        lines.append(f"{rank:>2} {hit.score:6.3f} {' '.join(cells)}  {price:>12}  {hit.title}")
    region = response.hits[0].region if response.hits else None
    if region is not None:
        lines.append(
            f"matched the part of the photo {region.left:.0%} from its left and {region.top:.0%} "
            f"from its top, {region.width:.0%} of its width by {region.height:.0%} of its height"
        )
    return lines
