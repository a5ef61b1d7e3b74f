"""The fused model's one entry point: products and queries in, per-view unit vectors out.

``FusedEncoder`` composes the units: ``ImagePreprocessor`` (bytes to pixels on the device), the
image and text towers (tensors to unit vectors), ``AttentionFusion`` (two views to the fused
one), micro-batching (``iter_batch``), mixed precision, and the policy that a non-finite vector
fails its own item. ``ModelProfile`` (``encoders/profile.py``) says what to build.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loupe.encoders.batching import iter_batch
from loupe.encoders.device import Acceleration, pick_device
from loupe.encoders.errors import EncodeFailed, VectorNotFinite
from loupe.encoders.fusion import FusionConfig, FusionModel, fusion_digest, load_fusion
from loupe.encoders.image_towers import ImageEncoder
from loupe.encoders.images import DecodeLimits, Fit
from loupe.encoders.preprocess import DEVICE_DECODE_PIXELS, ImagePreprocessor, Photo
from loupe.encoders.profile import MAX_TEXT_CHARS, ModelProfile
from loupe.encoders.text_towers import TextEncoder
from loupe.schemas.errors import ItemFailed

__all__ = ["EncodeInput", "Encoded", "FusedEncoder", "ModelProfile"]

VIEWS = ("image", "text", "fused")

log = logging.getLogger(__name__)


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


class FusedEncoder:
    """Image tower + text tower + attention fusion, on one device.

    ``encode_products`` and ``encode_queries`` return one ``Encoded`` per input, in order; a bad
    image fails its own item only.
    """

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        fusion: FusionModel,
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
        self.acceleration = acceleration or Acceleration.for_device(device)
        self.acceleration.check(device)
        self.device = device
        self.batch_size = batch_size
        self.image_encoder = image_encoder.to(device).eval()
        self.text_encoder = text_encoder.to(device).eval()
        self.fusion = fusion.to(device).eval()
        if self.acceleration.channels_last:
            self.image_encoder = self.image_encoder.to(memory_format=torch.channels_last)
        self.preprocessor = ImagePreprocessor(
            side=image_encoder.input_side,
            device=device,
            acceleration=self.acceleration,
            fit=fit,
            limits=limits,
            decode_workers=decode_workers,
            device_decode_pixels=device_decode_pixels,
        )
        self.dims = {
            "image": image_encoder.dim,
            "text": text_encoder.dim,
            "fused": fusion.config.dim,
        }
        self.base_version = _base_version(image_encoder, text_encoder, fit)
        self.model_version = model_version(self.base_version, fusion)

    @property
    def fit(self) -> Fit:
        return self.preprocessor.fit

    @property
    def limits(self) -> DecodeLimits:
        return self.preprocessor.limits

    @classmethod
    def from_profile(cls, profile: ModelProfile | None = None) -> FusedEncoder:
        profile = profile or ModelProfile()
        image = ImageEncoder(
            profile.image_backbone,
            profile.image_weights,
            allow_download=profile.allow_download,
            pooling=profile.image_pooling,
        )
        text = TextEncoder(
            profile.text_backbone,
            profile.text_weights,
            allow_download=profile.allow_download,
            max_tokens=profile.max_text_tokens,
        )
        if profile.fusion_checkpoint is not None:
            checkpoint = load_fusion(profile.fusion_checkpoint)
            checkpoint.require_base(_base_version(image, text, profile.fit))
            fusion = checkpoint.model
        else:
            fusion = FusionModel(
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
        fusion: FusionModel | None = None,
    ) -> FusedEncoder:
        """Another encoder over the same towers (loaded once), with other batching or device
        steps; unset options are copied. The towers are shared: a channels-last plan changes
        their memory layout for both encoders, not their values. ``fusion``: other heads on the
        same towers (a trained checkpoint; the model version follows)."""
        return FusedEncoder(
            self.image_encoder,
            self.text_encoder,
            fusion if fusion is not None else self.fusion,
            device=self.device,
            fit=self.fit,
            limits=self.limits,
            batch_size=batch_size or self.batch_size,
            decode_workers=self.preprocessor.decode_workers,
            acceleration=acceleration or self.acceleration,
            device_decode_pixels=device_decode_pixels or self.preprocessor.device_decode_pixels,
        )

    def close(self) -> None:
        self.preprocessor.close()

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

    def encode_towers(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """The frozen towers' unit vectors (``image``, ``text``), before the trainable heads and
        the fusion: what ``loupe train`` learns from."""
        for index, item in enumerate(items):
            if item.image is None and not item.text:
                raise ValueError(f"item {index} has neither an image nor text")
        return self._encode(items, towers_only=True)

    # --- stages -------------------------------------------------------------------------

    def _encode(self, items: Sequence[EncodeInput], towers_only: bool = False) -> list[Encoded]:
        results: list[Encoded] = []
        for batch in iter_batch(items, self.batch_size):
            results.extend(self._encode_isolated(batch, towers_only))
        return results

    def _encode_isolated(self, batch: list[EncodeInput], towers_only: bool) -> list[Encoded]:
        """A batch whose forward pass raises is encoded again item by item, so that the item
        that causes it fails alone (``EncodeFailed``) and the others are encoded."""
        try:
            return self._encode_batch(batch, towers_only)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("encoding one item failed; it fails alone")
                return [Encoded(error=EncodeFailed(exc))]
            log.warning(
                "encoding a batch of %d failed (%s: %s); encoding its items one by one",
                len(batch),
                type(exc).__name__,
                exc,
            )
            return [
                result for item in batch for result in self._encode_isolated([item], towers_only)
            ]

    def _encode_batch(self, batch: list[EncodeInput], towers_only: bool) -> list[Encoded]:
        out = [Encoded() for _ in batch]
        with_image = [i for i, item in enumerate(batch) if item.image is not None]
        pixels, rows, failures = self.preprocessor.batch(
            [Photo(batch[i].image, batch[i].media_type) for i in with_image]
        )
        for j, error in failures.items():
            out[with_image[j]].error = error
        image_rows = [with_image[j] for j in rows]
        text_rows = [i for i, item in enumerate(batch) if item.text and out[i].ok]
        with torch.inference_mode(), self._autocast():
            image_vecs = self.image_encoder.encode(pixels) if image_rows else None  # (Bi, Di)
            text_vecs = (
                self.text_encoder.encode([batch[i].text[:MAX_TEXT_CHARS] for i in text_rows])
                if text_rows
                else None
            )  # (Bt, Dt)
            both = [] if towers_only else sorted(set(image_rows) & set(text_rows))
            fused = None
            if both:
                fused = self.fusion(
                    image_vecs[[image_rows.index(i) for i in both]],
                    text_vecs[[text_rows.index(i) for i in both]],
                ).float()  # (Bf, D)
            if not towers_only:  # the views' heads; the fused view took the towers' vectors
                image_vecs = self.fusion.image(image_vecs) if image_vecs is not None else None
                text_vecs = self.fusion.text(text_vecs) if text_vecs is not None else None
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


def model_version(base_version: str, fusion: FusionModel) -> str:
    """The towers' and preprocessing's identity plus the fusion's hash: a collection's name."""
    return f"{base_version}.fusion-{fusion_digest(fusion)}"


def _base_version(image: ImageEncoder, text: TextEncoder, fit: Fit) -> str:
    """The frozen part's identity: towers, their weights and the preprocessing. A fusion
    checkpoint is valid only on the base it was trained on. The model version is this plus the
    fusion's hash; it changes whenever weights or preprocessing change, and is safe as a
    collection name."""
    text_name = Path(text.name).name if Path(text.name).is_dir() else text.name
    version = (
        f"{image.name}-{image.weights_id}.{text_name}-{text.weights_id}"
        f".{fit}{image.input_side}-{image.pooling}-t{text.max_tokens}"
    )
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)
