"""Errors raised by the service layer (Kafka, index, HTTP). Each has one policy."""

from schemas.errors import LoupeError

__all__ = ["LoupeError"]
