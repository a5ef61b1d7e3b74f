"""Dead letters on ``loupe.deadletter.v1``.

A dead letter is the original record untouched (key, value, headers) plus Loupe's headers that
say why and where from. ``deadletter_headers`` builds them; ``DeadLetter.from_record`` reads a
dead letter back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from loupe.schemas.common import Contract
from loupe.schemas.errors import ErrorCode

DEADLETTER_TOPIC = "loupe.deadletter.v1"

HEADER_ERROR_CODE = "loupe.error.code"
HEADER_ERROR_MESSAGE = "loupe.error.message"
HEADER_STAGE = "loupe.stage"
HEADER_SOURCE_TOPIC = "loupe.source.topic"
HEADER_SOURCE_PARTITION = "loupe.source.partition"
HEADER_SOURCE_OFFSET = "loupe.source.offset"
LOUPE_HEADERS = (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_STAGE,
    HEADER_SOURCE_TOPIC,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_OFFSET,
)
MAX_HEADER_MESSAGE_CHARS = 1000

# Where in the pipeline the event failed.
Stage = Literal["parse", "fetch", "decode", "encode", "index", "search", "publish"]

Headers = list[tuple[str, bytes]]


class DeadLetter(Contract):
    """A dead-lettered record, read back: the original bytes and why it failed."""

    key: bytes | None
    value: bytes | None
    headers: Headers = Field(description="the original record's headers, Loupe's removed")
    error_code: ErrorCode
    error_message: str
    stage: Stage
    source_topic: str
    source_partition: int
    source_offset: int

    @classmethod
    def from_record(
        cls, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> DeadLetter:
        ours = {name: raw.decode("utf-8") for name, raw in headers if name in LOUPE_HEADERS}
        missing = [name for name in LOUPE_HEADERS if name not in ours]
        if missing:
            raise ValueError(f"not a Loupe dead letter: headers {missing} are missing")
        return cls.model_validate(
            {
                "key": key,
                "value": value,
                "headers": [(n, v) for n, v in headers if n not in LOUPE_HEADERS],
                "error_code": ours[HEADER_ERROR_CODE],
                "error_message": ours[HEADER_ERROR_MESSAGE],
                "stage": ours[HEADER_STAGE],
                "source_topic": ours[HEADER_SOURCE_TOPIC],
                "source_partition": int(ours[HEADER_SOURCE_PARTITION]),
                "source_offset": int(ours[HEADER_SOURCE_OFFSET]),
            },
            strict=False,
        )


def deadletter_headers(
    original: Sequence[tuple[str, bytes]],
    *,
    code: ErrorCode,
    message: str,
    stage: Stage,
    topic: str,
    partition: int,
    offset: int,
) -> Headers:
    """The original headers (minus stale Loupe ones, if re-dead-lettered) plus why and where."""
    if len(message) > MAX_HEADER_MESSAGE_CHARS:
        message = message[: MAX_HEADER_MESSAGE_CHARS - 1] + "…"
    kept = [(name, value) for name, value in original if name not in LOUPE_HEADERS]
    return [
        *kept,
        (HEADER_ERROR_CODE, code.value.encode()),
        (HEADER_ERROR_MESSAGE, message.encode("utf-8")),
        (HEADER_STAGE, stage.encode()),
        (HEADER_SOURCE_TOPIC, topic.encode()),
        (HEADER_SOURCE_PARTITION, str(partition).encode()),
        (HEADER_SOURCE_OFFSET, str(offset).encode()),
    ]
