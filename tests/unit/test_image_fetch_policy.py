"""Where image fetches may connect: a pure verdict, and loopback spellings with loopback off.

Nothing here connects anywhere but loopback: other ranges are checked as pure functions, and
host names go through a resolver stub.
"""

from __future__ import annotations

import socket

import pytest

from loupe.consumers.errors import ImageFetchError
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher, address_verdict
from loupe.schemas.errors import ErrorCode

STRICT = FetchPolicy()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "loopback"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_non_public_addresses_are_refused_by_default(address, reason):
    verdict = address_verdict(address, STRICT)
    assert verdict is not None and reason in verdict


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_pass(address):
    assert address_verdict(address, STRICT) is None


def test_loopback_and_private_only_when_allowed():
    assert address_verdict("127.0.0.1", FetchPolicy(allow_loopback=True)) is None
    assert address_verdict("10.0.0.1", FetchPolicy(allow_private=True)) is None
    assert address_verdict("169.254.169.254", FetchPolicy(allow_loopback=True, allow_private=True))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jpg",
        "http://127.0.0.2:9/x.jpg",
        "http://localhost:9/x.jpg",
        "http://[::1]:9/x.jpg",
        "http://0.0.0.0:9/x.jpg",
        "http://2130706433:9/x.jpg",  # 127.0.0.1 as a decimal integer
        "http://0x7f000001:9/x.jpg",  # ... and in hex
        "http://127.1:9/x.jpg",
    ],
)
def test_loopback_spellings_are_refused_before_connecting(url):
    connected = []
    real = socket.create_connection

    def spy(*args, **kwargs):
        connected.append(args)
        return real(*args, **kwargs)

    fetcher = ImageFetcher(STRICT)
    socket.create_connection = spy
    try:
        with pytest.raises(ImageFetchError) as info:
            fetcher.fetch(url)
    finally:
        socket.create_connection = real
    assert info.value.code in (ErrorCode.IMAGE_FORBIDDEN, ErrorCode.IMAGE_FETCH_FAILED)
    if info.value.code == ErrorCode.IMAGE_FETCH_FAILED:
        assert "resolve" in str(info.value)  # the name did not resolve at all
    assert connected == []


def test_every_resolved_address_must_pass():
    def rebinding(host, port, type=0):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    with pytest.raises(ImageFetchError, match=r"10\.0\.0\.5 is a private address") as info:
        ImageFetcher(STRICT, resolver=rebinding).fetch("https://cdn.loupe.test/a.jpg")
    assert info.value.code == ErrorCode.IMAGE_FORBIDDEN


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://x.loupe.test/", "https://user:pw@x.loupe.test/a.jpg"]
)
def test_disallowed_urls_are_forbidden(url):
    with pytest.raises(ImageFetchError) as info:
        ImageFetcher(STRICT).fetch(url)
    assert info.value.code == ErrorCode.IMAGE_FORBIDDEN
