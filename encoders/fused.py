"""The fused model's one entry point: products and queries in, per-view unit vectors out.

``FusedEncoder`` composes the units: ``ImagePreprocessor`` (bytes to pixels on the device), the
image and text towers (tensors to unit vectors), ``AttentionFusion`` (two views to the fused
one), micro-batching (``iter_batch``), mixed precision, and the policy that a non-finite vector
fails its own item. ``ModelProfile`` (``encoders/profile.py``) says what to build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loupe.encoders.batching import iter_batch
from loupe.encoders.device import Acceleration, pick_device
from loupe.encoders.errors import EncodeFailed, VectorNotFinite
from loupe.encoders.fusion import FusionConfig, FusionModel, fusion_digest, load_fusion
from loupe.encoders.graphs import SmallBatchGraphs
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
    # The text is a shopper's query, not a product's (a text tower may read the two with
    # different prefixes: e5's "query: " and "passage: "). encode_queries sets it.
    query: bool = False


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
        # Each tower's part of it: what its vectors depend on (a cache of one tower's vectors
        # stays valid when only the other tower changes).
        self.image_base = _image_base(image_encoder, fit)
        self.text_base = _text_base(text_encoder)
        self.model_version = model_version(self.base_version, fusion)
        on_cuda = device.type == "cuda"
        self._stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-stage")
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._stage_stream = (
            torch.cuda.Stream(device) if on_cuda and self.acceleration.overlap_batches else None
        )
        # The forward pass gets its own stream too: on CUDA's legacy default stream it would
        # wait for every blocking stream in the process, the JPEG decoders' own streams
        # included, and the stages could never overlap.
        self._forward_stream = torch.cuda.Stream(device) if self._stage_stream else None
        self.graphs: SmallBatchGraphs | None = None
        if self.acceleration.cuda_graphs:
            self.graphs = SmallBatchGraphs(
                self,
                side=image_encoder.input_side,
                capture=on_cuda,
                max_batch=self.acceleration.graph_max_batch,
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
            checkpoint.require_base(_base_version(image, text, profile.fit))
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
        self._stage.shutdown(wait=True)
        self._tokenizer_pool.shutdown(wait=True)

    # --- public API ---------------------------------------------------------------------

    def encode_products(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Catalog items: each must have an image and text."""
        _check_inputs(items, "product")
        return self._encode(items)

    def encode_queries(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """Shopper queries: image, text or both."""
        _check_inputs(items, "query")
        return self._encode([i if i.query else dataclasses.replace(i, query=True) for i in items])

    def encode_towers(self, items: Sequence[EncodeInput]) -> list[Encoded]:
        """The frozen towers' unit vectors (``image``, ``text``), before the trainable heads and
        the fusion: what ``loupe train`` learns from."""
        _check_inputs(items, "item")
        return self._encode(items, towers_only=True)

    # --- stages -------------------------------------------------------------------------

    def stream(self, *, products: bool = True) -> EncodeStream:
        """A two-stage pipeline for a caller that produces micro-batches as it goes (ingest,
        whose photos arrive from the fetch pool): ``put`` starts preparing one micro-batch and
        runs the previous one's forward pass, so the device works while the caller gathers the
        next. ``products``: each item needs a photo and text (else a query: either)."""
        return EncodeStream(self, products=products)

    def _encode(self, items: Sequence[EncodeInput], towers_only: bool = False) -> list[Encoded]:
        batches = list(iter_batch(items, self.batch_size))
        if len(batches) == 1:  # nothing to overlap: no hop to the stage thread (a query)
            return self._encode_isolated(batches[0], towers_only)
        stream = EncodeStream(self, towers_only=towers_only)
        results: list[Encoded] = []
        for batch in batches:
            results.extend(r for _, done in stream.put(batch) for r in done)
        results.extend(r for _, done in stream.flush() for r in done)
        return results

    def _encode_isolated(self, batch: list[EncodeInput], towers_only: bool) -> list[Encoded]:
        """A batch whose preparation or forward pass raises is encoded again item by item, so
        that the item that causes it fails alone (``EncodeFailed``) and the others are
        encoded."""
        try:
            return self._forward(self._prepare(batch, on_stage=False), towers_only)
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

    def _prepare(self, batch: list[EncodeInput], on_stage: bool = True) -> _Prepared:
        """Everything before the towers: photos to pixels on the device, texts to tokens on
        the device. ``on_stage`` (the stage thread, on CUDA): on the stage stream, recording an
        event the forward pass waits for; otherwise on the caller's stream."""
        on_stage = on_stage and self._stage_stream is not None
        # Texts tokenize in their own thread (the Rust tokenizer releases the GIL) while the
        # photos decode: on a GPU machine each takes about as long as the other.
        texted = [i for i, item in enumerate(batch) if item.text]
        host_tokens = (
            self._tokenizer_pool.submit(
                self.text_encoder.tokenize,
                [batch[i].text[:MAX_TEXT_CHARS] for i in texted],
                torch.device("cpu"),
                [batch[i].query for i in texted],
            )
            if texted
            else None
        )
        with torch.cuda.stream(self._stage_stream) if on_stage else contextlib.nullcontext():
            out = [Encoded() for _ in batch]
            with_image = [i for i, item in enumerate(batch) if item.image is not None]
            pixels, rows, failures = self.preprocessor.batch(
                [Photo(batch[i].image, batch[i].media_type) for i in with_image]
            )
            for j, error in failures.items():
                out[with_image[j]].error = error
            image_rows = [with_image[j] for j in rows]
            text_rows = [i for i in texted if out[i].ok]  # not the items whose photo failed
            tokens = None
            if host_tokens is not None:
                texts = host_tokens.result()
                if text_rows and len(text_rows) < len(texted):
                    keep = [texted.index(i) for i in text_rows]
                    texts = {name: t[keep] for name, t in texts.items()}
                if text_rows:
                    tokens = {name: t.to(self.device) for name, t in texts.items()}
            ready = None
            if on_stage:
                ready = torch.cuda.Event()
                ready.record(self._stage_stream)
        return _Prepared(
            batch, out, image_rows, pixels if image_rows else None, text_rows, tokens, ready
        )

    def _forward(self, prepared: _Prepared, towers_only: bool) -> list[Encoded]:
        if self._forward_stream is None:
            return self._forward_on_current_stream(prepared, towers_only)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._forward_stream):
            self._forward_stream.wait_stream(caller)  # what the caller queued (a serial prepare)
            return self._forward_on_current_stream(prepared, towers_only)

    def _forward_on_current_stream(self, prepared: _Prepared, towers_only: bool) -> list[Encoded]:
        out, image_rows, text_rows = prepared.out, prepared.image_rows, prepared.text_rows
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if prepared.ready is not None:  # made on the stage stream: wait for it
            stream.wait_event(prepared.ready)
        if stream is not None:  # made on another stream: tell the allocator who uses it now
            for tensor in [prepared.pixels, *(prepared.tokens or {}).values()]:
                if tensor is not None:
                    tensor.record_stream(stream)
        with torch.inference_mode(), self._autocast():
            image_vecs = (
                self._image_vectors(prepared.pixels) if prepared.pixels is not None else None
            )  # (Bi, Di)
            text_vecs = (
                self._text_vectors(prepared.tokens) if prepared.tokens is not None else None
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

    def _image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        graphed = self.graphs.image(pixels) if self.graphs is not None else None
        return graphed if graphed is not None else self.image_encoder.encode(pixels)

    def _text_vectors(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        graphed = (
            self.graphs.text(tokens["input_ids"], tokens["attention_mask"])
            if self.graphs is not None
            else None
        )
        if graphed is not None:
            return graphed
        return F.normalize(self.text_encoder(**tokens).float(), dim=-1)

    def _autocast(self, graph_safe: bool = False) -> contextlib.AbstractContextManager:
        """Mixed precision as planned. ``graph_safe``: without autocast's weight cache, whose
        copies would be freed under a captured graph that still reads them."""
        dtype = self.acceleration.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(
            device_type=self.device.type, dtype=dtype, cache_enabled=not graph_safe
        )


class EncodeStream:
    """Micro-batches in, their results out one step later (``FusedEncoder.stream``).

    With ``overlap_batches`` (CUDA's default) the stage thread prepares batch k+1 (decode, fit,
    tokenize, copy, on its own CUDA stream) while the caller's thread runs batch k's forward
    pass; without it each ``put`` encodes its batch at once. Either way a batch whose
    preparation or forward pass raises is encoded again item by item, so only the item that
    causes it fails.
    """

    def __init__(
        self, encoder: FusedEncoder, *, products: bool = False, towers_only: bool = False
    ) -> None:
        self.encoder = encoder
        self.products = products
        self.towers_only = towers_only
        self._pending: tuple[object, list[EncodeInput], Future] | None = None

    def put(self, batch: Sequence[EncodeInput], tag: object = None) -> list[tuple[object, list]]:
        """Start on ``batch``; returns ``(tag, results)`` for each batch finished meanwhile
        (the previous one, or this one when batches do not overlap)."""
        batch = list(batch)
        _check_inputs(batch, "product" if self.products else "item")
        if not batch:
            return []
        encoder = self.encoder
        if not encoder.acceleration.overlap_batches:
            return [(tag, encoder._encode_isolated(batch, self.towers_only))]
        previous = self._pending
        # This batch's preparation starts first, then the previous batch's forward pass runs
        # here: the two overlap. (The other way round, each waited for the other.)
        self._pending = (tag, batch, encoder._stage.submit(encoder._prepare, batch))
        return self._finish(previous) if previous is not None else []

    def flush(self) -> list[tuple[object, list]]:
        """Finish the batch in flight, if any."""
        if self._pending is None:
            return []
        pending, self._pending = self._pending, None
        return self._finish(pending)

    def _finish(self, pending: tuple[object, list[EncodeInput], Future]) -> list[tuple]:
        tag, batch, prepared = pending
        try:
            return [(tag, self.encoder._forward(prepared.result(), self.towers_only))]
        except Exception:  # whatever failed, find the item that causes it, alone
            return [(tag, self.encoder._encode_isolated(batch, self.towers_only))]


@dataclass
class _Prepared:
    """A micro-batch ready for the towers (``FusedEncoder._prepare``)."""

    items: list[EncodeInput]
    out: list[Encoded]  # one per item; failed items already carry their error
    image_rows: list[int]  # items whose photo is in ``pixels``, in order
    pixels: torch.Tensor | None  # (Bi, 3, S, S) on the device
    text_rows: list[int]  # items whose text is in ``tokens``, in order
    tokens: dict[str, torch.Tensor] | None  # (Bt, T) ids and mask on the device
    ready: torch.cuda.Event | None  # recorded on the stage stream when all of it is there


def _check_inputs(items: Sequence[EncodeInput], kind: str) -> None:
    """A ``product`` needs a photo and text; a ``query`` or ``item`` either. Raises ValueError
    naming the first that does not."""
    for index, item in enumerate(items):
        if kind == "product" and (item.image is None or not item.text):
            raise ValueError(f"product {index} needs both an image and text")
        if item.image is None and not item.text:
            raise ValueError(f"{kind} {index} has neither an image nor text")


def model_version(base_version: str, fusion: FusionModel) -> str:
    """The towers' and preprocessing's identity plus the fusion's hash: a collection's name."""
    return f"{base_version}.fusion-{fusion_digest(fusion)}"


def _base_version(image: ImageEncoder, text: TextEncoder, fit: Fit) -> str:
    """The frozen part's identity: towers, their weights and the preprocessing. A fusion
    checkpoint is valid only on the base it was trained on. The model version is this plus the
    fusion's hash; it changes whenever weights or preprocessing change, and is safe as a
    collection name."""
    version = (
        f"{_image_identity(image)}.{_text_identity(text)}"
        f".{_image_reading(image, fit)}-t{text.max_tokens}"
    )
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)


def _image_base(image: ImageEncoder, fit: Fit) -> str:
    version = f"{_image_identity(image)}.{_image_reading(image, fit)}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)


def _text_base(text: TextEncoder) -> str:
    version = f"{_text_identity(text)}-t{text.max_tokens}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)


def _image_identity(image: ImageEncoder) -> str:
    return f"{image.name}-{image.weights_id}"


def _image_reading(image: ImageEncoder, fit: Fit) -> str:
    """How photos are read: the fit, the square's side, the pooling."""
    return f"{fit}{image.input_side}-{image.pooling}"


def _text_identity(text: TextEncoder) -> str:
    name = Path(text.name).name if Path(text.name).is_dir() else text.name
    return f"{name}-{text.weights_id}{text.centre_id}"
