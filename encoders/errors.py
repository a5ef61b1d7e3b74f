"""Errors raised by the model layer. Each has one policy."""

from __future__ import annotations

from loupe.schemas.errors import ErrorCode, ItemFailed, LoupeError


class EncoderError(LoupeError):
    """The model could not be built or run. Policy: stop (it is configuration or a bug)."""


class UnknownBackbone(EncoderError, ValueError):
    """A backbone name that is not registered; the message lists the known ones."""


class DeviceUnavailable(EncoderError, ValueError):
    """The configured device or precision does not exist on this machine."""


class WeightsNotFound(EncoderError, FileNotFoundError):
    """Weights are missing; the message says where Loupe looked and what to install."""


class ImageRejected(ItemFailed):
    """This image cannot be used: unreadable, too large, not what it claims to be."""

    stage = "decode"


class VectorNotFinite(ItemFailed):
    """The model made inf or NaN for this item (a numeric overflow, most likely under fp16).
    Such a vector would poison every cosine it takes part in, so it never reaches the index."""

    def __init__(self, views: list[str]) -> None:
        super().__init__(
            ErrorCode.ENCODER_FAILED,
            f"the model produced a non-finite {'/'.join(views)} vector for this item",
        )
