"""The image tower on ONNX Runtime: the CPU path at the CPU's speed, the same vectors.

PyTorch's eager mode runs a small CNN far below what a CPU can do (every layer is its own call,
with its own allocations); ONNX Runtime runs the same graph with fused, pre-packed kernels.
``OnnxImageTower`` exports the whole image tower once (normalisation, the trunk with any tuned
blocks, the pooling, the L2 normalisation, and the heat map that finds a photo's product:
``ImageEncoder.encode_with_heat``), caches the graph, and runs it in place of the tower. The
vectors are the tower's: a probe is compared at every load, and a graph that disagrees (or fails
to export or load) is not used; the caller falls back to PyTorch. So the backend is not part of
the model version. docs/cpu.md has the measurements, and why the text tower and the heads stay
in PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loupe.encoders.errors import EncoderError
from loupe.encoders.image_towers import ImageEncoder
from loupe.locks import file_lock

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "models" / "onnx"
# Bumped whenever what is exported changes (the wrapper below, the opset): old graphs are not
# read again, they are made anew under another name.
EXPORT_FORMAT = 2  # 2: the heat map is an output too
OPSET = 17
# A graph must give the tower's vectors: the smallest cosine over the probe photos.
MIN_PROBE_COSINE = 0.9999
PROBE_PHOTOS = 4


class OnnxUnavailable(EncoderError):
    """The graph could not be exported, loaded or trusted. Policy: warn once, run the tower in
    PyTorch (the same vectors, slower)."""


class _Encode(nn.Module):
    """``ImageEncoder.encode_with_heat`` as a module to trace: pixels in [0, 1] to unit vectors
    and the heat of the last maps."""

    def __init__(self, tower: ImageEncoder) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower.encode_with_heat(pixels)  # (B, 3, S, S) -> (B, D), (B, h, w)


def graph_name(tower: ImageEncoder) -> str:
    """The cache file of ``tower``'s graph: its weights (tuned ones included), input side and
    pooling, the export format and the exporter's version."""
    identity = (
        f"{tower.name}|{tower.weights_id}|{tower.input_side}|{tower.pooling}|"
        f"{EXPORT_FORMAT}|{OPSET}|torch-{torch.__version__}"
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{tower.name}-{tower.weights_id}-{tower.input_side}-{digest}.onnx"


class OnnxImageTower:
    """``tower``'s ``encode`` as an ONNX Runtime session; call it with ``(B, 3, S, S)`` pixels.

    Built by ``load``; it serves only the weights it was exported from (``serves``).
    """

    def __init__(self, session, weights_id: str, path: Path) -> None:
        self.session = session
        self.weights_id = weights_id
        self.path = path
        self._input = session.get_inputs()[0].name

    @classmethod
    def load(
        cls,
        tower: ImageEncoder,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> OnnxImageTower:
        """The graph of ``tower``, exported into ``cache_dir`` on first use (under a file lock,
        so two processes export it once), loaded, and checked against the tower on probe
        photos. Raises ``OnnxUnavailable`` with the reason when any step fails. ``providers``:
        ONNX Runtime's execution providers, in order of preference (the service uses the CPU's;
        ``bench.device_check`` measures CUDA's and TensorRT's where onnxruntime-gpu has them)."""
        try:
            import onnxruntime as ort
            from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
        except ImportError as exc:
            raise OnnxUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc
        # ONNX Runtime's own errors (a file that is not a graph, an operator it lacks) derive
        # from Exception alone; with the exporter's and the file system's, each means "no graph".
        own = [
            e for e in vars(ort_state).values() if isinstance(e, type) and issubclass(e, Exception)
        ]
        failures = (OSError, RuntimeError, ValueError, *own)
        path = cache_dir / graph_name(tower)
        started = time.perf_counter()
        try:
            with file_lock(cache_dir / f"{path.name}.lock"):
                if not path.is_file():
                    _export(tower, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=list(providers))
        except failures as exc:
            raise OnnxUnavailable(f"{path}: {type(exc).__name__}: {exc}") from exc
        loaded = cls(session, tower.weights_id, path)
        agreement = loaded.agreement(tower)
        if agreement < MIN_PROBE_COSINE:
            raise OnnxUnavailable(
                f"{path} disagrees with the tower (probe cosine {agreement:.6f} < "
                f"{MIN_PROBE_COSINE}); delete it to export it again"
            )
        log.info(
            "image tower on ONNX Runtime (%s, probe cosine %.6f, %.2f s)",
            path.name,
            agreement,
            time.perf_counter() - started,
        )
        return loaded

    def serves(self, tower: ImageEncoder) -> bool:
        """Whether this graph computes ``tower``'s vectors (its weights were not changed since,
        as ``load_tuned`` does)."""
        return tower.weights_id == self.weights_id

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` floats in [0, 1] to ``(B, D)`` unit vectors, as ``encode``."""
        return self.with_heat(pixels, heat=False)[0]

    def with_heat(
        self, pixels: torch.Tensor, heat: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode_with_heat``'s vectors and heat (None unless ``heat``)."""
        array = np.ascontiguousarray(pixels.detach().float().cpu().numpy())
        names = ["vectors", "heat"] if heat else ["vectors"]
        outputs = self.session.run(names, {self._input: array})
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]) if heat else None

    def agreement(self, tower: ImageEncoder) -> float:
        """The smallest cosine between this graph's and the tower's vectors on probe photos:
        smooth gradients with a few edges, as photos have, the same every time."""
        probe = probe_photos(PROBE_PHOTOS, tower.input_side)
        with torch.inference_mode():
            reference = tower.encode(probe.to(tower.mean.device)).float().cpu()
        return float((reference * self(probe)).sum(dim=1).min())


def probe_photos(count: int, side: int) -> torch.Tensor:
    """``count`` photo-like pixel batches (smooth gradients with a few edges), the same every
    time: what a graph and its tower are compared on."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, side // 16, side // 16, generator=generator)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def _export(tower: ImageEncoder, path: Path) -> None:
    """Trace ``tower.encode_with_heat`` into an ONNX graph at ``path`` (written whole, then
    renamed, so a reader never sees half a file), with a dynamic batch size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side = tower.input_side
    started = time.perf_counter()
    partial = path.with_suffix(f".{os.getpid()}.partial")
    device = tower.mean.device
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks it folds away
            torch.onnx.export(
                _Encode(tower).eval(),
                (torch.rand(2, 3, side, side, device=device),),
                str(partial),
                input_names=["pixels"],
                output_names=["vectors", "heat"],
                dynamic_axes={
                    "pixels": {0: "batch"},
                    "vectors": {0: "batch"},
                    "heat": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("exported the image tower to %s in %.1f s", path, time.perf_counter() - started)
