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
    "UnexpectedItemError",
    "WorkerDied",
]


class ConfigError(LoupeError):
    """A ``LOUPE_*`` setting is invalid. Policy: stop at start-up, naming the variable."""


class BrokerUnreachable(ConfigError):
    """No Kafka broker answers at ``LOUPE_BOOTSTRAP_SERVERS`` at start-up. Policy: stop, naming
    the setting and the address tried (a broker lost later is retried, never a reason to stop)."""


class WorkerDied(LoupeError):
    """A worker thread ended with an error that was not one item's (a bug, a lost index).
    Policy: stop the service and exit non-zero, so that systemd or Kubernetes restarts it."""


class IndexUnavailable(LoupeError):
    """Qdrant could not be reached or did not answer. Policy: retry with backoff, never skip."""


class UnexpectedItemError(ItemFailed):
    """Handling one record raised something no layer classified (a bug, most likely). Policy:
    that record alone fails with ``internal_error`` (dead-lettered, or the search answered with
    an error) and the worker goes on; the log has the traceback."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        self.stage = stage


class ImageFetchError(ItemFailed):
    """An image URL could not be fetched (refused by policy, HTTP error, too big, too slow).
    Policy: dead-letter the event (or answer the search with an error)."""

    stage = "fetch"
