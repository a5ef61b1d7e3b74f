"""Decoding a batch of JPEGs on the model's device: the decoders the GPU path can use.

Each decoder takes the bytes of photos that ``plain_jpeg_header`` accepted and returns, per
photo, a ``(3, H, W)`` uint8 tensor on the device as stored (EXIF orientation is applied by the
caller, the same way for every decoder), or None where that photo failed: the caller then gives
that photo to Pillow, which says exactly what is wrong with it.

- ``torchvision``: torchvision's batched ``decode_jpeg`` on CUDA (nvJPEG). Its Huffman decoding
  runs on one CPU thread, which caps its rate on a GPU machine (docs/gpu.md); it also runs on a
  CPU (libjpeg-turbo), which is how the tests exercise this path.
- ``nvimgcodec``: NVIDIA nvImageCodec (PyPI ``nvidia-nvimgcodec-cu13``, with
  ``nvidia-nvjpeg``), which uses the GPU's hardware JPEG decoders and falls back to its other
  backends for what the hardware does not take (progressive JPEGs). Faster than torchvision's
  on an H200 (docs/gpu.md has the table). Optional: where it is not installed, ``auto`` takes
  torchvision's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from loupe.encoders.profile import JPEG_DECODERS, JpegDecoderName

log = logging.getLogger(__name__)


class DeviceJpegDecoder(Protocol):
    name: str

    def decode(self, data: Sequence[bytes]) -> list[torch.Tensor | None]: ...


class TorchvisionJpegDecoder:
    """torchvision's ``decode_jpeg``: one call for the batch; if the call fails (one bad file
    fails all of them), every photo is reported failed and goes to Pillow."""

    name = "torchvision"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def decode(self, data: Sequence[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
        try:
            # torchvision applies EXIF orientation on the CPU but ignores the flag on CUDA
            # (torchvision/io/image.py, decode_jpegs_cuda), so it is off on every device.
            return list(
                decode_jpeg(
                    raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=False
                )
            )
        except RuntimeError:
            return [None] * len(data)


# nvImageCodec's backends, in the order it tries them: "hw" (the GPU's JPEG engines), "cuda"
# (nvJPEG's CUDA decoder), "hybrid" (Huffman on the CPU, the rest on the GPU), "cpu"; empty:
# all of them, in the library's own order: the hardware engines alone refuse progressive JPEGs,
# and every backend together was the fastest that refused none (docs/gpu.md, measured with
# bench.device_check's decode lab).
NVIMGCODEC_BACKENDS: tuple[str, ...] = ()
# Decoder options, e.g. ":fancy_upsampling=1" (libjpeg-turbo's chroma upsampling): it cost time
# and changed nothing on the catalog's 4:4:4 photos (docs/gpu.md); CPU/GPU agreement holds
# without it.
NVIMGCODEC_OPTIONS = ""


class NvImageCodecDecoder:
    """nvImageCodec's batched decoder on one CUDA device: hardware JPEG decoders first, then
    nvJPEG's CUDA decoder. Failures are per photo (it returns None for each one it could not
    decode)."""

    name = "nvimgcodec"

    def __init__(
        self,
        device: torch.device,
        backends: tuple[str, ...] | None = None,
        options: str | None = None,
    ) -> None:
        from nvidia import nvimgcodec

        kinds = {
            "hw": nvimgcodec.BackendKind.HW_GPU_ONLY,
            "cuda": nvimgcodec.BackendKind.GPU_ONLY,
            "hybrid": nvimgcodec.BackendKind.HYBRID_CPU_GPU,
            "cpu": nvimgcodec.BackendKind.CPU_ONLY,
        }
        backends = NVIMGCODEC_BACKENDS if backends is None else backends
        if device.type != "cuda":
            raise ValueError(f"nvimgcodec decodes on a CUDA device, not {device}")
        self.device = device
        self._codec = nvimgcodec
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.backends = backends
        self._decoder = nvimgcodec.Decoder(
            device_id=index,
            backends=[nvimgcodec.Backend(kinds[name]) for name in backends] or None,
            options=NVIMGCODEC_OPTIONS if options is None else options,
        )
        self._params = nvimgcodec.DecodeParams(  # planar RGB: (3, H, W), the towers' layout
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.P_RGB,
        )

    def decode(self, data: Sequence[bytes]) -> list[torch.Tensor | None]:
        stream = torch.cuda.current_stream(self.device)
        streams: list = []
        for item in data:
            try:
                streams.append(self._codec.CodeStream(item))
            except Exception:  # a header it cannot parse: that photo goes to Pillow
                streams.append(None)
        valid = [s for s in streams if s is not None]
        try:
            images = iter(
                self._decoder.decode(valid, params=self._params, cuda_stream=stream.cuda_stream)
            )
        except Exception:
            log.exception("nvimgcodec failed a batch of %d; Pillow decodes it", len(data))
            return [None] * len(data)
        decoded: list[torch.Tensor | None] = []
        for code_stream in streams:
            image = next(images) if code_stream is not None else None
            if image is None:
                decoded.append(None)
                continue
            # The decoder's memory, which torch now shares (and keeps alive): (3, H, W)
            pixels = torch.as_tensor(image, device=self.device)
            if pixels.dim() == 3 and pixels.shape[0] != 3 and pixels.shape[-1] == 3:
                pixels = pixels.permute(2, 0, 1)  # an interleaved image after all
            decoded.append(pixels if pixels.dim() == 3 and pixels.shape[0] == 3 else None)
        return decoded


def nvimgcodec_available() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def device_jpeg_decoder(name: JpegDecoderName, device: torch.device) -> DeviceJpegDecoder:
    """The decoder to use on ``device``. ``auto``: nvImageCodec on CUDA where it is installed
    and starts, else torchvision's. Asking for ``nvimgcodec`` where it cannot run is an error."""
    if name not in JPEG_DECODERS:
        raise ValueError(f"unknown JPEG decoder {name!r}; expected one of {JPEG_DECODERS}")
    if name == "torchvision":
        return TorchvisionJpegDecoder(device)
    if name == "nvimgcodec":
        return NvImageCodecDecoder(device)
    if device.type == "cuda" and nvimgcodec_available():
        try:
            return NvImageCodecDecoder(device)
        except Exception as exc:  # installed but cannot start here (driver, library)
            log.warning("nvimgcodec is installed but did not start (%s); using torchvision's", exc)
    return TorchvisionJpegDecoder(device)
