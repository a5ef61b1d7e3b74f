"""Shopper photos for evaluation: three simulators, each independent of the training one.

- ``phone_photo`` ("loupe"): Loupe's own evaluation family, also the demo's and the
  benchmarks' shoppers: the product on a tinted table, tilted, framed off-centre in 4:3 with
  most of the product in frame, exposure, white balance, blur, JPEG 65-85.
- ``torchvision_photo`` ("torchvision"): standard torchvision transforms only, with parameters
  training does not use: a crop anywhere in the frame (scale 0.35-1.0 of the area, aspect
  0.5-2.0, so that some cut the product), a small rotation (up to 10 degrees, a light fill),
  colour jitter (brightness, contrast and saturation 0.4, hue 0.05), Gaussian blur (half the
  photos, sigma 0.1-3.0), a downscale (the long side 160-640 pixels) and JPEG at quality
  30-80. The studio backdrop is left as it is: only the jitter tints it.
- ``scene_photo`` ("scenes", ``loupe.evaluation.scenes``): the product cut out and laid on a
  generated surface (wood, fabric, marble, a wrist, a velvet box, a cluttered table), 30-70%
  of the frame, rotated, tilted, shadowed, then a phone's light, optics and compression.

Training's own simulator (``loupe.train.augment.shopper_photo``) crops 30-100% of the area,
rotates up to 30 degrees, and compresses at quality 15-90 on other backdrops.

Both are deterministic per (photo, seed).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageFilter
from torchvision.io import encode_jpeg

from loupe.encoders.images import DecodeLimits, decode_image
from loupe.train.augment import framing, product_body, product_mask

Simulator = Callable[[bytes, int, DecodeLimits | None], bytes]


def phone_photo(image_bytes: bytes, seed: int, limits: DecodeLimits | None = None) -> bytes:
    """A shopper's photo of the product (Loupe's evaluation family): off-centre, tilted,
    zoomed, warmer or cooler, softer, on a table instead of a white sweep, in 4:3,
    re-compressed. Decoded under the model's limits (``ImageRejected``)."""
    rng = random.Random(seed)
    image = decode_image(image_bytes, limits=limits)
    width, height = image.size
    # The product on a tinted surface: replace the white backdrop by a table colour.
    table = tuple(rng.randint(170, 235) for _ in range(3))
    body = product_body(image)
    image = Image.composite(image, Image.new("RGB", image.size, table), product_mask(image))
    # Tilt, and frame it off-centre and closer or farther than the catalog shot, with the
    # product in the frame.
    angle = rng.uniform(-15, 15)
    image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=table)
    body = body.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
    zoom = rng.uniform(0.75, 1.05)
    crop_w, crop_h = int(width * zoom), int(height * zoom * 0.75)
    left, top = framing(
        body,
        (crop_w, crop_h),
        lambda: (
            rng.randint(min(0, width - crop_w), max(0, width - crop_w)),
            rng.randint(min(0, height - crop_h), max(0, height - crop_h)),
        ),
    )
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


# The torchvision simulator's parameters: the module docstring says why each is what it is.
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (0.5, 2.0)
ROTATION_DEGREES = 10.0
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.05}
BLUR = {"kernel_size": 9, "sigma": (0.1, 3.0)}
BLUR_P = 0.5
LONG_SIDE = (160, 640)
JPEG_QUALITY = (30, 80)


def torchvision_photo(image_bytes: bytes, seed: int, limits: DecodeLimits | None = None) -> bytes:
    """A shopper's photo made of standard torchvision transforms only (see the module). Decoded
    under the model's limits (``ImageRejected``)."""
    image = TF.pil_to_tensor(decode_image(image_bytes, limits=limits))  # (3, H, W) uint8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, height, width = T.RandomResizedCrop.get_params(
            image, scale=list(CROP_SCALE), ratio=list(CROP_RATIO)
        )
        image = TF.crop(image, top, left, height, width)  # anywhere, aspect kept
        fill = [int(v) for v in torch.randint(180, 256, (3,))]
        image = T.RandomRotation(ROTATION_DEGREES, fill=fill)(image)
        image = T.ColorJitter(**JITTER)(image)
        image = T.RandomApply([T.GaussianBlur(**BLUR)], p=BLUR_P)(image)
        side = int(torch.randint(LONG_SIDE[0], LONG_SIDE[1] + 1, ()))
        scale = side / max(image.shape[-2:])
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        image = TF.resize(image, size, antialias=True)
        quality = int(torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, ()))
    return encode_jpeg(image, quality=quality).numpy().tobytes()


def _scene_photo(image_bytes: bytes, seed: int, limits: DecodeLimits | None = None) -> bytes:
    from loupe.evaluation.scenes import scene_photo  # its own module: generators of scenes

    return scene_photo(image_bytes, seed, limits)


SIMULATORS: dict[str, Simulator] = {
    "loupe": phone_photo,
    "torchvision": torchvision_photo,
    "scenes": _scene_photo,
}
