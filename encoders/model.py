"""The fused model itself: tensors in, unit vectors out.

``FusedModel`` holds the image tower, the text tower and ``AttentionFusion`` on one device, and
names what they compute (the model version, and each tower's part of it). It knows nothing of
bytes, threads or CUDA streams: ``encoders/runtime.py`` feeds it, ``encoders/fused.py`` puts the
two together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from loupe.encoders.fusion import FusionModel, fusion_digest
from loupe.encoders.image_towers import ImageEncoder, tuned_weights_id
from loupe.encoders.images import Fit
from loupe.encoders.text_towers import TextEncoder


class FusedModel:
    """Image tower + text tower + the fusion's heads, on ``device``, in eval mode."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        fusion: FusionModel,
        *,
        device: torch.device,
        fit: Fit,
        channels_last: bool = False,
    ) -> None:
        if (
            fusion.config.image_dim != image_encoder.dim
            or fusion.config.text_dim != text_encoder.dim
        ):
            raise ValueError(
                f"fusion expects ({fusion.config.image_dim}, {fusion.config.text_dim})-d towers, "
                f"the towers give ({image_encoder.dim}, {text_encoder.dim})"
            )
        self.device = device
        self.fit = fit
        self.image_encoder = image_encoder.to(device).eval()
        self.text_encoder = text_encoder.to(device).eval()
        self.fusion = fusion.to(device).eval()
        if channels_last:
            self.image_encoder = self.image_encoder.to(memory_format=torch.channels_last)
        self.dims = {
            "image": image_encoder.dim,
            "text": text_encoder.dim,
            "fused": fusion.config.dim,
        }
        self.base_version = base_version(image_encoder, text_encoder, fit)
        # Each tower's part of it: what its vectors depend on (a cache of one tower's vectors
        # stays valid when only the other tower changes).
        self.image_base = image_base(image_encoder, fit)
        self.text_base = text_base(text_encoder)
        self.model_version = model_version(self.base_version, fusion)

    @property
    def input_side(self) -> int:
        return self.image_encoder.input_side

    def image_towers(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` pixels to the image tower's ``(B, Di)`` unit vectors."""
        return self.image_encoder.encode(pixels)

    def text_towers(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts to the text tower's ``(B, Dt)`` unit vectors."""
        return F.normalize(self.text_encoder(**tokens).float(), dim=-1)

    def heads(
        self,
        image_vecs: torch.Tensor | None,  # (Bi, Di) tower unit vectors
        text_vecs: torch.Tensor | None,  # (Bt, Dt)
        pairs: tuple[list[int], list[int]] | None,  # rows of each that are one item's
    ) -> dict[str, torch.Tensor]:
        """The views: each tower's vectors through its head, and the fused vectors of the
        ``pairs`` (the fused view reads the towers' vectors, not the heads')."""
        views: dict[str, torch.Tensor] = {}
        if pairs is not None and pairs[0]:
            image_rows, text_rows = pairs
            views["fused"] = self.fusion(image_vecs[image_rows], text_vecs[text_rows]).float()
        if image_vecs is not None:
            views["image"] = self.fusion.image(image_vecs)
        if text_vecs is not None:
            views["text"] = self.fusion.text(text_vecs)
        return views


def model_version(base: str, fusion: FusionModel) -> str:
    """The towers' and preprocessing's identity plus the fusion's hash: a collection's name."""
    return f"{base}.fusion-{fusion_digest(fusion)}"


def base_version(
    image: ImageEncoder,
    text: TextEncoder,
    fit: Fit,
    tuned: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """The frozen part's identity: towers, their weights and the preprocessing. A fusion
    checkpoint is valid only on the base it was trained on. The model version is this plus the
    fusion's hash; it changes whenever weights or preprocessing change, and is safe as a
    collection name."""
    version = (
        f"{_image_identity(image, tuned)}.{_text_identity(text)}"
        f".{_image_reading(image, fit)}-t{text.max_tokens}"
    )
    return _safe(version)


def image_base(image: ImageEncoder, fit: Fit) -> str:
    return _safe(f"{_image_identity(image)}.{_image_reading(image, fit)}")


def text_base(text: TextEncoder) -> str:
    return _safe(f"{_text_identity(text)}-t{text.max_tokens}")


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)


def _image_identity(image: ImageEncoder, tuned: Mapping[str, torch.Tensor] | None = None) -> str:
    weights = image.weights_id if not tuned else tuned_weights_id(image.weights_id, tuned)
    return f"{image.name}-{weights}"


def _image_reading(image: ImageEncoder, fit: Fit) -> str:
    """How photos are read: the fit, the square's side, the pooling."""
    return f"{fit}{image.input_side}-{image.pooling}"


def _text_identity(text: TextEncoder) -> str:
    name = Path(text.name).name if Path(text.name).is_dir() else text.name
    return f"{name}-{text.weights_id}{text.centre_id}"
