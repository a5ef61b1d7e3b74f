"""The fused model's one entry point: products and queries in, per-view unit vectors out.

``FusedEncoder`` puts three parts together: the model (``FusedModel``, tensors in, unit vectors
out), the transforms (``ImagePreprocessor``: bytes to pixels; the text tower's tokenizer), and
the runtime (``EncoderRuntime``: micro-batches, threads, CUDA streams and graphs, mixed
precision). ``ModelProfile`` (``encoders/profile.py``) says what to build; ``from_profile``
builds it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Sequence

import torch
from PIL import Image

from loupe.encoders.device import Acceleration, pick_device, use_onnxruntime
from loupe.encoders.fusion import FusionConfig, FusionModel, load_fusion
from loupe.encoders.graphs import SmallBatchGraphs
from loupe.encoders.image_towers import ImageEncoder
from loupe.encoders.images import DecodeLimits, Fit
from loupe.encoders.items import VIEWS, Encoded, EncodeInput, check_inputs
from loupe.encoders.model import FusedModel, base_version
from loupe.encoders.onnx_tower import OnnxImageTower, OnnxUnavailable
from loupe.encoders.preprocess import DEVICE_DECODE_PIXELS, ImagePreprocessor
from loupe.encoders.profile import QUERY_REGION_SHARES, ModelProfile
from loupe.encoders.runtime import EncoderRuntime, EncodeStream
from loupe.encoders.text_towers import TextEncoder

__all__ = ["VIEWS", "EncodeInput", "Encoded", "FusedEncoder", "ModelProfile"]

log = logging.getLogger(__name__)


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
        image_backend: OnnxImageTower | None = None,
        query_regions: bool = True,
        region_shares: Sequence[float] = QUERY_REGION_SHARES,
    ) -> None:
        """``acceleration``: None for the device's defaults (``Acceleration.for_device``); tests
        switch single CUDA steps on for a CPU run. ``device_decode_pixels`` bounds one batch
        JPEG decode call. ``image_backend``: the image tower on ONNX Runtime, used where the
        plan is the CPU's in fp32 (``EncoderRuntime``)."""
        acceleration = acceleration or Acceleration.for_device(device)
        acceleration.check(device)
        self.model = FusedModel(
            image_encoder,
            text_encoder,
            fusion,
            device=device,
            fit=fit,
            channels_last=acceleration.channels_last,
        )
        preprocessor = ImagePreprocessor(
            side=image_encoder.input_side,
            device=device,
            acceleration=acceleration,
            fit=fit,
            limits=limits,
            decode_workers=decode_workers,
            device_decode_pixels=device_decode_pixels,
        )
        self.runtime = EncoderRuntime(
            self.model,
            preprocessor,
            acceleration,
            batch_size=batch_size,
            image_backend=image_backend,
            query_regions=query_regions,
            region_shares=region_shares,
        )

    # --- what it is ------------------------------------------------------------------------

    device = property(lambda self: self.model.device)
    dims = property(lambda self: self.model.dims)
    model_version = property(lambda self: self.model.model_version)
    base_version = property(lambda self: self.model.base_version)
    image_base = property(lambda self: self.model.image_base)
    text_base = property(lambda self: self.model.text_base)
    image_encoder = property(lambda self: self.model.image_encoder)
    text_encoder = property(lambda self: self.model.text_encoder)
    fusion = property(lambda self: self.model.fusion)
    fit = property(lambda self: self.model.fit)
    # --- how it runs ---
    acceleration = property(lambda self: self.runtime.acceleration)
    batch_size = property(lambda self: self.runtime.batch_size)
    preprocessor = property(lambda self: self.runtime.preprocessor)
    backend = property(lambda self: self.runtime.backend)  # what runs the image tower

    @property
    def graphs(self) -> SmallBatchGraphs | None:
        return self.runtime.graphs

    @property
    def limits(self) -> DecodeLimits:
        return self.preprocessor.limits

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: ModelProfile | None = None) -> FusedEncoder:
        profile = profile or ModelProfile()
        image = ImageEncoder(
            profile.image_backbone,
            profile.image_weights,
            allow_download=profile.allow_download,
            pooling=profile.image_pooling,
            input_side=profile.image_side,
        )
        text = TextEncoder(
            profile.text_backbone,
            profile.text_weights,
            allow_download=profile.allow_download,
            max_tokens=profile.max_text_tokens,
        )
        if profile.fusion_checkpoint is not None:
            checkpoint = load_fusion(profile.fusion_checkpoint)
            checkpoint.require_base(base_version(image, text, profile.fit))
            if checkpoint.image_tower:  # trained with the tower's last block: the model's own
                image.load_tuned(checkpoint.image_tower)
            fusion = checkpoint.model
        else:
            fusion = FusionModel(
                FusionConfig(image.dim, text.dim, image_weight=profile.image_weight)
            )
        device = pick_device(profile.device)
        on_cuda = device.type == "cuda"
        acceleration = dataclasses.replace(
            Acceleration.for_device(device, profile.precision),
            jpeg_decoder=profile.jpeg_decoder,
            host_decode_share=profile.host_decode_share if on_cuda else 0.0,
            cuda_graphs=on_cuda and profile.cuda_graphs,
            graph_max_batch=profile.cuda_graph_max_batch,
        )
        batch_size = profile.batch_size or (128 if on_cuda else 16)
        image_backend = None
        if use_onnxruntime(profile.encoder_backend, device, acceleration):
            try:
                image_backend = OnnxImageTower.load(image)
            except OnnxUnavailable as exc:
                log.warning("the image tower runs in PyTorch: %s", exc)
        decode_workers = profile.decode_workers or (min(16, os.cpu_count() or 2) if on_cuda else 2)
        return cls(
            image,
            text,
            fusion,
            device=device,
            fit=profile.fit,
            limits=DecodeLimits(profile.max_image_bytes, profile.max_image_pixels),
            batch_size=batch_size,
            decode_workers=decode_workers,
            acceleration=acceleration,
            image_backend=image_backend,
            query_regions=profile.query_regions,
            region_shares=profile.query_region_shares,
        )

    def with_options(
        self,
        *,
        acceleration: Acceleration | None = None,
        batch_size: int | None = None,
        device_decode_pixels: int | None = None,
        fusion: FusionModel | None = None,
        backend: str | None = None,
    ) -> FusedEncoder:
        """Another encoder over the same towers (loaded once), with other batching or device
        steps; unset options are copied. The towers are shared: a channels-last plan changes
        their memory layout for both encoders, not their values. ``fusion``: other heads on the
        same towers (a trained checkpoint; the model version follows). ``backend``: ``torch`` or
        ``onnxruntime`` for the image tower (its graph loaded if this encoder has none)."""
        onnx_image = self.runtime.onnx_image
        if backend == "torch":
            onnx_image = None
        elif backend == "onnxruntime" and onnx_image is None:
            onnx_image = OnnxImageTower.load(self.image_encoder)
        elif backend not in (None, "onnxruntime"):
            raise ValueError(f"backend must be torch or onnxruntime, got {backend!r}")
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
            image_backend=onnx_image,
            query_regions=self.runtime.query_regions,
            region_shares=self.runtime.region_shares,
        )

    def warm_up(self) -> int:
        """Pay the one-off costs now, not in a shopper's first query: the JPEG decoder's and
        the allocator's start, and the CUDA graphs for small batches (their capture also
        settles cuDNN's kernels for those shapes). Returns how many graphs were captured."""
        if self.device.type != "cuda":
            return 0  # nothing on a CPU is paid once: no decoder or graphs to start
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), "white").save(photo, "JPEG")
        self.encode_queries([EncodeInput(image=photo.getvalue(), text="warm-up")])
        if self.graphs is None:
            return 0
        captured = self.graphs.warm_up()
        log.info("captured %d CUDA graphs for small batches", captured)
        return captured

    def close(self) -> None:
        self.runtime.close()

    # --- encoding -----------------------------------------------------------------------

    def encode_products(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Catalog items: each must have an image and text."""
        check_inputs(items, "product")
        return self.runtime.encode(items)

    def encode_queries(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Shopper queries: image, text or both."""
        check_inputs(items, "query")
        return self.runtime.encode(
            [i if i.query else dataclasses.replace(i, query=True) for i in items]
        )

    def encode_towers(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """The frozen towers' unit vectors (``image``, ``text``), before the trainable heads and
        the fusion: what ``loupe train`` learns from."""
        check_inputs(items, "item")
        return self.runtime.encode(items, towers_only=True)

    def stream(self, *, products: bool = True) -> EncodeStream:
        """A two-stage pipeline for a caller that produces micro-batches as it goes (ingest,
        whose photos arrive from the fetch pool): ``put`` starts preparing one micro-batch and
        runs the previous one's forward pass, so the device works while the caller gathers the
        next. ``products``: each item needs a photo and text (else a query: either)."""
        return EncodeStream(self.runtime, products=products)
