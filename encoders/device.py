"""Choosing the device, and the device-specific steps of the fast path.

Every CUDA-only step is a field of ``Acceleration`` so that each one can be switched on by
itself on a CPU (mixed precision, channels-last, batch JPEG decode) and tested there; only the
pinned host-to-device copy needs a real GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loupe.encoders.errors import DeviceUnavailable
from loupe.encoders.profile import (
    ENCODER_BACKENDS,
    JPEG_DECODERS,
    PRECISIONS,
    EncoderBackend,
    JpegDecoderName,
    Precision,
)

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_OF = {dtype: name for name, dtype in _AMP_DTYPES.items()}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; anything else is taken as given."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {requested!r} was requested but CUDA is not available here "
                "(LOUPE_DEVICE=auto falls back to the CPU)"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for full fp32.

    ``auto`` is fp16 on CUDA and fp32 elsewhere: fp16 keeps closer to fp32 than bf16 does
    (docs/gpu.md, "Precision", has the measurements and their command), tensor cores run both
    at the same speed, and the towers' activations are bounded (ReLU6, LayerNorm), so fp16's
    range is enough; a vector that overflows anyway fails its item (``VectorNotFinite``). On a
    CPU, bf16 is opt-in: faster where the CPU has AVX512-BF16, for a little top-1.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(f"precision bf16 was requested but {device} does not support it")
    return _AMP_DTYPES[precision]


@dataclass(frozen=True)
class Acceleration:
    """How the encoder uses its device. ``for_device`` gives the defaults."""

    amp_dtype: torch.dtype | None  # autocast dtype for the towers and fusion; None: fp32
    channels_last: bool  # NHWC layout for the CNN: tensor-core convolutions run on it directly
    pinned_copies: bool  # stage host batches in page-locked memory, copy without blocking
    batch_jpeg_decode: bool  # decode a batch's JPEGs in one call on the device (nvjpeg on CUDA)
    # Which batch decoder (``jpeg_decoders``): auto is nvImageCodec where installed, else
    # torchvision's nvJPEG.
    jpeg_decoder: JpegDecoderName = "auto"
    # Share of a batch's plain JPEGs decoded by the CPU threads (Pillow) while the device
    # decodes the rest: more decoders at once where the device's decoder is the bottleneck.
    host_decode_share: float = 0.0
    # Prepare the next micro-batch (decode, fit, tokenize, copy) in a worker thread, on its own
    # CUDA stream, while the device runs the current one.
    overlap_batches: bool = False
    # Replay captured CUDA graphs for small batches (queries): a batch of one is launch-bound.
    cuda_graphs: bool = False
    # The largest batch replayed from a graph (a power of two: every bucket up to it is
    # captured at start-up). Larger graphs also spare big batches the launches' CPU time.
    graph_max_batch: int = 16

    @classmethod
    def for_device(cls, device: torch.device, precision: Precision = "auto") -> Acceleration:
        on_cuda = device.type == "cuda"
        return cls(
            amp_dtype=autocast_dtype(device, precision),
            channels_last=on_cuda,
            pinned_copies=on_cuda,
            batch_jpeg_decode=on_cuda,
            overlap_batches=on_cuda,
            cuda_graphs=on_cuda,
        )

    def check(self, device: torch.device) -> None:
        """Raise ``ValueError`` for a plan the device cannot run."""
        if self.pinned_copies and device.type != "cuda":
            raise ValueError(f"pinned copies need a CUDA device, not {device}")
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        if not 0.0 <= self.host_decode_share <= 1.0:
            raise ValueError(f"host_decode_share must be in [0, 1], got {self.host_decode_share}")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"unknown JPEG decoder {self.jpeg_decoder!r}")
        if self.graph_max_batch < 1 or self.graph_max_batch & (self.graph_max_batch - 1):
            raise ValueError(f"graph_max_batch must be a power of two, got {self.graph_max_batch}")

    def describe(self) -> str:
        precision = _PRECISION_OF[self.amp_dtype]
        steps = [
            name
            for name, on in (
                ("channels-last", self.channels_last),
                ("pinned copies", self.pinned_copies),
                (f"batch JPEG decode ({self.jpeg_decoder})", self.batch_jpeg_decode),
                (f"{self.host_decode_share:.0%} on host", self.host_decode_share > 0),
                ("overlapped batches", self.overlap_batches),
                (f"CUDA graphs up to {self.graph_max_batch}", self.cuda_graphs),
            )
            if on
        ]
        return ", ".join([precision, *steps])


def stack_on(tensors: list[torch.Tensor], device: torch.device, *, pinned: bool) -> torch.Tensor:
    """Stack same-shaped tensors into one batch on ``device``.

    A batch can mix tensors already on the device (decoded there) with host tensors (the Pillow
    path for PNG, WebP and refused JPEGs); ``torch.stack`` refuses mixed devices, so the host
    ones travel together, pinned when asked, and are put back in their places.
    """
    # By type, not equality: torch.device("cuda") != torch.device("cuda:0").
    on_host = (
        [j for j, t in enumerate(tensors) if t.device.type == "cpu"] if device.type != "cpu" else []
    )
    if not on_host:
        return torch.stack(tensors).to(device)
    host_batch = torch.stack([tensors[j] for j in on_host])  # (Bh, ...)
    if pinned:
        host_batch = host_batch.pin_memory()
    moved = host_batch.to(device, non_blocking=pinned)
    if len(on_host) == len(tensors):
        return moved
    on_device = [j for j, t in enumerate(tensors) if t.device.type != "cpu"]
    batch = torch.empty((len(tensors), *tensors[0].shape), dtype=moved.dtype, device=device)
    batch[on_host] = moved
    batch[on_device] = torch.stack([tensors[j] for j in on_device])
    return batch


def onnx_fits(device: torch.device, acceleration: Acceleration) -> bool:
    """Whether the ONNX graph computes the plan's vectors: the CPU in fp32, in the tower's own
    layout (the graph is fp32, for the CPU)."""
    return (
        device.type == "cpu"
        and acceleration.amp_dtype is None
        and not acceleration.channels_last
        and not acceleration.cuda_graphs
    )


def use_onnxruntime(
    backend: EncoderBackend, device: torch.device, acceleration: Acceleration
) -> bool:
    """Whether the image tower runs on ONNX Runtime: asked for, or ``auto`` on a CPU. Only a
    CPU plan in fp32 can (the graph is fp32, for the CPU); asking for it elsewhere is an error.
    """
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; expected one of {ENCODER_BACKENDS}")
    fits = onnx_fits(device, acceleration)
    if backend == "onnxruntime" and not fits:
        raise DeviceUnavailable(
            f"encoder backend onnxruntime runs on the CPU in fp32, not on {device} in "
            f"{_PRECISION_OF[acceleration.amp_dtype]}; use LOUPE_ENCODER_BACKEND=auto or torch"
        )
    return backend == "onnxruntime" or (backend == "auto" and fits)
