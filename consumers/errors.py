"""Errors raised by the service layer. Each has one policy, named in its docstring."""

from schemas.errors import ErrorCode, InvalidEvent, LoupeError

__all__ = [
    "ConfigError",
    "ErrorCode",
    "ImageFetchError",
    "IndexUnavailable",
    "InvalidEvent",
    "LoupeError",
]


class ConfigError(LoupeError):
    """A ``LOUPE_*`` setting is invalid. Policy: stop at start-up, naming the variable."""


class IndexUnavailable(LoupeError):
    """Qdrant could not be reached or did not answer. Policy: retry with backoff, never skip."""


class ImageFetchError(LoupeError):
    """An image URL could not be fetched (refused by policy, HTTP error, too big, too slow).
    Policy: dead-letter the event (or answer the search with an error)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
