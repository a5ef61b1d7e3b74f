"""Errors raised by the model layer. Each has one policy."""

from __future__ import annotations

from schemas.errors import ErrorCode, LoupeError


class EncoderError(LoupeError):
    """The model could not be built or run. Policy: stop (it is configuration or a bug)."""


class UnknownBackbone(EncoderError, ValueError):
    """A backbone name that is not registered; the message lists the known ones."""


class WeightsNotFound(EncoderError, FileNotFoundError):
    """Weights are missing; the message says where Loupe looked and what to install."""


class ImageRejected(LoupeError):
    """This image cannot be used. Policy: dead-letter the item (or answer with an error)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
