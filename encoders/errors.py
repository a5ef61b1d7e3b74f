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


class PreprocessFailed(ItemFailed):
    """Preprocessing this image raised something unforeseen (a bug, or a decoder's own error
    that Loupe does not classify). It fails this item only; the log has the traceback."""

    stage = "decode"

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            ErrorCode.INTERNAL_ERROR,
            f"preprocessing failed: {type(exc).__name__}: {str(exc)[:300]}",
        )


class EncodeFailed(ItemFailed):
    """The model raised while encoding this item alone (after its batch failed). It fails this
    item only; the log has the traceback."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            ErrorCode.ENCODER_FAILED, f"the model failed: {type(exc).__name__}: {str(exc)[:300]}"
        )


class VectorNotFinite(ItemFailed):
    """The model made inf or NaN for this item (a numeric overflow, most likely under fp16).
    Such a vector would poison every cosine it takes part in, so it never reaches the index."""

    def __init__(self, views: list[str]) -> None:
        super().__init__(
            ErrorCode.ENCODER_FAILED,
            f"the model produced a non-finite {'/'.join(views)} vector for this item",
        )
