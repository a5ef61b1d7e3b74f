"""Captured CUDA graphs for the towers at small batch sizes: a shopper's single query.

A batch of one through EfficientNet-Lite0 and MiniLM launches a few hundred small kernels; on a
GPU the launches, not the arithmetic, set its latency. A CUDA graph records them once and
replays them with one launch. Graphs have fixed shapes, so a batch is padded up to a bucket
(batch sizes 1, 2, 4, 8, 16; token lengths 16, 32, 64, 128) and only its own rows are read back.
Every operation in the towers is per sample (no batch statistics, attention masked per row), so
the padding rows change nothing (``tests/unit/test_graphs.py`` checks the padding on the CPU, where
the same code runs eagerly). Larger batches run eagerly: they are throughput-bound anyway.

Graphs are captured at start-up (``warm_up``) and only then, so a first shopper never pays for
a capture and no capture races the encoder's other work. A graph that fails to capture is
logged and that bucket runs eagerly; the encoder never fails for want of a graph. All graphs
share one memory pool: replays are serialised and each one's output is copied out at once, so
no graph's memory is read after another has run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16)  # the default; ``max_batch`` extends it by powers of two
TOKEN_BUCKETS = (16, 32, 64, 128)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_batch``."""
    return tuple(1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch)


class _Towers(Protocol):
    image_encoder: torch.nn.Module
    text_encoder: torch.nn.Module
    device: torch.device


def bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``size``, or None when it is larger than all of them."""
    return next((b for b in buckets if b >= size), None)


class _Graph:
    """One captured function of fixed-shape inputs; ``run`` copies in, replays, copies out."""

    def __init__(
        self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], pool: tuple
    ) -> None:
        self.inputs = inputs
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuDNN picks its kernels here
                fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (the encoder's stage thread) does not break
        # this capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(*inputs)

    def run(self, rows: int) -> torch.Tensor:
        self.graph.replay()
        return self.output[:rows].clone()


class SmallBatchGraphs:
    """Graphed image and text towers for batches up to ``max_batch`` (16 by default).

    ``capture=False`` runs the same padding eagerly (the tests, on a CPU): what a graph would
    compute, without the graph. With capture on, a batch with no captured graph returns None,
    and the encoder runs it eagerly without padding it.
    """

    def __init__(
        self,
        towers: _Towers,
        *,
        autocast: Callable[..., contextlib.AbstractContextManager],
        side: int,
        capture: bool,
        max_batch: int = BATCH_BUCKETS[-1],
        channels_last: bool = False,
    ) -> None:
        """``autocast(graph_safe=...)``: the runtime's mixed precision (graph-safe: without
        autocast's weight cache, whose copies a captured graph would read after they are
        freed)."""
        self.towers = towers
        self.autocast = autocast
        self.channels_last = channels_last
        self.buckets = batch_buckets(max_batch)
        self.side = side
        self.capture = capture
        self.device = towers.device
        self._graphs: dict[tuple, _Graph | None] = {}
        self._lock = threading.Lock()  # static buffers: one replay at a time

    def warm_up(self) -> int:
        """Capture every bucket now; returns how many graphs were captured."""
        if self.capture and not self._graphs:
            pool = torch.cuda.graph_pool_handle()
            with self._lock:
                for batch in self.buckets:
                    self._graphs[("image", batch)] = self._capture(("image", batch), pool)
                    for tokens in TOKEN_BUCKETS:
                        key = ("text", batch, tokens)
                        self._graphs[key] = self._capture(key, pool)
        return sum(graph is not None for graph in self._graphs.values())

    def image(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """Unit vectors of ``(B, 3, S, S)`` pixels, or None where B is beyond every bucket."""
        rows = pixels.shape[0]
        size = bucket(rows, self.buckets)
        if size is None:
            return None
        graph = self._graph(("image", size))
        if graph is None and self.capture:
            return None  # not captured (before warm_up, or the capture failed): run unpadded
        if graph is None:
            padded = torch.zeros((size, *pixels.shape[1:]), device=pixels.device)
            padded[:rows] = pixels
            with self.autocast():
                return self.towers.image_encoder.encode(padded)[:rows]
        with self._lock:
            graph.inputs[0][:rows].copy_(pixels)
            return graph.run(rows)

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Unit vectors of tokenised texts, or None where the batch or its length is beyond
        every bucket."""
        rows, length = input_ids.shape
        size, tokens = bucket(rows, self.buckets), bucket(length, TOKEN_BUCKETS)
        if size is None or tokens is None:
            return None
        graph = self._graph(("text", size, tokens))
        if graph is None and self.capture:
            return None
        ids = torch.zeros((size, tokens), dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        mask[:, 0] = 1  # padding rows attend to one token: no row is all masked
        ids[:rows, :length] = input_ids
        mask[:rows, :length] = attention_mask
        if graph is None:
            with self.autocast():
                return _text_vectors(self.towers.text_encoder, ids, mask)[:rows]
        with self._lock:
            graph.inputs[0].copy_(ids)
            graph.inputs[1].copy_(mask)
            return graph.run(rows)

    def _graph(self, key: tuple) -> _Graph | None:
        return self._graphs.get(key)  # None before warm_up, or where the capture failed

    def _capture(self, key: tuple, pool: tuple) -> _Graph | None:
        towers = self.towers

        def image(pixels: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), self.autocast(graph_safe=True):
                return towers.image_encoder.encode(pixels)

        def text(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), self.autocast(graph_safe=True):
                return _text_vectors(towers.text_encoder, ids, mask)

        try:
            if key[0] == "image":
                pixels = torch.zeros((key[1], 3, self.side, self.side), device=self.device)
                if self.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                return _Graph(image, (pixels,), pool)
            ids = torch.zeros(key[1:], dtype=torch.long, device=self.device)
            return _Graph(text, (ids, torch.ones_like(ids)), pool)
        except Exception as exc:  # a tower that cannot be captured runs eagerly
            log.warning(
                "CUDA graph %s not captured (%s: %s); it runs eagerly", key, type(exc).__name__, exc
            )
            return None


def _text_vectors(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text tower with the mask already in the transformer's 4-D form: transformers would
    otherwise inspect the 2-D mask's values on the host (``mask.all()``) to choose a kernel, a
    device-to-host sync that a graph capture cannot contain."""
    model_mask = mask[:, None, None, :].bool()  # (B, 1, 1, T): True where a row attends
    if text_encoder.model.config._attn_implementation != "sdpa":  # eager adds the mask
        model_mask = torch.zeros(model_mask.shape, device=mask.device).masked_fill_(
            ~model_mask, torch.finfo(torch.float16).min
        )
    return torch.nn.functional.normalize(
        text_encoder(ids, mask, model_mask=model_mask).float(), dim=-1
    )
