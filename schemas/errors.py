"""The root of Loupe's exception tree.

It lives in ``schemas`` because that is the package every other one depends on. Each layer adds
one-line subclasses next to its code; each subclass has one policy (dead-letter, retry or stop).
"""


class LoupeError(Exception):
    """Base class of every error Loupe raises on purpose."""
