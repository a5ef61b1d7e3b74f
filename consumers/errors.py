"""Errors raised by the service layer. Each has one policy, named in its docstring."""

from loupe.consumers.kafka.failures import Failure
from loupe.encoders.errors import ItemRejected, Rejection
from loupe.schemas.errors import ErrorCode, InvalidEvent, ItemFailed, LoupeError

__all__ = [
    "BatchAborted",
    "BrokerUnreachable",
    "CommitRetriable",
    "ConfigError",
    "ErrorCode",
    "ImageFetchError",
    "IndexUnavailable",
    "InvalidEvent",
    "ItemFailed",
    "LoupeError",
    "ModelRejected",
    "PublisherFailed",
    "TopicConfigUnknown",
    "UnexpectedItemError",
    "WorkerDied",
]


class ConfigError(LoupeError):
    """A ``LOUPE_*`` setting is invalid. Policy: stop at start-up, naming the variable."""


class BrokerUnreachable(ConfigError):
    """No Kafka broker answers at ``LOUPE_BOOTSTRAP_SERVERS`` at start-up. Policy: stop, naming
    the setting and the address tried (a broker lost later is retried, never a reason to stop)."""


class BrokerAuthenticationFailed(ConfigError):
    """The broker answers but refuses Loupe's SASL credentials. Policy: stop at start-up naming
    the settings to fix; waiting cannot help."""


class IndexAccessRefused(ConfigError):
    """The Qdrant server refuses Loupe's API key (none, a wrong one, or one without the rights
    a call needs). Policy: stop, naming LOUPE_INDEX_API_KEY; retrying cannot help."""


class IndexCertificateUntrusted(ConfigError):
    """The Qdrant server's TLS certificate cannot be verified. Policy: stop, naming
    LOUPE_INDEX_CA; retrying cannot help."""


class BrokerRefused(ConfigError):
    """The broker's ACLs refuse what a role needs at start-up. Policy: stop, naming the ACL."""


class WorkerDied(LoupeError):
    """A worker thread ended with an error that was not one item's (a bug, a lost index).
    Policy: stop the service and exit non-zero, so that systemd or Kubernetes restarts it."""


class PublishFailure(LoupeError):
    """A batch's publish and commit failed; ``failure`` is Kafka's class of the cause."""

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class CommitRetriable(PublishFailure):
    """Nothing of the batch is visible, and the cause passes (a timeout, a coordinator moving,
    a broker away). Policy: back off and publish the same records again."""


class BatchAborted(PublishFailure):
    """The batch's transaction is settled, committed or not, and the committed offsets say which
    (the consumer group moved on, or the producer was replaced). Policy: rewind the consumer to
    the committed offsets and handle the records they do not cover again."""


class PublisherFailed(LoupeError):
    """The producer failed and no replacement can be made (refused, or fenced again and again).
    Policy: stop the service with the reason, for its supervisor and its operator."""


class TopicConfigUnknown(LoupeError):
    """The broker did not describe a topic's configuration (no DescribeConfigs ACL, or the
    topic went away). Policy: treat the topic as unsafe to write (a ``reply_to`` is refused)."""


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


# The model's reasons for failing one item, in the contract's words (a closed set both sides:
# tests/unit/test_schemas.py checks that every reason has its code).
CODE_OF_REJECTION = {
    Rejection.IMAGE_TOO_LARGE: ErrorCode.IMAGE_TOO_LARGE,
    Rejection.IMAGE_INVALID: ErrorCode.IMAGE_INVALID,
    Rejection.PREPROCESS_FAILED: ErrorCode.INTERNAL_ERROR,
    Rejection.ENCODE_FAILED: ErrorCode.ENCODER_FAILED,
    Rejection.NOT_FINITE: ErrorCode.ENCODER_FAILED,
}


class ModelRejected(ItemFailed):
    """The model could not encode this item (``ItemRejected``), in the contract's terms.
    Policy: dead-letter the event (or answer the search with an error)."""

    def __init__(self, rejected: ItemRejected) -> None:
        super().__init__(CODE_OF_REJECTION[rejected.reason], str(rejected))
        self.stage = rejected.stage
