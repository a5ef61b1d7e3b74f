"""Turning untrusted image bytes into the uint8 tensors the image towers read.

Decoding is bounded before any pixel is decoded: bytes, format, and the pixel count read from
the header (a decompression bomb is rejected, not decoded). The geometric transform works on
uint8 tensors ``(3, H, W)`` so the same code serves the CPU path (Pillow decode) and the CUDA
path (``torchvision.io.decode_jpeg`` on the GPU).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from loupe.encoders.batching import iter_budget
from loupe.encoders.errors import ImageRejected, Rejection
from loupe.encoders.jpeg_markers import read_jpeg_info
from loupe.encoders.profile import (
    MAX_IMAGE_ASPECT_RATIO,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE_PX,
    Fit,
)

# The only formats Pillow may even try: each extra decoder is extra attack surface.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
FORMAT_OF_MEDIA_TYPE = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what an image may cost to decode."""

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    min_side_px: int = MIN_IMAGE_SIDE_PX
    max_aspect_ratio: float = MAX_IMAGE_ASPECT_RATIO

    def refusal(self, width: int, height: int) -> tuple[Rejection, str] | None:
        """Why an image of these declared dimensions may not be decoded, or None."""
        if width * height > self.max_image_pixels:
            return (
                Rejection.IMAGE_TOO_LARGE,
                f"the image declares {width}x{height} pixels, over the "
                f"{self.max_image_pixels}-pixel limit",
            )
        if min(width, height) < self.min_side_px:
            return (
                Rejection.IMAGE_INVALID,
                f"the image is {width}x{height}, too small to search by (the shorter side "
                f"must be at least {self.min_side_px} pixels)",
            )
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            return (
                Rejection.IMAGE_INVALID,
                f"the image is {width}x{height}, longer than {self.max_aspect_ratio:g}:1 "
                "(a strip, not a product photo)",
            )
        return None


def decode_image(
    data: bytes,
    *,
    limits: DecodeLimits | None = None,
    media_type: str | None = None,
    target_side: int | None = None,
) -> Image.Image:
    """Decode untrusted bytes into an RGB Pillow image, upright (EXIF), alpha on white.

    ``target_side`` lets JPEG decode at a reduced DCT scale (Pillow's ``draft``) when the photo
    is much larger than the model input: several times faster, and the image is downsampled to
    ``target_side`` afterwards anyway. Raises ``ImageRejected`` with a specific code.
    """
    limits = limits or DecodeLimits()
    if not data:
        raise ImageRejected(Rejection.IMAGE_INVALID, "the image is empty (zero bytes)")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(
            Rejection.IMAGE_TOO_LARGE,
            f"the image is {len(data)} bytes, over the {limits.max_image_bytes}-byte limit",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(
            Rejection.IMAGE_INVALID,
            f"not a JPEG, PNG or WebP image (starts with {data[:8]!r})",
        ) from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above ours
        raise ImageRejected(
            Rejection.IMAGE_TOO_LARGE, f"decompression bomb refused ({exc})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(Rejection.IMAGE_INVALID, f"unreadable image header ({exc})") from None
    if media_type is not None:
        expected = FORMAT_OF_MEDIA_TYPE.get(media_type)
        if expected != image.format:
            raise ImageRejected(
                Rejection.IMAGE_INVALID,
                f"declared {media_type} but the content is {image.format}",
            )
    refused = limits.refusal(*image.size)
    if refused is not None:
        raise ImageRejected(*refused)
    if target_side is not None and image.format == "JPEG":
        # Oversample 2x so antialiased resizing afterwards sees enough detail.
        image.draft("RGB", (2 * target_side, 2 * target_side))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            Rejection.IMAGE_INVALID, f"the {image.format} image could not be decoded ({exc})"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparency becomes white: a product photo's backdrop."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        scaled = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB Pillow image to a ``(3, H, W)`` uint8 tensor (no copy beyond the one numpy makes)."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def fit_square(image: torch.Tensor, side: int, fit: Fit, fill: int = 255) -> torch.Tensor:
    """``(3, H, W)`` uint8 to ``(3, side, side)`` float32 in [0, 1].

    - ``pad``: the whole photo, its long side resized to ``side``, then padded to a square with
      white (the default: ``bench/preprocess.py`` measures it on the jewelry catalog).
    - ``center_crop``: ImageNet's habit: the central square of 0.875 of the short side, resized.
    - ``squash``: resize to a square ignoring the aspect ratio.

    Every intermediate is at most the input or ``side`` x ``side``: nothing is allocated from the
    untrusted dimensions beyond the decoded image itself (padding first would allocate the
    square of the long side: 12 TB for a 2,000,000 x 8 strip).
    """
    return fit_batch([image], side, fit, fill)[0]


# Float pixels one resize call may hold (x4 bytes x 3 channels): 32 MP is 384 MB, so a batch of
# 256 catalog photos of 850 x 850 resizes in a handful of calls, not one of 2.2 GB.
FIT_CHUNK_PIXELS = 32_000_000


def fit_batch(
    images: Sequence[torch.Tensor],
    side: int,
    fit: Fit,
    fill: int = 255,
    chunk_pixels: int = FIT_CHUNK_PIXELS,
) -> torch.Tensor:
    """``fit_square`` for many ``(3, H, W)`` uint8 images on one device at once:
    ``(len(images), 3, side, side)`` float32.

    Images of the same size share every step: one box filter, one antialiased resize and one
    strided copy into the batch per group (a catalog's photos are mostly one size), instead of
    several small kernels per photo. Each photo's result is exactly ``fit_square``'s (the
    operations are per sample; ``tests/unit/test_batched_fit.py``).
    """
    if fit not in ("pad", "center_crop", "squash"):
        raise ValueError(f"unknown fit {fit!r}; expected 'pad', 'center_crop' or 'squash'")
    device = images[0].device if images else torch.device("cpu")
    out = torch.empty((len(images), 3, side, side), device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(row)
    for (height, width), rows in groups.items():
        crop, (new_h, new_w), place = _fit_plan(height, width, side, fit)
        if place is not None:  # pad: the border is the fill colour, the photo goes inside
            out[rows] = fill / 255.0
        pixels = height * width
        for chunk in iter_budget(rows, lambda _, pixels=pixels: pixels, chunk_pixels):
            batch = torch.stack([images[row] for row in chunk])  # (n, 3, H, W) uint8
            if crop is not None:
                top, left, size = crop
                batch = batch[:, :, top : top + size, left : left + size]
            resized = _resize(batch, new_h, new_w)  # (n, 3, new_h, new_w)
            if place is None:
                out[chunk] = resized
            else:
                top, left = place
                index = torch.tensor(chunk, device=device)
                out[index, :, top : top + new_h, left : left + new_w] = resized
    return out


def _fit_plan(
    height: int, width: int, side: int, fit: Fit
) -> tuple[tuple[int, int, int] | None, tuple[int, int], tuple[int, int] | None]:
    """``(crop, resize_to, place)`` for one input size: the square to crop first (top, left,
    size) or None, the size to resize to, and where it goes in the padded square, or None."""
    if fit == "pad":
        longest = max(height, width)
        new_h = max(1, round(height * side / longest))
        new_w = max(1, round(width * side / longest))
        if (new_h, new_w) == (side, side):
            return None, (side, side), None
        return None, (new_h, new_w), ((side - new_h) // 2, (side - new_w) // 2)
    if fit == "center_crop":
        crop = max(1, round(min(height, width) * 0.875))
        return ((height - crop) // 2, (width - crop) // 2, crop), (side, side), None
    return None, (side, side), None  # squash


# EXIF orientation (1-8) as tensor operations on ``(..., H, W)``, the same transposes Pillow's
# ``ImageOps.exif_transpose`` applies (tested against it): 1 is upright, 6 a phone held upright.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),  # mirrored left-right
    3: lambda x: x.flip(-2, -1),  # upside down
    4: lambda x: x.flip(-2),  # mirrored top-bottom
    5: lambda x: x.transpose(-2, -1),  # mirrored along the main diagonal
    6: lambda x: torch.rot90(x, k=-1, dims=(-2, -1)),  # needs 90 degrees clockwise
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # mirrored along the anti-diagonal
    8: lambda x: torch.rot90(x, k=1, dims=(-2, -1)),  # needs 90 degrees anticlockwise
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a ``(C, H, W)`` tensor upright for an EXIF orientation; unknown values leave it.
    Returns a view: ``fit_square`` copies it anyway, so a full-size copy here would be waste."""
    return _ORIENT.get(orientation, _ORIENT[1])(image)


class JpegHeader(NamedTuple):
    orientation: int  # EXIF orientation, 1-8 (1: upright)
    pixels: int  # width x height: what decoding it will hold in memory, times 3 bytes
    width: int  # as stored, before orientation
    height: int


def plain_jpeg_header(data: bytes | None, limits: DecodeLimits) -> JpegHeader | None:
    """For a JPEG that is safe to batch-decode, what its header says; otherwise None.

    Safe means: within the byte, pixel and size limits, and RGB or greyscale (CMYK and the
    rest take the Pillow path). Anything odd returns None: the Pillow path then says exactly
    what is wrong with it. The markers are read directly (``jpeg_markers``), as Pillow reads
    them, at a tenth of the cost of opening the file with Pillow.
    """
    if data is None or len(data) > limits.max_image_bytes:
        return None
    info = read_jpeg_info(data)
    if info is None or info.components not in (1, 3):
        return None
    if limits.refusal(info.width, info.height) is not None:
        return None
    orientation = info.orientation if info.orientation in _ORIENT else 1
    return JpegHeader(orientation, info.width * info.height, info.width, info.height)


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 to ``(n, 3, height, width)`` float32 in [0, 1]."""
    batch = images.float().div_(255.0)
    in_h, in_w = batch.shape[-2:]
    step_h, step_w = max(1, in_h // (2 * height)), max(1, in_w // (2 * width))
    if step_h > 1 or step_w > 1:
        # Antialiased resizing costs input pixels x the downscale factor: first box-average by
        # a whole factor down to at least twice the target (linear in the input; what a JPEG
        # decoder's DCT scaling does, so both decode paths agree), then antialias the rest.
        batch = F.avg_pool2d(batch, (step_h, step_w), stride=(step_h, step_w), ceil_mode=True)
    if batch.shape[-2:] != (height, width):
        batch = F.interpolate(
            batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return batch.clamp_(0.0, 1.0)


def upright_size(data: bytes) -> tuple[int, int] | None:
    """The photo's width and height as shown (its EXIF orientation applied), from its header
    alone; None where Pillow cannot read the header."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # 5 to 8: stored turned a quarter
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
