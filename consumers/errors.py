"""Errors raised by the service layer. Each has one policy, named in its docstring."""

from loupe.schemas.errors import ErrorCode, InvalidEvent, ItemFailed, LoupeError

__all__ = [
    "BrokerUnreachable",
    "ConfigError",
    "ErrorCode",
    "ImageFetchError",
    "IndexUnavailable",
    "InvalidEvent",
    "ItemFailed",
    "LoupeError",
]


class ConfigError(LoupeError):
    """A ``LOUPE_*`` setting is invalid. Policy: stop at start-up, naming the variable."""


class BrokerUnreachable(ConfigError):
    """No Kafka broker answers at ``LOUPE_BOOTSTRAP_SERVERS`` at start-up. Policy: stop, naming
    the setting and the address tried (a broker lost later is retried, never a reason to stop)."""


class IndexUnavailable(LoupeError):
    """Qdrant could not be reached or did not answer. Policy: retry with backoff, never skip."""


class ImageFetchError(ItemFailed):
    """An image URL could not be fetched (refused by policy, HTTP error, too big, too slow).
    Policy: dead-letter the event (or answer the search with an error)."""

    stage = "fetch"
