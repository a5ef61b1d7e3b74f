"""How the model runs: micro-batches, threads, CUDA streams, CUDA graphs, mixed precision.

``EncoderRuntime`` turns ``EncodeInput`` items into ``Encoded`` results through a ``FusedModel``
in two public steps: ``prepare`` (photos to pixels on the device, texts to tokens on the device)
and ``forward`` (the towers, the heads, the policy that a non-finite vector fails its own item).
``EncodeStream`` overlaps them: while the device runs one micro-batch's forward pass, the stage
thread prepares the next. A batch whose preparation or forward pass raises is encoded again item
by item (``encode_isolated``), so the item that causes it fails alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from loupe.encoders.batching import iter_batch
from loupe.encoders.device import Acceleration, onnx_fits
from loupe.encoders.errors import EncodeFailed, VectorNotFinite
from loupe.encoders.graphs import SmallBatchGraphs
from loupe.encoders.items import Encoded, EncodeInput, Region, check_inputs
from loupe.encoders.model import FusedModel
from loupe.encoders.onnx_tower import OnnxImageTower
from loupe.encoders.preprocess import ImagePreprocessor, Photo
from loupe.encoders.profile import MAX_TEXT_CHARS, QUERY_REGION_SHARES, check_region_shares
from loupe.encoders.regions import crop_photo, crop_regions, region_boxes

log = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    """A micro-batch ready for the towers (``EncoderRuntime.prepare``)."""

    items: list[EncodeInput]
    out: list[Encoded]  # one per item; failed items already carry their error
    image_rows: list[int]  # items whose photo is in ``pixels``, in order
    pixels: torch.Tensor | None  # (Bi, 3, S, S) on the device
    # photo queries' photos as decoded (item index -> (3, H, W) uint8 on the host), where the
    # preprocessor kept them: their regions are cut from these
    uprights: dict[int, torch.Tensor]
    text_rows: list[int]  # items whose text is in ``tokens``, in order
    tokens: dict[str, torch.Tensor] | None  # (Bt, T) ids and mask on the device
    ready: torch.cuda.Event | None  # recorded on the stage stream when all of it is there


class EncoderRuntime:
    """Runs a ``FusedModel`` on its device as ``acceleration`` plans: the preprocessor's decode
    threads, a tokenizer thread, a stage thread with its own CUDA stream, a forward stream, and
    CUDA graphs for small batches."""

    def __init__(
        self,
        model: FusedModel,
        preprocessor: ImagePreprocessor,
        acceleration: Acceleration,
        *,
        batch_size: int,
        image_backend: OnnxImageTower | None = None,
        query_regions: bool = True,  # a photo query also encodes parts of it (regions.py)
        region_shares: Sequence[float] = QUERY_REGION_SHARES,
    ) -> None:
        """``image_backend``: the image tower on ONNX Runtime; used only under a plan it computes
        the same vectors in (the CPU, fp32: no autocast, no channels-last, no graphs)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.preprocessor = preprocessor
        self.acceleration = acceleration
        self.batch_size = batch_size
        self.query_regions = query_regions
        self.region_shares = check_region_shares(region_shares)
        self.device = model.device
        on_cuda = self.device.type == "cuda"
        self.onnx_image = image_backend
        self._onnx_in_use = image_backend if onnx_fits(self.device, acceleration) else None
        self._stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-stage")
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._stage_stream = (
            torch.cuda.Stream(self.device) if on_cuda and acceleration.overlap_batches else None
        )
        # The forward pass gets its own stream too: on CUDA's legacy default stream it would
        # wait for every blocking stream in the process, the JPEG decoders' own streams
        # included, and the stages could never overlap.
        self._forward_stream = torch.cuda.Stream(self.device) if self._stage_stream else None
        self.graphs: SmallBatchGraphs | None = None
        if acceleration.cuda_graphs:
            self.graphs = SmallBatchGraphs(
                model,
                autocast=self.autocast,
                side=model.input_side,
                capture=on_cuda,
                max_batch=acceleration.graph_max_batch,
                channels_last=acceleration.channels_last,
            )

    def close(self) -> None:
        self.preprocessor.close()
        self._stage.shutdown(wait=True)
        self._tokenizer_pool.shutdown(wait=True)

    # --- whole batches ---------------------------------------------------------------------

    def encode(self, items: Sequence[EncodeInput], towers_only: bool = False) -> list[Encoded]:
        """Every item, in micro-batches, overlapped; one result per item, in order.

        Items are batched by the length of their text: a micro-batch's texts are padded to its
        longest, so one product description among short queries (training's texts) would make
        the text tower read every query at the description's length."""
        if len(items) <= self.batch_size:  # nothing to overlap: no hop to the stage thread
            return self.encode_isolated(list(items), towers_only) if items else []
        order = sorted(range(len(items)), key=lambda i: len(items[i].text or ""))
        stream = EncodeStream(self, towers_only=towers_only)
        results: list[Encoded] = []
        for batch in iter_batch([items[i] for i in order], self.batch_size):
            results.extend(r for _, done in stream.put(batch) for r in done)
        results.extend(r for _, done in stream.flush() for r in done)
        in_order: list[Encoded | None] = [None] * len(items)
        for position, result in zip(order, results, strict=True):
            in_order[position] = result
        return in_order

    def encode_isolated(self, batch: list[EncodeInput], towers_only: bool) -> list[Encoded]:
        """One micro-batch, at once; if its preparation or forward pass raises, item by item,
        so that the item that causes it fails alone (``EncodeFailed``)."""
        try:
            return self.forward(self.prepare(batch, on_stage=False), towers_only)
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
                result for item in batch for result in self.encode_isolated([item], towers_only)
            ]

    def prepare_later(self, batch: list[EncodeInput]) -> Future:
        """``prepare(batch)`` on the stage thread (its own CUDA stream); a future of it."""
        return self._stage.submit(self.prepare, batch)

    # --- the two steps -----------------------------------------------------------------------

    def prepare(self, batch: list[EncodeInput], on_stage: bool = True) -> PreparedBatch:
        """Everything before the towers: photos to pixels on the device, texts to tokens on
        the device. ``on_stage`` (the stage thread, on CUDA): on the stage stream, recording an
        event the forward pass waits for; otherwise on the caller's stream."""
        on_stage = on_stage and self._stage_stream is not None
        text_encoder = self.model.text_encoder
        # Texts tokenize in their own thread (the Rust tokenizer releases the GIL) while the
        # photos decode: on a GPU machine each takes about as long as the other.
        texted = [i for i, item in enumerate(batch) if item.text]
        host_tokens = (
            self._tokenizer_pool.submit(
                text_encoder.tokenize,
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
            keep = [j for j, i in enumerate(with_image) if batch[i].query and self.query_regions]
            pixels, rows, failures, kept = self.preprocessor.batch_keeping(
                [Photo(batch[i].image, batch[i].media_type) for i in with_image], keep
            )
            uprights = {with_image[j]: upright for j, upright in kept.items()}
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
        pixels = pixels if image_rows else None
        return PreparedBatch(batch, out, image_rows, pixels, uprights, text_rows, tokens, ready)

    def forward(self, prepared: PreparedBatch, towers_only: bool) -> list[Encoded]:
        """The towers and the heads (only the towers with ``towers_only``: what ``loupe
        train`` learns from) on the forward stream; one ``Encoded`` per item."""
        if self._forward_stream is None:
            return self._forward_here(prepared, towers_only)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._forward_stream):
            self._forward_stream.wait_stream(caller)  # what the caller queued (a serial prepare)
            return self._forward_here(prepared, towers_only)

    def _forward_here(self, prepared: PreparedBatch, towers_only: bool) -> list[Encoded]:
        out, image_rows, text_rows = prepared.out, prepared.image_rows, prepared.text_rows
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if prepared.ready is not None:  # made on the stage stream: wait for it
            stream.wait_event(prepared.ready)
        if stream is not None:  # made on another stream: tell the allocator who uses it now
            for tensor in [prepared.pixels, *(prepared.tokens or {}).values()]:
                if tensor is not None:
                    tensor.record_stream(stream)
        with torch.inference_mode(), self.autocast():
            image_vecs, regions = self._image_and_regions(prepared)  # (Bi, Di)
            text_vecs = (
                self._text_vectors(prepared.tokens) if prepared.tokens is not None else None
            )  # (Bt, Dt)
            both = [] if towers_only else sorted(set(image_rows) & set(text_rows))
            if towers_only:
                views = {"image": image_vecs, "text": text_vecs}
            else:
                pairs = ([image_rows.index(i) for i in both], [text_rows.index(i) for i in both])
                views = self.model.heads(image_vecs, text_vecs, pairs)
            if regions is not None and not towers_only:  # the parts' image view
                regions = (*regions[:2], self.model.fusion.image(regions[2]))
        for view, rows in (("image", image_rows), ("text", text_rows), ("fused", both)):
            vecs = views.get(view)
            if vecs is None:
                continue
            array = vecs.float().cpu().numpy()
            for j, i in enumerate(rows):
                out[i].vectors[view] = array[j]
        if regions is not None:
            _attach_regions(out, image_rows, *regions)
        for result in out:
            bad = [v for v, vec in result.vectors.items() if not np.isfinite(vec).all()]
            if bad:
                result.vectors, result.error = {}, VectorNotFinite(bad)
        return out

    @property
    def backend(self) -> str:
        """What runs the image tower: ``onnxruntime`` or ``torch``."""
        return "onnxruntime" if self._onnx_in_use is not None else "torch"

    def _image_and_regions(self, prepared: PreparedBatch):
        """The batch's image tower vectors and, for its photo queries, ``(rows, boxes, region
        tower vectors)`` (None without photo queries, or with regions off)."""
        pixels = prepared.pixels
        if pixels is None:
            return None, None
        asked = [j for j, i in enumerate(prepared.image_rows) if prepared.items[i].query]
        if not asked or not self.query_regions:
            return self.image_vectors(pixels), None
        onnx = self._onnx_graph()
        if onnx is not None:
            vectors, heat = onnx.with_heat(pixels)
        else:  # eager: a captured graph gives the vectors alone
            vectors, heat = self.model.image_encoder.encode_with_heat(pixels)
        asked, boxes, parts = _parts(prepared, asked, heat, self.region_shares, self.preprocessor)
        return vectors, (asked, boxes, self.image_vectors(parts))

    def _onnx_graph(self) -> OnnxImageTower | None:
        """The ONNX graph in use, given up once the tower's weights changed (``load_tuned``)."""
        onnx = self._onnx_in_use
        if onnx is not None and not onnx.serves(self.model.image_encoder):
            log.warning("the image tower's weights changed since its graph was made: PyTorch")
            self._onnx_in_use = None
        return self._onnx_in_use

    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` pixels to the image tower's unit vectors, by whichever runs it
        (ONNX Runtime, a captured graph, or the tower itself)."""
        onnx = self._onnx_graph()
        if onnx is not None:
            return onnx(pixels)
        graphed = self.graphs.image(pixels) if self.graphs is not None else None
        return graphed if graphed is not None else self.model.image_towers(pixels)

    def _text_vectors(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        graphed = (
            self.graphs.text(tokens["input_ids"], tokens["attention_mask"])
            if self.graphs is not None
            else None
        )
        return graphed if graphed is not None else self.model.text_towers(tokens)

    def autocast(self, graph_safe: bool = False) -> contextlib.AbstractContextManager:
        """Mixed precision as planned. ``graph_safe``: without autocast's weight cache, whose
        copies would be freed under a captured graph that still reads them."""
        dtype = self.acceleration.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(
            device_type=self.device.type, dtype=dtype, cache_enabled=not graph_safe
        )


def _parts(
    prepared: PreparedBatch,
    asked: list[int],
    heat: torch.Tensor,
    shares: Sequence[float],
    preprocessor: ImagePreprocessor,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The asked rows' parts, share by share: ``(rows, boxes (k Bq, 4), pixels (k Bq, 3, S,
    S))``, each box around the row's hottest cell (``heat``) cut from its photo as decoded,
    where the preprocessor kept it, else from its pixels (a photo decoded on the device)."""
    boxes = torch.cat([region_boxes(heat[asked], share) for share in shares])
    rows = asked * len(shares)
    pixels, side, fit = prepared.pixels, preprocessor.side, preprocessor.fit
    parts = []
    for k, (j, box) in enumerate(zip(rows, boxes.tolist(), strict=True)):
        upright = prepared.uprights.get(prepared.image_rows[j])
        part = crop_photo(upright, tuple(box), side, fit) if upright is not None else None
        if part is None:
            part = crop_regions(pixels[j : j + 1], boxes[k : k + 1])[0]
        parts.append(part.to(pixels.device, pixels.dtype))
    return rows, boxes, torch.stack(parts)


def _attach_regions(
    out: list[Encoded],
    image_rows: list[int],
    asked: list[int],
    boxes: torch.Tensor,
    vectors: torch.Tensor,
) -> None:
    """Each photo query's regions: ``asked`` rows of the pixels, their boxes and vectors."""
    array = vectors.float().cpu().numpy()
    for j, box, vector in zip(asked, boxes.tolist(), array, strict=True):
        if np.isfinite(vector).all():  # else the photo is answered without that part
            out[image_rows[j]].regions.append(Region(tuple(box), vector))


class EncodeStream:
    """Micro-batches in, their results out one step later (``FusedEncoder.stream``).

    With ``overlap_batches`` (CUDA's default) the stage thread prepares batch k+1 (decode, fit,
    tokenize, copy, on its own CUDA stream) while the caller's thread runs batch k's forward
    pass; without it each ``put`` encodes its batch at once. Either way a batch whose
    preparation or forward pass raises is encoded again item by item, so only the item that
    causes it fails.
    """

    def __init__(
        self, runtime: EncoderRuntime, *, products: bool = False, towers_only: bool = False
    ) -> None:
        self.runtime = runtime
        self.products = products
        self.towers_only = towers_only
        self._pending: tuple[object, list[EncodeInput], Future] | None = None

    def put(self, batch: Sequence[EncodeInput], tag: object = None) -> list[tuple[object, list]]:
        """Start on ``batch``; returns ``(tag, results)`` for each batch finished meanwhile
        (the previous one, or this one when batches do not overlap)."""
        batch = list(batch)
        check_inputs(batch, "product" if self.products else "item")
        if not batch:
            return []
        runtime = self.runtime
        if not runtime.acceleration.overlap_batches:
            return [(tag, runtime.encode_isolated(batch, self.towers_only))]
        previous = self._pending
        # This batch's preparation starts first, then the previous batch's forward pass runs
        # here: the two overlap. (The other way round, each waited for the other.)
        self._pending = (tag, batch, runtime.prepare_later(batch))
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
            return [(tag, self.runtime.forward(prepared.result(), self.towers_only))]
        except Exception:  # whatever failed, find the item that causes it, alone
            return [(tag, self.runtime.encode_isolated(batch, self.towers_only))]
