"""The total fetch deadline holds whatever a server does: a slow drip cannot hold a worker.

Each server here is a raw socket on loopback that sends each byte well within the read timeout,
so only the total deadline can end the fetch.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from loupe.consumers.errors import ImageFetchError
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher

POLICY = FetchPolicy(
    connect_timeout_s=1.0, read_timeout_s=1.0, total_timeout_s=1.5, allow_loopback=True
)
HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"


def _serve(respond: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)  # the request
            with contextlib.suppress(OSError):  # the client hung up: what the deadline is for
                respond(conn, done)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/ring.jpg"
    done.set()
    thread.join(10)
    listener.close()


def _drip(data: bytes, every_s: float) -> Callable[[socket.socket, threading.Event], None]:
    def respond(conn: socket.socket, done: threading.Event) -> None:
        for byte in data:
            if done.wait(every_s):
                return
            conn.sendall(bytes([byte]))

    return respond


@pytest.fixture
def dripping_body() -> Iterator[str]:
    def respond(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(HEADERS)
        _drip(b"\xff" * 100_000, 0.05)(conn, done)

    yield from _serve(respond)


@pytest.fixture
def dripping_headers() -> Iterator[str]:
    yield from _serve(_drip(HEADERS * 50, 0.05))


@pytest.mark.parametrize("server", ["dripping_body", "dripping_headers"])
def test_a_drip_ends_at_the_total_deadline(server, request):
    url = request.getfixturevalue(server)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"slower than 1.5 s in total"):
        ImageFetcher(POLICY).fetch(url)
    took = time.monotonic() - started
    assert 1.4 < took < 2.5, f"the fetch took {took:.1f} s against a 1.5 s deadline"


@pytest.fixture
def short_body() -> Iterator[str]:
    def respond(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(HEADERS + b"\xff\xd8" * 10)

    yield from _serve(respond)


def test_a_body_shorter_than_declared_is_a_failed_fetch(short_body):
    with pytest.raises(ImageFetchError, match=r"the body ended after 20 of 100000 bytes"):
        ImageFetcher(POLICY).fetch(short_body)
