"""Shopper photos of the product lying somewhere: the evaluation family ``scenes``.

A shopper who saw the ring on a friend's hand, in a shop window or on a café table photographs
a scene, not a catalog shot. Each photo here cuts the product out of its white studio backdrop
(the backdrop is plain, so its mask comes almost free), lays it on a generated surface, and
photographs that with a phone's light and optics:

- surfaces (this module's own; training draws others): wood grain, a woven fabric, marble with
  veins, a wrist (a skin-toned band across a darker ground), a velvet box (a dark, saturated
  tray with a lit rim), a cluttered table (other objects around the product);
- the product spans 30-70% of the frame's short side, is rotated up to 35 degrees, tilted in
  perspective, and casts a soft shadow;
- a white-balance shift, a vignette, uneven light across the frame, glare on a quarter of the
  photos, sensor noise, motion blur on a third, the long side 480-900 pixels, and JPEG at
  quality 45-85 (a fifth compressed twice).

Training never imports this module (``tests/unit/test_architecture.py``). Deterministic per
(photo, seed).
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter

from loupe.encoders.images import DecodeLimits, decode_image

STUDIO_WHITE = 236  # a studio pixel this bright or brighter is the backdrop
WORK_SIDE = 900  # the scene is composed at this long side, then photographed smaller
PRODUCT_SPAN = (0.30, 0.70)  # the product's long side, as a share of the frame's short side
ROTATION_DEGREES = 35.0
LONG_SIDE = (480, 900)
JPEG_QUALITY = (45, 85)
TWICE_COMPRESSED = 0.2
MOTION_BLUR_SHARE = 1 / 3
GLARE_SHARE = 0.25


def scene_photo(image_bytes: bytes, seed: int, limits: DecodeLimits | None = None) -> bytes:
    """A shopper's photo of the product in a scene (see the module). Decoded under the model's
    limits (``ImageRejected``)."""
    rng = random.Random(seed)
    studio = decode_image(image_bytes, limits=limits)
    product, alpha = _cut_out(studio)
    width, height = (
        (WORK_SIDE, WORK_SIDE * 3 // 4) if rng.random() < 0.5 else (WORK_SIDE * 3 // 4, WORK_SIDE)
    )
    ground = _SURFACES[rng.randrange(len(_SURFACES))]((width, height), rng)
    product, alpha = _posed(product, alpha, min(width, height), rng)
    left = rng.randint(0, max(0, width - product.width))
    top = rng.randint(0, max(0, height - product.height))
    _shadow(ground, alpha, (left, top), rng)
    ground.paste(product, (left, top), alpha)
    return _photographed(ground, rng)


def _cut_out(studio: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The product and its alpha, cropped to the product (the whole photo where no product is
    found on the backdrop)."""
    # Darker than the white sweep, thinned by a pixel so that no white fringe comes along.
    found = studio.convert("L").point(lambda v: 255 if v < STUDIO_WHITE else 0)
    alpha = found.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.GaussianBlur(1.0))
    box = alpha.getbbox() or (0, 0, *studio.size)
    return studio.crop(box), alpha.crop(box)


def _posed(
    product: Image.Image, alpha: Image.Image, short_side: int, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """Scaled to its span of the frame, rotated, and tilted in perspective."""
    span = rng.uniform(*PRODUCT_SPAN) * short_side
    scale = span / max(product.size)
    size = (max(8, round(product.width * scale)), max(8, round(product.height * scale)))
    product, alpha = product.resize(size, Image.BICUBIC), alpha.resize(size, Image.BILINEAR)
    angle = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)
    product = product.rotate(angle, Image.BICUBIC, expand=True)
    alpha = alpha.rotate(angle, Image.BILINEAR, expand=True)
    w, h = product.size
    inset = rng.uniform(0.0, 0.12) * w  # the far edge looks shorter: a phone held at an angle
    coefficients = _far_edge_narrowed((w, h), inset)
    product = product.transform((w, h), Image.PERSPECTIVE, coefficients, Image.BICUBIC)
    alpha = alpha.transform((w, h), Image.PERSPECTIVE, coefficients, Image.BILINEAR)
    return product, alpha


def _far_edge_narrowed(size: tuple[int, int], inset: float) -> list[float]:
    """Pillow's perspective coefficients (each output pixel's source point) that draw the image
    with its top edge ``inset`` pixels narrower at each end, its bottom edge as it was."""
    w, h = size
    corners = [(0, 0), (w, 0), (w, h), (0, h)]  # of the output
    sources = [(-inset, 0), (w + inset, 0), (w, h), (0, h)]  # the top samples a wider span
    rows, rhs = [], []
    for (x, y), (u, v) in zip(corners, sources, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return list(np.linalg.solve(np.array(rows, float), np.array(rhs, float)))


def _shadow(
    ground: Image.Image, alpha: Image.Image, at: tuple[int, int], rng: random.Random
) -> None:
    """A soft shadow of the product, cast away from a light above it."""
    dx, dy = rng.randint(-12, 12), rng.randint(4, 18)
    strength = rng.uniform(0.25, 0.55)
    shade = alpha.filter(ImageFilter.GaussianBlur(rng.uniform(6, 14))).point(
        lambda v: int(v * strength)
    )
    dark = Image.new("RGB", shade.size, (10, 8, 6))
    ground.paste(dark, (at[0] + dx, at[1] + dy), shade)


def _photographed(scene: Image.Image, rng: random.Random) -> bytes:
    """The scene as a phone camera records it: light, optics, sensor, size, compression."""
    pixels = np.asarray(scene, dtype=np.float32)  # (H, W, 3)
    height, width = pixels.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gains = np.array([rng.uniform(0.82, 1.18) for _ in range(3)], np.float32)
    pixels = pixels * gains / gains.mean()  # white balance
    radius = np.hypot((xs - width / 2) / width, (ys - height / 2) / height) / 0.71
    pixels *= (1.0 - rng.uniform(0.15, 0.45) * radius**2)[..., None]  # vignette
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    pixels *= (1.0 + rng.uniform(0.1, 0.35) * (ramp - ramp.mean()))[..., None]  # uneven light
    if rng.random() < GLARE_SHARE:
        gx, gy = rng.uniform(0, width), rng.uniform(0, height)
        spread = rng.uniform(0.05, 0.15) * width
        glare = np.exp(-(((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * spread**2)))
        pixels += rng.uniform(60, 140) * glare[..., None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 8), pixels.shape)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    if rng.random() < MOTION_BLUR_SHARE:
        image = _motion_blur(image, rng)
    side = rng.randint(*LONG_SIDE)
    scale = side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    quality = rng.randint(*JPEG_QUALITY)
    if rng.random() < TWICE_COMPRESSED:  # sent through a messaging app, then saved again
        image = Image.open(io.BytesIO(_jpeg(image, rng.randint(*JPEG_QUALITY)))).convert("RGB")
    return _jpeg(image, quality)


def _motion_blur(image: Image.Image, rng: random.Random) -> Image.Image:
    """A shaken hand: a short line kernel, horizontal, vertical or diagonal."""
    size = 5
    kernel = np.zeros((size, size), np.float32)
    direction = rng.randrange(4)
    for i in range(size):
        row, col = [(2, i), (i, 2), (i, i), (i, size - 1 - i)][direction]
        kernel[row, col] = 1.0
    return image.filter(ImageFilter.Kernel((size, size), kernel.flatten().tolist(), scale=size))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


# --- surfaces: each (width, height) and a generator to an RGB image ------------------------------


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs, ys


def _smooth_noise(size: tuple[int, int], cells: int, rng: random.Random) -> np.ndarray:
    """Noise in [0, 1] varying over about ``cells`` cells across the width."""
    width, height = size
    small = np.random.default_rng(rng.getrandbits(32)).random(
        (max(2, cells * height // width), max(2, cells))
    )
    grey = Image.fromarray((small * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    return np.asarray(grey, np.float32) / 255.0


def _image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def _wood(size: tuple[int, int], rng: random.Random) -> Image.Image:
    _, ys = _grid(size)
    base = np.array([rng.uniform(110, 180), rng.uniform(70, 120), rng.uniform(35, 70)], np.float32)
    warp = _smooth_noise(size, 3, rng) * rng.uniform(20, 50)
    rings = np.sin((ys + warp) / rng.uniform(6, 14)) * 0.5 + 0.5
    shade = 0.75 + 0.25 * rings + 0.1 * (_smooth_noise(size, 40, rng) - 0.5)
    return _image(base * shade[..., None])


def _fabric(size: tuple[int, int], rng: random.Random) -> Image.Image:
    xs, ys = _grid(size)
    colour = np.array([rng.uniform(40, 230) for _ in range(3)], np.float32)
    period = rng.uniform(3, 8)
    weave = np.sin(xs / period) * np.sin(ys / period)
    folds = _smooth_noise(size, 4, rng)
    shade = 0.8 + 0.12 * weave + 0.2 * (folds - 0.5)
    return _image(colour * shade[..., None])


def _marble(size: tuple[int, int], rng: random.Random) -> Image.Image:
    xs, ys = _grid(size)
    turbulence = _smooth_noise(size, 6, rng) * rng.uniform(4, 9)
    veins = np.abs(np.sin((xs + ys) / rng.uniform(40, 90) + turbulence)) ** 0.3
    base = rng.uniform(200, 240)
    grey = base - (1.0 - veins) * rng.uniform(60, 120)
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.92, 1.0)], np.float32)
    return _image(grey[..., None] * tint)


def _wrist(size: tuple[int, int], rng: random.Random) -> Image.Image:
    xs, ys = _grid(size)
    width, height = size
    skin = np.array(
        [rng.uniform(150, 230), rng.uniform(100, 170), rng.uniform(80, 140)], np.float32
    )
    ground = np.array([rng.uniform(20, 90) for _ in range(3)], np.float32)
    slope = rng.uniform(-0.4, 0.4)
    centre = height / 2 + slope * (xs - width / 2)
    band = np.clip(1.0 - np.abs(ys - centre) / (rng.uniform(0.25, 0.4) * height), 0, 1) ** 0.5
    rounded = skin * (0.8 + 0.2 * band)[..., None]
    mix = band[..., None]
    return _image(rounded * mix + ground * (1 - mix))


def _velvet_box(size: tuple[int, int], rng: random.Random) -> Image.Image:
    xs, ys = _grid(size)
    width, height = size
    colour = [
        (25, 30, 70),  # navy
        (80, 15, 30),  # burgundy
        (20, 20, 22),  # black
        (20, 60, 40),  # green
    ][rng.randrange(4)]
    nap = 0.85 + 0.15 * _smooth_noise(size, 60, rng)
    edge = np.minimum.reduce([xs, ys, width - xs, height - ys]) / (0.08 * min(width, height))
    rim = np.clip(1.0 - edge, 0, 1)  # the box's lit inner wall
    values = np.array(colour, np.float32) * nap[..., None] + 90 * rim[..., None]
    return _image(values)


def _cluttered_table(size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    table = tuple(rng.randint(120, 220) for _ in range(3))
    image = Image.new("RGB", size, table)
    layer = np.asarray(image, np.float32).copy()
    xs, ys = _grid(size)
    for _ in range(rng.randint(3, 7)):  # cups, a phone, keys, a napkin: blobs of other colours
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.2) * width, rng.uniform(0.05, 0.2) * height
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        layer[inside] = [rng.uniform(10, 250) for _ in range(3)]
    return _image(layer).filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))


_SURFACES = (_wood, _fabric, _marble, _wrist, _velvet_box, _cluttered_table)
