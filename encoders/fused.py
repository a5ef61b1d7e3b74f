"""The fused model's one entry point: products and queries in, per-view unit vectors out."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoders.batching import iter_batch, iter_budget
from encoders.device import Acceleration, Precision, pick_device, stack_on
from encoders.errors import ImageRejected, VectorNotFinite
from encoders.fusion import AttentionFusion, FusionConfig, fusion_digest, load_fusion
from encoders.image_towers import ImageEncoder
from encoders.images import (
    DecodeLimits,
    Fit,
    JpegHeader,
    decode_image,
    decode_jpegs,
    fit_square,
    orient,
    pil_to_uint8_tensor,
    plain_jpeg_header,
)
from encoders.text_towers import MAX_TEXT_TOKENS, TextEncoder
from schemas.errors import ItemFailed

VIEWS = ("image", "text", "fused")
MAX_TEXT_CHARS = 4000  # cut before tokenising: the tokenizer's cost grows with the input
# Pixels one batch-decode call may hold on the device (x3 bytes): 128 MP is 384 MB, ten 12-MP
# phone photos. Without it, 128 photos at the 40-MP limit would ask for 15 GB at once.
DEVICE_DECODE_PIXELS = 128_000_000


@dataclass(frozen=True)
class ModelProfile:
    """Which backbones, weights and preprocessing make up the model."""

    image_backbone: str = "efficientnet-lite0"  # a name in IMAGE_BACKBONES
    text_backbone: str = "all-minilm-l6-v2"  # a name in TEXT_BACKBONES or a model directory
    image_weights: str | None = None  # None: the backbone's default; a path; or "random"
    text_weights: str | None = None  # None: the backbone's default; a directory; or "random"
    fusion_checkpoint: Path | None = None  # None: untrained fusion (identity attention)
    image_weight: float = 0.5  # share of the fused cosine from the image view
    fit: Fit = "pad"  # how a photo becomes a square; see bench/preprocess.py
    max_text_tokens: int = MAX_TEXT_TOKENS
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: Precision = "auto"  # auto: fp16 autocast on CUDA, fp32 elsewhere
    batch_size: int | None = (
        None  # None: 16 on a CPU (cache-bound, see bench/encode.py), 128 on a GPU
    )
    decode_workers: int = 2  # threads decoding images (Pillow releases the GIL)
    max_image_bytes: int = DecodeLimits.max_image_bytes
    max_image_pixels: int = DecodeLimits.max_image_pixels
    allow_download: bool = False  # never on by default: no model hub at run time


@dataclass(frozen=True)
class EncodeInput:
    """One product or query. Products carry both; queries may lack either (not both)."""

    image: bytes | None = None
    media_type: str | None = None  # declared type, checked against the content if given
    text: str | None = None


@dataclass
class Encoded:
    """Per-view unit vectors that exist for an item, or why it could not be encoded."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    error: ItemFailed | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def compose_product_text(
    title: str, attributes: Mapping[str, object] | None = None, description: str = ""
) -> str:
    """Title first (it matters most and survives truncation), then attributes, then the rest."""
    parts = [title.strip()]
    if attributes:
        rendered = []
        for key, value in attributes.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            rendered.append(f"{key.replace('_', ' ')}: {shown}")
        parts.append("; ".join(rendered))
    if description.strip():
        parts.append(description.strip())
    return ". ".join(parts)[:MAX_TEXT_CHARS]


class FusedEncoder:
    """Image tower + text tower + attention fusion, on one device.

    ``encode_products`` and ``encode_queries`` return one ``Encoded`` per input, in order; a bad
    image fails its own item only.
    """

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        fusion: AttentionFusion,
        *,
        device: torch.device,
        fit: Fit = "pad",
        limits: DecodeLimits | None = None,
        batch_size: int = 32,
        decode_workers: int = 2,
        acceleration: Acceleration | None = None,
        device_decode_pixels: int = DEVICE_DECODE_PIXELS,
    ) -> None:
        """``acceleration``: None for the device's defaults (``Acceleration.for_device``); tests
        switch single CUDA steps on for a CPU run. ``device_decode_pixels`` bounds one batch
        JPEG decode call."""
        if (
            fusion.config.image_dim != image_encoder.dim
            or fusion.config.text_dim != text_encoder.dim
        ):
            raise ValueError(
                f"fusion expects ({fusion.config.image_dim}, {fusion.config.text_dim})-d towers, "
                f"the towers give ({image_encoder.dim}, {text_encoder.dim})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if device_decode_pixels < 1:
            raise ValueError(f"device_decode_pixels must be positive, got {device_decode_pixels}")
        self.device_decode_pixels = device_decode_pixels
        self.acceleration = acceleration or Acceleration.for_device(device)
        self.acceleration.check(device)
        self.device = device
        self.fit = fit
        self.limits = limits or DecodeLimits()
        self.batch_size = batch_size
        self.image_encoder = image_encoder.to(device).eval()
        self.text_encoder = text_encoder.to(device).eval()
        self.fusion = fusion.to(device).eval()
        if self.acceleration.channels_last:
            self.image_encoder = self.image_encoder.to(memory_format=torch.channels_last)
        self.decode_workers = max(1, decode_workers)
        self._pool = ThreadPoolExecutor(
            max_workers=self.decode_workers, thread_name_prefix="decode"
        )
        self.dims = {
            "image": image_encoder.dim,
            "text": text_encoder.dim,
            "fused": fusion.config.dim,
        }
        self.model_version = _model_version(image_encoder, text_encoder, fusion, fit)

    @classmethod
    def from_profile(cls, profile: ModelProfile = ModelProfile()) -> FusedEncoder:
        image = ImageEncoder(
            profile.image_backbone, profile.image_weights, allow_download=profile.allow_download
        )
        text = TextEncoder(
            profile.text_backbone,
            profile.text_weights,
            allow_download=profile.allow_download,
            max_tokens=profile.max_text_tokens,
        )
        if profile.fusion_checkpoint is not None:
            fusion = load_fusion(profile.fusion_checkpoint)
        else:
            fusion = AttentionFusion(
                FusionConfig(image.dim, text.dim, image_weight=profile.image_weight)
            )
        device = pick_device(profile.device)
        acceleration = Acceleration.for_device(device, profile.precision)
        batch_size = profile.batch_size or (128 if device.type == "cuda" else 16)
        return cls(
            image,
            text,
            fusion,
            device=device,
            fit=profile.fit,
            limits=DecodeLimits(profile.max_image_bytes, profile.max_image_pixels),
            batch_size=batch_size,
            decode_workers=profile.decode_workers,
            acceleration=acceleration,
        )

    def with_options(
        self,
        *,
        acceleration: Acceleration | None = None,
        batch_size: int | None = None,
        device_decode_pixels: int | None = None,
    ) -> FusedEncoder:
        """Another encoder over the same towers (loaded once), with other batching or device
        steps; unset options are copied. The towers are shared: a channels-last plan changes
        their memory layout for both encoders, not their values."""
        return FusedEncoder(
            self.image_encoder,
            self.text_encoder,
            self.fusion,
            device=self.device,
            fit=self.fit,
            limits=self.limits,
            batch_size=batch_size or self.batch_size,
            decode_workers=self.decode_workers,
            acceleration=acceleration or self.acceleration,
            device_decode_pixels=device_decode_pixels or self.device_decode_pixels,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- public API ---------------------------------------------------------------------

    def encode_products(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Catalog items: each must have an image and text."""
        for index, item in enumerate(items):
            if item.image is None or not item.text:
                raise ValueError(f"product {index} needs both an image and text")
        return self._encode(items)

    def encode_queries(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Shopper queries: image, text or both."""
        for index, item in enumerate(items):
            if item.image is None and not item.text:
                raise ValueError(f"query {index} has neither an image nor text")
        return self._encode(items)

    # --- stages -------------------------------------------------------------------------

    def preprocess(self, item: EncodeInput) -> torch.Tensor:
        """Bytes to a ``(3, S, S)`` float tensor in [0, 1] on the CPU (raises ImageRejected)."""
        if item.image is None:
            raise ValueError("preprocess needs an item with an image")
        side = self.image_encoder.input_side
        image = decode_image(
            item.image, limits=self.limits, media_type=item.media_type, target_side=side
        )
        return fit_square(pil_to_uint8_tensor(image), side, self.fit)

    def _encode(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        results: list[Encoded] = []
        for batch in iter_batch(items, self.batch_size):
            results.extend(self._encode_batch(batch))
        return results

    def _encode_batch(self, batch: list[EncodeInput]) -> list[Encoded]:
        out = [Encoded() for _ in batch]
        pixels, image_rows = self._pixels(batch, out)
        text_rows = [i for i, item in enumerate(batch) if item.text and out[i].ok]
        with torch.inference_mode(), self._autocast():
            image_vecs = self.image_encoder.encode(pixels) if image_rows else None  # (Bi, Di)
            text_vecs = (
                self.text_encoder.encode([batch[i].text[:MAX_TEXT_CHARS] for i in text_rows])
                if text_rows
                else None
            )  # (Bt, Dt)
            both = sorted(set(image_rows) & set(text_rows))
            fused = None
            if both:
                fused = self.fusion(
                    image_vecs[[image_rows.index(i) for i in both]],
                    text_vecs[[text_rows.index(i) for i in both]],
                ).float()  # (Bf, D)
        for view, rows, vecs in (
            ("image", image_rows, image_vecs),
            ("text", text_rows, text_vecs),
            ("fused", both if fused is not None else [], fused),
        ):
            if vecs is None:
                continue
            array = vecs.float().cpu().numpy()
            for j, i in enumerate(rows):
                out[i].vectors[view] = array[j]
        for result in out:
            bad = [v for v, vec in result.vectors.items() if not np.isfinite(vec).all()]
            if bad:
                result.vectors, result.error = {}, VectorNotFinite(bad)
        return out

    def _autocast(self):
        dtype = self.acceleration.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _pixels(
        self, batch: list[EncodeInput], out: list[Encoded]
    ) -> tuple[torch.Tensor, list[int]]:
        """Decode and preprocess every image of the batch; failures go into ``out``."""
        rows = [i for i, item in enumerate(batch) if item.image is not None]
        if self.acceleration.batch_jpeg_decode:
            tensors = self._batch_jpeg_decode(batch, rows)
        else:
            tensors = dict(
                zip(
                    rows,
                    self._pool.map(self._try_preprocess, [batch[i] for i in rows]),
                    strict=True,
                )
            )
        good = []
        for i in rows:
            result = tensors[i]
            if isinstance(result, ImageRejected):
                out[i].error = result
            else:
                good.append(i)
        if not good:
            return torch.empty(0), []
        stacked = stack_on(  # (B, 3, S, S)
            [tensors[i] for i in good], self.device, pinned=self.acceleration.pinned_copies
        )
        if self.acceleration.channels_last:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        return stacked, good

    def _try_preprocess(self, item: EncodeInput) -> torch.Tensor | ImageRejected:
        try:
            return self.preprocess(item)
        except ImageRejected as exc:
            return exc

    def _batch_jpeg_decode(
        self, batch: list[EncodeInput], rows: list[int]
    ) -> dict[int, torch.Tensor | ImageRejected]:
        """JPEGs decode in calls of at most ``device_decode_pixels`` on the model's device (nvjpeg
        on CUDA); other formats, and any call the decoder refuses, take the Pillow path."""
        results: dict[int, torch.Tensor | ImageRejected] = {}
        jpegs: list[tuple[int, JpegHeader]] = []
        for i in rows:
            header = plain_jpeg_header(batch[i].image, self.limits)
            if header is None:
                results[i] = self._try_preprocess(batch[i])
            else:
                jpegs.append((i, header))
        side = self.image_encoder.input_side
        for chunk in iter_budget(jpegs, lambda job: job[1].pixels, self.device_decode_pixels):
            try:
                decoded = decode_jpegs([batch[i].image for i, _ in chunk], self.device)
            except RuntimeError:  # one bad file (or no memory) fails the call: go per item
                decoded = [None] * len(chunk)
            for (i, header), image in zip(chunk, decoded, strict=True):
                results[i] = (
                    fit_square(orient(image, header.orientation), side, self.fit)
                    if image is not None
                    else self._try_preprocess(batch[i])
                )
            del decoded  # full-size photos: free them before the next call decodes more
        return results


def _model_version(
    image: ImageEncoder, text: TextEncoder, fusion: AttentionFusion, fit: Fit
) -> str:
    """Changes whenever weights or preprocessing change; safe as a collection name."""
    text_name = Path(text.name).name if Path(text.name).is_dir() else text.name
    version = (
        f"{image.name}-{image.weights_id}.{text_name}-{text.weights_id}"
        f".{fit}{image.input_side}-t{text.max_tokens}.fusion-{fusion_digest(fusion)}"
    )
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)
