"""What a Kafka client error means for a batch: Kafka's own three classes of failure.

The Java client sorts every error a transactional producer can meet into three classes, and so
does Loupe:

- **retriable**: the same request may succeed later (a timeout, no coordinator yet, the
  coordinator loading, a lost connection). Back off and try again.
- **abortable**: this transaction cannot commit (the consumer group moved on, an authorization
  on a topic or group): abort it, rewind the consumer to the committed offsets, handle the
  records again.
- **fatal**: this producer can no longer be used (fenced by a newer one with its transactional
  id, an invalid epoch, the transactional id not authorized, a broker too old). Replace it:
  a new producer with the same transactional id fences the old one and settles its open
  transaction. If the replacement is refused too, stop and say why.

kafka-python does not always chain the error it reacts to: a request that timed out while the
broker was unreachable surfaces as a bare ``KafkaError("Could not execute transactional request
for unknown reasons: [Error 7] RequestTimedOutError: ...")``, and a later call on that producer
as ``KafkaError("Cannot execute transactional method because we are in an error state: ...")``.
``root_cause`` reads the error inside such a wrapper (its argument, its error code or its class
name) so that a timeout is classed as the timeout it is.
"""

from __future__ import annotations

import enum
import re

from kafka import errors as kafka_errors


class Failure(enum.Enum):
    RETRIABLE = "retriable"
    ABORTABLE = "abortable"
    FATAL = "fatal"


# The producer can no longer be used; a new one with the same transactional id replaces it.
FATAL_ERRORS: tuple[type[kafka_errors.KafkaError], ...] = (
    kafka_errors.ProducerFencedError,
    kafka_errors.InvalidProducerEpochError,
    kafka_errors.InvalidTxnStateError,
    kafka_errors.InvalidProducerIdMappingError,
    kafka_errors.OutOfOrderSequenceNumberError,
    kafka_errors.TransactionalIdAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.UnsupportedForMessageFormatError,
)

# Errors whose arrival means "replacing the producer cannot help": a replacement that fails with
# one of these stops the service with its reason (the others are worth another try later).
REFUSALS: tuple[type[kafka_errors.KafkaError], ...] = (
    kafka_errors.TransactionalIdAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.KafkaConfigurationError,
)

# Socket-level errors the client sometimes lets through unwrapped: a broker that went away.
_NETWORK_ERRORS = (ConnectionError, TimeoutError)

_ERROR_CODE = re.compile(r"\[Error (-?\d+)\] \w+(?::\s*)?")
_ERROR_NAME = re.compile(r"\b([A-Z][A-Za-z]+Error)\b(?::\s*)?")
_MAX_UNWRAP = 8  # wrappers inside wrappers: a bound, not an expectation


def root_cause(exc: BaseException) -> BaseException:
    """The error ``exc`` stands for: its explicit cause, or the error a bare ``KafkaError``
    wrapper names (as an instance of that error's class, made here for classification)."""
    for _ in range(_MAX_UNWRAP):
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        if type(exc) is not kafka_errors.KafkaError:  # a specific class says what it is
            return exc
        inner = _named_inside(exc)
        if inner is None:
            return exc
        exc = inner
    return exc


def _named_inside(wrapper: kafka_errors.KafkaError) -> BaseException | None:
    if wrapper.args and isinstance(wrapper.args[0], BaseException):
        return wrapper.args[0]  # KafkaError(InvalidTxnStateError())
    text = " ".join(str(arg) for arg in wrapper.args)
    code = _ERROR_CODE.search(text)
    if code is not None:
        cls = kafka_errors.for_code(int(code.group(1)))
        return cls(text[code.end() :])  # its own words, without the wrappers' prefixes
    for name in _ERROR_NAME.finditer(text):
        cls = getattr(kafka_errors, name.group(1), None)
        is_error = isinstance(cls, type) and issubclass(cls, kafka_errors.KafkaError)
        if is_error and cls is not kafka_errors.KafkaError:
            return cls(text[name.end() :])
    return None


def classify(exc: BaseException) -> Failure:
    """Kafka's class of ``exc``, judged by its root cause. An error the client does not mark
    retriable and that is not known to be fatal is abortable: aborting and replaying the batch
    is always safe (the committed offsets say what was done), retrying blindly is not."""
    cause = root_cause(exc)
    if isinstance(cause, FATAL_ERRORS):
        return Failure.FATAL
    if isinstance(cause, _NETWORK_ERRORS) or getattr(cause, "retriable", False):
        return Failure.RETRIABLE
    return Failure.ABORTABLE


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` (from building a replacement producer) means no replacement will work."""
    return isinstance(root_cause(exc), REFUSALS)


def describe(exc: BaseException) -> str:
    """One line for logs and /readyz: what went wrong; for a Kafka error, at its root."""
    if not isinstance(exc, kafka_errors.KafkaError):
        return f"{type(exc).__name__}: {exc}"  # Loupe's own errors say what they are
    cause = root_cause(exc)
    if isinstance(cause, kafka_errors.KafkaError):
        return str(cause)  # kafka-python's own text names the class ("[Error 7] Request...")
    return f"{type(cause).__name__}: {cause}"
