"""Preprocessing: untrusted bytes and product fields in, model-ready inputs out.

``ImagePreprocessor`` turns a batch of photos into one ``(B, 3, S, S)`` uint8-valued float batch
on the model's device, failing bad photos one by one: on a CPU each photo is decoded by Pillow
in a thread pool (bounded: bytes, header pixels, EXIF upright, alpha on white); where the plan
says so (CUDA), JPEGs are decoded together on the device (nvjpeg) in calls bounded by pixels,
their EXIF orientation applied as tensor ops, and host and device tensors stacked in one batch.
``compose_product_text`` is the text side: what the text tower reads for a product.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loupe.encoders.batching import iter_budget
from loupe.encoders.device import Acceleration, stack_on
from loupe.encoders.errors import ImageRejected, ItemRejected, PreprocessFailed
from loupe.encoders.images import (
    DecodeLimits,
    Fit,
    JpegHeader,
    decode_image,
    fit_batch,
    fit_square,
    orient,
    pil_to_uint8_tensor,
    plain_jpeg_header,
)
from loupe.encoders.jpeg_decoders import device_jpeg_decoder
from loupe.encoders.profile import MAX_TEXT_CHARS

log = logging.getLogger(__name__)

# Pixels one batch-decode call may hold on the device (x3 bytes): 128 MP is 384 MB, ten 12-MP
# phone photos. Without it, 128 photos at the 40-MP limit would ask for 15 GB at once.
DEVICE_DECODE_PIXELS = 128_000_000


@dataclass(frozen=True)
class Photo:
    """One photo's bytes and the media type its sender declared (checked against the content)."""

    data: bytes
    media_type: str | None = None


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


class ImagePreprocessor:
    """Photos to a batch of ``(3, side, side)`` tensors in [0, 1] on ``device``."""

    def __init__(
        self,
        *,
        side: int,
        device: torch.device,
        acceleration: Acceleration,
        fit: Fit = "pad",
        limits: DecodeLimits | None = None,
        decode_workers: int = 2,
        device_decode_pixels: int = DEVICE_DECODE_PIXELS,
    ) -> None:
        if side < 1:
            raise ValueError(f"side must be positive, got {side}")
        if decode_workers < 1:
            raise ValueError(f"decode_workers must be positive, got {decode_workers}")
        if device_decode_pixels < 1:
            raise ValueError(f"device_decode_pixels must be positive, got {device_decode_pixels}")
        self.side = side
        self.device = device
        self.acceleration = acceleration
        self.fit = fit
        self.limits = limits or DecodeLimits()
        self.decode_workers = decode_workers
        self.device_decode_pixels = device_decode_pixels
        self._pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        self.decoder = (
            device_jpeg_decoder(acceleration.jpeg_decoder, device)
            if acceleration.batch_jpeg_decode
            else None
        )
        # One batch decode at a time: the encoder's stage thread and a search thread can both
        # prepare photos, and nvImageCodec does not promise that one decoder serves two calls.
        self._decode_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def one(self, photo: Photo) -> torch.Tensor:
        """One photo to a ``(3, S, S)`` tensor on the CPU; raises ``ImageRejected``."""
        return fit_square(self.upright(photo), self.side, self.fit)

    def upright(self, photo: Photo) -> torch.Tensor:
        """One photo decoded by Pillow to ``(3, H, W)`` uint8 on the host, upright (EXIF), not
        yet fitted; raises ``ImageRejected``."""
        image = decode_image(
            photo.data, limits=self.limits, media_type=photo.media_type, target_side=self.side
        )
        return pil_to_uint8_tensor(image)

    def batch(
        self, photos: Sequence[Photo]
    ) -> tuple[torch.Tensor, list[int], dict[int, ItemRejected]]:
        """``(pixels, rows, failures)``: ``pixels[j]`` is ``photos[rows[j]]``, ``(B, 3, S, S)``
        on the device; ``failures`` maps the other rows to why they failed."""
        return self.batch_keeping(photos, ())[:3]

    def batch_keeping(
        self, photos: Sequence[Photo], keep: Collection[int]
    ) -> tuple[torch.Tensor, list[int], dict[int, ItemRejected], dict[int, torch.Tensor]]:
        """``batch``'s three and ``uprights``: the photos of the rows in ``keep`` as decoded,
        upright and not yet fitted (``(3, H, W)`` uint8 on the host), where Pillow decoded
        them. A photo query's region is cut from it (``regions.crop_photo``). A photo decoded
        on the device is not kept (its region is cut from the pixels): holding full-size
        photos on the device for a batch is what the decode budget avoids."""
        uprights: dict[int, torch.Tensor] = {}
        if self.acceleration.batch_jpeg_decode:
            tensors = self._batch_jpeg_decode(photos)
        elif keep:  # decoded and fitted in the pool as ``one`` is; the upright kept
            both = list(self._pool.map(self._try_upright_and_fitted, photos))
            tensors = {i: b if isinstance(b, ItemRejected) else b[1] for i, b in enumerate(both)}
            uprights = {i: b[0] for i, b in enumerate(both) if i in keep and isinstance(b, tuple)}
        else:
            tensors = dict(enumerate(self._pool.map(self._try_one, photos)))
        rows = [i for i in range(len(photos)) if isinstance(tensors[i], torch.Tensor)]
        failures = {i: t for i, t in tensors.items() if not isinstance(t, torch.Tensor)}
        if not rows:
            empty = torch.empty((0, 3, self.side, self.side), device=self.device)
            return empty, [], failures, {}
        stacked = stack_on(  # (B, 3, S, S)
            [tensors[i] for i in rows], self.device, pinned=self.acceleration.pinned_copies
        )
        if self.acceleration.channels_last:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        return stacked, rows, failures, {i: t for i, t in uprights.items() if i in rows}

    def _try_one(self, photo: Photo) -> torch.Tensor | ItemRejected:
        return _alone(self.one, photo, "preprocessing")

    def _try_upright_and_fitted(
        self, photo: Photo
    ) -> tuple[torch.Tensor, torch.Tensor] | ItemRejected:
        def both(photo: Photo) -> tuple[torch.Tensor, torch.Tensor]:
            upright = self.upright(photo)
            return upright, fit_square(upright, self.side, self.fit)

        return _alone(both, photo, "preprocessing")

    def _host_pixels(self, photo: Photo) -> torch.Tensor | ItemRejected:
        """``upright`` for the device to fit with the others (``host_decode_share``)."""
        return _alone(self.upright, photo, "decoding")

    def _batch_jpeg_decode(self, photos: Sequence[Photo]) -> dict[int, torch.Tensor | ItemRejected]:
        """Plain JPEGs decode on the device in calls of at most ``device_decode_pixels``, a
        ``host_decode_share`` of them in the CPU threads at the same time, and all of them are
        fitted together (``fit_batch``). Other formats, and photos the device decoder refuses,
        take the Pillow path, which says exactly what is wrong with a bad one."""
        results: dict[int, torch.Tensor | ItemRejected] = {}
        pending: dict[int, Future] = {}  # Pillow's work, running while the device decodes
        jpegs: list[tuple[int, JpegHeader]] = []
        for i, photo in enumerate(photos):
            header = plain_jpeg_header(photo.data, self.limits)
            if header is None:
                pending[i] = self._pool.submit(self._try_one, photo)
            else:
                jpegs.append((i, header))
        on_host = round(len(jpegs) * self.acceleration.host_decode_share)
        host_jobs = {
            i: self._pool.submit(self._host_pixels, photos[i])
            for i, _ in jpegs[len(jpegs) - on_host :]
        }
        jpegs = jpegs[: len(jpegs) - on_host]
        for chunk in iter_budget(jpegs, lambda job: job[1].pixels, self.device_decode_pixels):
            with self._decode_lock:
                decoded = self.decoder.decode([photos[i].data for i, _ in chunk])
            upright: dict[int, torch.Tensor] = {}
            for (i, header), image in zip(chunk, decoded, strict=True):
                if image is None:
                    pending[i] = self._pool.submit(self._try_one, photos[i])
                else:
                    upright[i] = orient(image, header.orientation)
            results.update(self._fit_all(upright))
            del decoded, upright  # full-size photos: free them before the next call decodes
        if host_jobs:
            host = {i: job.result() for i, job in host_jobs.items()}
            results.update({i: t for i, t in host.items() if not isinstance(t, torch.Tensor)})
            pinned = self.acceleration.pinned_copies
            copied = {
                i: (t.pin_memory() if pinned else t).to(self.device, non_blocking=pinned)
                for i, t in host.items()
                if isinstance(t, torch.Tensor)
            }
            results.update(self._fit_all(copied))
        results.update({i: job.result() for i, job in pending.items()})
        return results

    def _fit_all(self, images: dict[int, torch.Tensor]) -> dict[int, torch.Tensor | ItemRejected]:
        """Fit decoded photos together; if that fails, one by one, so a bad one fails alone."""
        if not images:
            return {}
        try:
            fitted = fit_batch(list(images.values()), self.side, self.fit)  # (n, 3, S, S)
            return dict(zip(images, fitted, strict=True))
        except Exception:
            log.warning("fitting %d photos together failed; fitting them one by one", len(images))
            return {i: self._try_fit(image) for i, image in images.items()}

    def _try_fit(self, image: torch.Tensor) -> torch.Tensor | ItemRejected:
        return _alone(lambda i: fit_square(i, self.side, self.fit), image, "fitting")


def _alone(step, value, what: str) -> torch.Tensor | ItemRejected:
    """``step(value)``, or why it failed: one photo's failure, whatever it is, is that photo's
    and the batch goes on."""
    try:
        return step(value)
    except ImageRejected as exc:
        return exc
    except Exception as exc:
        log.exception("%s one photo failed; it fails alone", what)
        return PreprocessFailed(exc)
