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

from loupe.encoders.errors import ImageRejected
from loupe.encoders.profile import (
    MAX_IMAGE_ASPECT_RATIO,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE_PX,
    Fit,
)
from loupe.schemas.errors import ErrorCode

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

    def refusal(self, width: int, height: int) -> tuple[ErrorCode, str] | None:
        """Why an image of these declared dimensions may not be decoded, or None."""
        if width * height > self.max_image_pixels:
            return (
                ErrorCode.IMAGE_TOO_LARGE,
                f"the image declares {width}x{height} pixels, over the "
                f"{self.max_image_pixels}-pixel limit",
            )
        if min(width, height) < self.min_side_px:
            return (
                ErrorCode.IMAGE_INVALID,
                f"the image is {width}x{height}, too small to search by (the shorter side "
                f"must be at least {self.min_side_px} pixels)",
            )
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            return (
                ErrorCode.IMAGE_INVALID,
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
        raise ImageRejected(ErrorCode.IMAGE_INVALID, "the image is empty (zero bytes)")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image is {len(data)} bytes, over the {limits.max_image_bytes}-byte limit",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(
            ErrorCode.IMAGE_INVALID,
            f"not a JPEG, PNG or WebP image (starts with {data[:8]!r})",
        ) from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above ours
        raise ImageRejected(
            ErrorCode.IMAGE_TOO_LARGE, f"decompression bomb refused ({exc})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(ErrorCode.IMAGE_INVALID, f"unreadable image header ({exc})") from None
    if media_type is not None:
        expected = FORMAT_OF_MEDIA_TYPE.get(media_type)
        if expected != image.format:
            raise ImageRejected(
                ErrorCode.IMAGE_INVALID,
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
            ErrorCode.IMAGE_INVALID, f"the {image.format} image could not be decoded ({exc})"
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
    _, height, width = image.shape
    if fit == "pad":
        longest = max(height, width)
        new_h = max(1, round(height * side / longest))
        new_w = max(1, round(width * side / longest))
        resized = _resize(image, new_h, new_w)  # (3, <=side, <=side)
        if (new_h, new_w) == (side, side):
            return resized
        padded = torch.full((3, side, side), fill / 255.0, device=image.device)
        top, left = (side - new_h) // 2, (side - new_w) // 2
        padded[:, top : top + new_h, left : left + new_w] = resized
        return padded
    if fit == "center_crop":
        crop = max(1, round(min(height, width) * 0.875))
        top, left = (height - crop) // 2, (width - crop) // 2
        return _resize(image[:, top : top + crop, left : left + crop], side, side)
    if fit == "squash":
        return _resize(image, side, side)
    raise ValueError(f"unknown fit {fit!r}; expected 'pad', 'center_crop' or 'squash'")


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


def plain_jpeg_header(data: bytes | None, limits: DecodeLimits) -> JpegHeader | None:
    """For a JPEG that is safe to batch-decode, what its header says; otherwise None.

    Safe means: within the byte, pixel and size limits, and RGB or greyscale (CMYK and the
    rest take the Pillow path). Anything odd returns None: the Pillow path then says exactly
    what is wrong with it.
    """
    if data is None or len(data) > limits.max_image_bytes or not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as header:
            width, height = header.size
            if header.mode not in ("RGB", "L") or limits.refusal(width, height) is not None:
                return None
            # Read where exif_transpose reads it (EXIF, else XMP), so both paths agree.
            orientation = header.getexif().get(0x0112, 1)
            return JpegHeader(orientation if orientation in _ORIENT else 1, width * height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEGs in one call on ``device`` (nvjpeg on CUDA) to ``(3, H, W)`` uint8 tensors,
    as stored: the caller applies ``orient``. Raises RuntimeError if any one fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
    # torchvision applies EXIF orientation on the CPU but ignores the flag on CUDA
    # (torchvision/io/image.py, decode_jpegs_cuda), so it is off here on every device.
    return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch = image.unsqueeze(0).float().div_(255.0)  # (1, 3, H, W)
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
    return batch.squeeze(0).clamp_(0.0, 1.0)  # (3, side, side)
