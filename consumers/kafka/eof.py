"""A fix for kafka-python 3.0's transports: bytes that arrive together with the end of the
connection are delivered before the connection is closed, not dropped.

Why it matters: a broker that refuses SASL credentials sends its ``SaslAuthenticate`` error and
closes the connection at the same moment (Kafka delays both by
``connection.failed.authentication.delay.ms``). kafka-python reads the response and the end of
the stream in one ``_sock_recv`` call, and its read loop aborts on the end without passing the
bytes on: the client never learns why, logs "socket disconnected", and retries until its
bootstrap times out. A wrong password then looked like an unreachable broker. With this fix the
refusal reaches kafka-python as ``SaslAuthenticationFailedError``, and ``loupe`` says which
settings to check (``kafka_io.answers_metadata``).

The fix wraps ``_sock_recv`` of both transports: when it returns bytes and the end together, it
returns the bytes now and the end on the next read (the socket stays readable at its end). It
applies only where kafka-python has the methods it wraps; a later kafka-python that reorganised
them is left alone (the refusal then shows as "unreachable" again, and
``test_secure_broker`` says so)."""

from __future__ import annotations

from typing import Any

_PENDING_END = "_loupe_pending_end"


def _deliver_before_end(sock_recv: Any) -> Any:
    def recv(transport: Any) -> tuple[bytes, BaseException | None]:
        pending = getattr(transport, _PENDING_END, None)
        if pending is not None:
            return b"", pending
        data, err = sock_recv(transport)
        if data and err is not None:
            setattr(transport, _PENDING_END, err)
            return data, None
        return data, err

    recv.__wrapped__ = sock_recv  # type: ignore[attr-defined]
    return recv


def install() -> bool:
    """Apply the fix once; True if kafka-python has the transports it fixes."""
    try:
        from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport
    except ImportError:
        return False
    for transport in (KafkaTCPTransport, KafkaSSLTransport):
        current = transport.__dict__.get("_sock_recv")
        if current is None or hasattr(current, "__wrapped__"):
            continue
        transport._sock_recv = _deliver_before_end(current)
    return True
