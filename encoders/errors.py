"""Errors raised by the model layer. Each has one policy.

The model knows nothing of Kafka nor of Loupe's wire contract: an item it cannot encode raises
(or returns) ``ItemRejected`` with a ``Rejection`` reason, and the consumer that reads it maps
the reason to the contract's error code (``consumers/errors.py``, ``rejection_failure``).
"""

from __future__ import annotations

from enum import StrEnum


class ModelError(Exception):
    """Base class of every error the model layer raises on purpose."""


class EncoderError(ModelError):
    """The model could not be built or run. Policy: stop (it is configuration or a bug)."""


class UnknownBackbone(EncoderError, ValueError):
    """A backbone name that is not registered; the message lists the known ones."""


class DeviceUnavailable(EncoderError, ValueError):
    """The configured device or precision does not exist on this machine."""


class WeightsNotFound(EncoderError, FileNotFoundError):
    """Weights are missing; the message says where Loupe looked and what to install."""


class Rejection(StrEnum):
    """Why the model could not encode one item (the others of its batch are encoded)."""

    IMAGE_TOO_LARGE = "image_too_large"  # bytes, pixels over the limits
    IMAGE_INVALID = "image_invalid"  # not an image, truncated, wrong media type, odd shape
    PREPROCESS_FAILED = "preprocess_failed"  # preprocessing raised something unforeseen
    ENCODE_FAILED = "encode_failed"  # the towers raised on this item alone
    NOT_FINITE = "not_finite"  # the model made inf or NaN for this item


class ItemRejected(ModelError):
    """One item cannot be encoded; the rest of its batch can. ``stage`` says where."""

    stage = "encode"

    def __init__(self, reason: Rejection, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageRejected(ItemRejected):
    """This image cannot be used: unreadable, too large, not what it claims to be."""

    stage = "decode"


class PreprocessFailed(ItemRejected):
    """Preprocessing this image raised something unforeseen (a bug, or a decoder's own error
    that Loupe does not classify). It fails this item only; the log has the traceback."""

    stage = "decode"

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            Rejection.PREPROCESS_FAILED,
            f"preprocessing failed: {type(exc).__name__}: {str(exc)[:300]}",
        )


class EncodeFailed(ItemRejected):
    """The model raised while encoding this item alone (after its batch failed). It fails this
    item only; the log has the traceback."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            Rejection.ENCODE_FAILED, f"the model failed: {type(exc).__name__}: {str(exc)[:300]}"
        )


class VectorNotFinite(ItemRejected):
    """The model made inf or NaN for this item (a numeric overflow, most likely under fp16).
    Such a vector would poison every cosine it takes part in, so it never reaches the index."""

    def __init__(self, views: list[str]) -> None:
        super().__init__(
            Rejection.NOT_FINITE,
            f"the model produced a non-finite {'/'.join(views)} vector for this item",
        )
