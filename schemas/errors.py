"""The root of Loupe's exception tree, and the closed set of error codes in the v1 contract.

It lives in ``schemas`` because that is the package every other one depends on. Each layer adds
one-line subclasses next to its code; each subclass has one policy (dead-letter, retry or stop).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why an event was dead-lettered or a search failed. A closed set: part of the contract.

    Producers and shopper apps may switch on these values; adding one is a contract change.
    """

    MESSAGE_TOO_LARGE = "message_too_large"  # value over Loupe's byte limit
    INVALID_ENCODING = "invalid_encoding"  # value is not UTF-8 (or is empty / a tombstone)
    INVALID_JSON = "invalid_json"  # value is not a JSON document
    INVALID_EVENT = "invalid_event"  # JSON, but violates the contract (field named in message)
    IMAGE_FORBIDDEN = "image_forbidden"  # URL points at an address the fetch policy refuses
    IMAGE_FETCH_FAILED = "image_fetch_failed"  # 4xx/5xx, timeout, too many redirects
    IMAGE_TOO_LARGE = "image_too_large"  # bytes or pixels over the limits
    IMAGE_INVALID = "image_invalid"  # not an image, truncated, wrong media type
    ENCODER_FAILED = "encoder_failed"  # the model could not encode this item
    INDEX_UNAVAILABLE = "index_unavailable"  # the vector index could not be reached in time
    INTERNAL_ERROR = "internal_error"  # a bug in Loupe; details in the service log
    REPLY_TO_REFUSED = "reply_to_refused"  # not a reply topic: answered on the default one
    MERCHANT_MISMATCH = "merchant_mismatch"  # per-merchant topics: another merchant's topic


class LoupeError(Exception):
    """Base class of every error Loupe raises on purpose."""


class ItemFailed(LoupeError):
    """One event or request cannot be processed; the rest of its batch can. Policy: dead-letter
    it (or answer the search with an error). ``stage`` says where it failed, for the letter."""

    stage = "encode"

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidEvent(LoupeError):
    """A Kafka value that does not satisfy the contract. Policy: dead-letter it, keep going.

    ``str(exc)`` is a one-line, human-readable reason that names the offending field; it is what
    goes into the ``loupe.error.message`` dead-letter header.
    """

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
