"""Simulated shopper photos for training: one catalog photo in, a plausible phone photo out.

The evaluation simulators live in ``loupe.evaluation.simulators``, apart: this module never
imports them, so that training cannot learn the quirks of the simulator it is judged by. Every
step is drawn from a seeded ``random.Random``: the same (photo, seed) gives the same bytes,
which is what makes the feature cache valid.

``shopper_photo``'s steps, each applied with some probability, over ranges wider than any one
shopper's photo, because real ones vary in ways no single simulator foresees: half the photos
on another surface (flat, gradient or textured), some of those from a step back (the product
small in a wider frame), the other half on the catalog's own white sweep (a photo of a screen
or a print, a product page's image); rotation up to 30 degrees, perspective (the phone is not
square to the product), a crop of 30-100% of the area that usually keeps most of the product
and sometimes cuts it (``PARTIAL_FRAMING``), lighting and colour shifts, blur, noise, a low
resolution, JPEG at quality 15-90.

``framing`` picks where a crop goes: a crop that keeps most of the product's solid parts, so
that a tall pendant photo does not become a photo of its chain alone, or one that keeps only
part of it, as a shopper's close-up or careless framing does.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from loupe.encoders.images import DecodeLimits, decode_image

WORK_SIDE = 448  # the catalog photo is reduced to this first: every later step is cheaper
PRODUCT_IN_FRAME = 0.7  # share of the product's body a framing keeps
PARTIAL_IN_FRAME = 0.3  # ... and a partial one (a close-up, a careless crop) at least
PARTIAL_FRAMING = 0.35  # share of training photos framed partially
SCENE_SHARE = 0.5  # share of training photos on another surface (the rest keep the studio's)
FRAMING_TRIES = 32  # framings drawn before the one keeping the most of the product is taken


def studio_photo(image_bytes: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """The catalog photo, decoded once under the model's limits (merchant bytes are untrusted:
    size, pixel count, format) and reduced to ``WORK_SIDE``: what ``shopper_photo`` starts from.
    Raises ``ImageRejected``."""
    image = decode_image(image_bytes, limits=limits, target_side=WORK_SIDE)
    image.thumbnail((WORK_SIDE, WORK_SIDE), Image.BILINEAR)
    return image


class StudioMasks(NamedTuple):
    """What every simulated photo of one studio photo needs of it, computed once (their rank
    filters were half of the simulation's time)."""

    body: Image.Image  # ``product_body``: what a framing must keep
    mask: Image.Image  # ``product_mask``: what goes onto another surface


def studio_masks(studio: Image.Image) -> StudioMasks:
    return StudioMasks(product_body(studio), product_mask(studio))


def shopper_photo(studio: Image.Image, seed: int, masks: StudioMasks | None = None) -> bytes:
    """A JPEG of the product as a shopper might photograph it (training family), from
    ``studio_photo``'s image, which is not changed. Deterministic per seed. ``masks``: the
    studio's ``studio_masks``, when one studio makes many photos (the same bytes)."""
    rng = random.Random(seed)
    image = studio.copy()
    masks = masks or studio_masks(studio)
    body = masks.body  # moved with the photo, so that the crop knows the product
    surface = _surface(image.size, rng)
    fill = _edge(surface)
    if rng.random() < SCENE_SHARE:  # on a table, a cloth, a hand: not the studio sweep
        image = Image.composite(image, surface, masks.mask)  # the studio sweep replaced
        if rng.random() < 0.4:  # a step back: the product smaller in a wider frame
            image, body = _step_back(image, body, surface, rng.uniform(1.2, 2.2), rng)
    else:  # the catalog photo itself, re-photographed: its white sweep stays
        fill = (255, 255, 255)
    if rng.random() < 0.7:
        angle = rng.uniform(-30, 30)
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
        body = body.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
    if rng.random() < 0.4:
        coefficients = _perspective(image.size, rng)
        image = image.transform(
            image.size, Image.PERSPECTIVE, coefficients, Image.BILINEAR, fillcolor=fill
        )
        body = body.transform(body.size, Image.PERSPECTIVE, coefficients, Image.BILINEAR)
    keep = PARTIAL_IN_FRAME if rng.random() < PARTIAL_FRAMING else PRODUCT_IN_FRAME
    image = _resized_crop(image, body, rng, keep)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.35))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.65, 1.3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.4))
    if rng.random() < 0.6:
        image = _white_balance(image, rng.uniform(-25, 25))
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.5)))
    if rng.random() < 0.4:
        image = _noise(image, rng)
    if rng.random() < 0.5:  # a small or far-away shot, scaled back up by the app
        side = rng.randint(48, 200)
        small = image.resize((side, max(1, side * image.height // image.width)), Image.BILINEAR)
        image = small.resize(image.size, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(15, 90))
    return out.getvalue()


def _step_back(
    image: Image.Image, body: Image.Image, surface: Image.Image, factor: float, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """The photo shrunk by ``factor`` and laid somewhere on the surface, as a shopper standing
    farther away sees it; the product's body moves with it."""
    width, height = image.size
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    left, top = rng.randint(0, width - small[0]), rng.randint(0, height - small[1])
    canvas = surface.copy()
    canvas.paste(image.resize(small, Image.BILINEAR), (left, top))
    moved = Image.new("L", body.size, 0)
    moved.paste(body.resize(small, Image.BILINEAR), (left, top))
    return canvas, moved


def _surface(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A table, cloth or hand-ish surface: flat, a gradient, or a blurred texture."""
    width, height = size
    level = rng.randint(90, 240)  # mostly neutral surfaces, some tinted
    base = tuple(max(0, min(255, level + rng.randint(-30, 30))) for _ in range(3))
    kind = rng.random()
    if kind < 0.4:
        return Image.new("RGB", size, base)
    if kind < 0.75:
        other = tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in base)
        ramp = Image.linear_gradient("L").resize(size).rotate(rng.uniform(0, 360))
        return Image.composite(Image.new("RGB", size, base), Image.new("RGB", size, other), ramp)
    grain = _gaussian_noise((max(1, width // 8), max(1, height // 8)), rng.uniform(20, 60), rng)
    grain = grain.resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    tint = Image.new("RGB", size, base)
    return Image.blend(tint, Image.merge("RGB", (grain, grain, grain)), rng.uniform(0.2, 0.5))


def product_mask(image: Image.Image) -> Image.Image:
    """Where the product is, grown a little and softened: the alpha that lays the product on
    another surface."""
    return _foreground(image).filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(2))


def _foreground(image: Image.Image) -> Image.Image:
    """255 where the photo is darker than the white studio sweep, else 0."""
    return image.convert("L").point(lambda v: 255 if v < 238 else 0)


def product_body(image: Image.Image) -> Image.Image:
    """The product's solid parts, for framing: its mask with thin lines eroded away (a
    pendant's chain holds as many pixels as the pendant, yet a photo of the chain alone does not
    show the product); the whole mask when nothing is solid (a thin chain is the product)."""
    grey = _foreground(image)
    body = grey.filter(ImageFilter.MinFilter(2 * round(max(image.size) / 250) + 1))
    return body if body.getbbox() else grey


def framing(
    mask: Image.Image,
    size: tuple[int, int],
    draw: Callable[[], tuple[int, int]],
    keep: float = PRODUCT_IN_FRAME,
) -> tuple[int, int]:
    """The top-left corner of a ``size`` frame over an image whose product's body is ``mask``
    (``product_body``): corners from ``draw`` until one keeps at least ``keep`` of it, else
    the best of ``FRAMING_TRIES``. A free crop of a pendant's tall photo kept only its chain in
    12 of the catalog's 236 evaluation photos."""
    scale = max(1, max(mask.size) // 128)  # shares measured on a reduced mask: cheap, enough
    small = np.asarray(mask.reduce(scale), dtype=np.float64) / 255.0
    summed = np.zeros((small.shape[0] + 1, small.shape[1] + 1))
    summed[1:, 1:] = small.cumsum(axis=0).cumsum(axis=1)
    total = summed[-1, -1]
    best, best_share = draw(), -1.0
    if total <= 0:  # nothing but backdrop: any frame is as good
        return best
    corner = best
    for _ in range(FRAMING_TRIES):
        left, top = corner
        x0, y0 = (max(0, min(small.shape[1], round(v / scale))) for v in (left, top))
        x1 = max(0, min(small.shape[1], round((left + size[0]) / scale)))
        y1 = max(0, min(small.shape[0], round((top + size[1]) / scale)))
        share = (summed[y1, x1] - summed[y0, x1] - summed[y1, x0] + summed[y0, x0]) / total
        if share >= keep:
            return corner
        if share > best_share:
            best, best_share = corner, share
        corner = draw()
    return best


def _edge(surface: Image.Image) -> tuple[int, int, int]:
    return surface.getpixel((0, 0))


def _perspective(size: tuple[int, int], rng: random.Random) -> list[float]:
    """PIL ``PERSPECTIVE`` coefficients of a phone not held square to the product."""
    width, height = size
    shift = 0.12

    def jitter(x: float, y: float) -> tuple[float, float]:
        return (
            x + rng.uniform(-shift, shift) * width,
            y + rng.uniform(-shift, shift) * height,
        )

    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    moved = [jitter(x, y) for x, y in corners]
    return _perspective_coefficients(corners, moved)


def _perspective_coefficients(
    target: list[tuple[float, float]], source: list[tuple[float, float]]
) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform needs to map ``target`` onto ``source``."""
    rows = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, dtype=np.float64)  # (8, 8)
    b = np.array([c for point in source for c in point], dtype=np.float64)  # (8,)
    return np.linalg.solve(a, b).tolist()


def _resized_crop(
    image: Image.Image, body: Image.Image, rng: random.Random, keep: float
) -> Image.Image:
    """Keep 30-100% of the area at a phone-like aspect ratio, off-centre, with at least
    ``keep`` of the product's ``body`` in the frame."""
    width, height = image.size
    area = width * height * rng.uniform(0.3, 1.0)
    ratio = rng.choice((3 / 4, 4 / 3, 1.0, 9 / 16, 16 / 9)) * rng.uniform(0.9, 1.1)
    crop_w = min(width, max(16, round((area * ratio) ** 0.5)))
    crop_h = min(height, max(16, round((area / ratio) ** 0.5)))
    left, top = framing(
        body,
        (crop_w, crop_h),
        lambda: (rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)),
        keep,
    )
    return image.crop((left, top, left + crop_w, top + crop_h))


def _white_balance(image: Image.Image, shift: float) -> Image.Image:
    r, g, b = image.split()
    r = r.point(lambda v: max(0, min(255, int(v + shift))))
    b = b.point(lambda v: max(0, min(255, int(v - shift))))
    return Image.merge("RGB", (r, g, b))


def _noise(image: Image.Image, rng: random.Random) -> Image.Image:
    noise = _gaussian_noise(image.size, rng.uniform(8, 25), rng).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.04, 0.12))


def _gaussian_noise(size: tuple[int, int], sigma: float, rng: random.Random) -> Image.Image:
    """Grey noise around 128, drawn from ``rng``: Pillow's ``effect_noise`` draws from the C
    library's unseeded generator, so the same seed gave other photos on every call."""
    values = np.random.default_rng(rng.getrandbits(64)).normal(128.0, sigma, (size[1], size[0]))
    return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")
