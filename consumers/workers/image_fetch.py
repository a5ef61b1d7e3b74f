"""Fetching product and query photos by URL, safely.

Image URLs come from merchants and shoppers and can point anywhere, so every fetch is bounded:
scheme, redirects, connect/read timeouts and a total deadline, bytes, content type. Where it may
connect is decided after DNS resolution, and the connection goes to exactly the address that was
checked (no second lookup an attacker's DNS could answer differently).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from loupe.consumers.errors import ImageFetchError
from loupe.encoders.profile import MAX_IMAGE_BYTES
from loupe.schemas.common import ALLOWED_MEDIA_TYPES, ImageRef, check_image_url
from loupe.schemas.errors import ErrorCode

USER_AGENT = "Loupe-ImageFetcher/0.1 (+visual product search)"


@dataclass(frozen=True)
class FetchPolicy:
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 5.0
    total_timeout_s: float = 10.0  # one slow-dripping server cannot hold a worker longer
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_redirects: int = 3
    allow_loopback: bool = False  # only for local demos and tests
    allow_private: bool = False  # RFC 1918 / ULA: an intranet CDN, explicitly


def address_verdict(address: str, policy: FetchPolicy) -> str | None:
    """Why ``address`` may not be fetched from, or None if it may. Pure: no I/O."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_loopback or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_HOST):
        return None if policy.allow_loopback else f"{ip} is a loopback address"
    if ip.is_unspecified:
        return None if policy.allow_loopback else f"{ip} is unspecified (this host)"
    if ip.is_link_local:
        return f"{ip} is link-local (cloud metadata lives here)"
    if ip.is_multicast or ip.is_reserved:
        return f"{ip} is multicast or reserved"
    if ip.is_private or ip in _SHARED_ADDRESS_SPACE:
        return None if policy.allow_private else f"{ip} is a private address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _shut_down(connection: http.client.HTTPConnection) -> None:
    """End every blocked read on the connection's socket (called by the deadline watchdog)."""
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


_THIS_HOST = ipaddress.ip_network("0.0.0.0/8")
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


class ImageFetcher:
    """``fetch(url) -> (bytes, media_type)`` or ``ImageFetchError`` with a specific code."""

    def __init__(self, policy: FetchPolicy, resolver=socket.getaddrinfo) -> None:
        self.policy = policy
        self._resolve = resolver

    def load(self, image: ImageRef) -> tuple[bytes, str | None]:
        """A product's or query's photo: inline bytes as sent, or fetched from its URL."""
        if image.data is not None:
            return image.decoded(), image.media_type
        return self.fetch(image.url or "")

    def fetch(self, url: str) -> tuple[bytes, str]:
        deadline = time.monotonic() + self.policy.total_timeout_s
        for _ in range(self.policy.max_redirects + 1):
            status, headers, body = self._get(url, deadline)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise ImageFetchError(
                        ErrorCode.IMAGE_FETCH_FAILED, f"GET {url}: HTTP {status} without Location"
                    )
                url = urljoin(url, location)
                continue
            return body, headers["content-type"]
        raise ImageFetchError(
            ErrorCode.IMAGE_FETCH_FAILED,
            f"more than {self.policy.max_redirects} redirects, last to {url}",
        )

    def _address(self, host: str, port: int) -> str:
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageFetchError(
                ErrorCode.IMAGE_FETCH_FAILED, f"cannot resolve {host}: {exc}"
            ) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise ImageFetchError(ErrorCode.IMAGE_FETCH_FAILED, f"{host} resolves to nothing")
        for address in addresses:  # every answer must pass, or a rebinding DNS could pick one
            reason = address_verdict(address, self.policy)
            if reason is not None:
                raise ImageFetchError(
                    ErrorCode.IMAGE_FORBIDDEN, f"refusing to fetch from {host}: {reason}"
                )
        return addresses[0]

    def _get(self, url: str, deadline: float) -> tuple[int, dict[str, str], bytes]:
        try:
            check_image_url(url)
        except ValueError as exc:
            raise ImageFetchError(ErrorCode.IMAGE_FORBIDDEN, f"{url}: {exc}") from None
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        address = self._address(host, port)
        connection_type = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = connection_type(host, port, address, self.policy.connect_timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow(url)
        # The total deadline holds whatever the server does (headers a byte at a time, a body
        # that drips within each read timeout): at the deadline the socket is shut down, which
        # ends any read blocked on it.
        watchdog = threading.Timer(remaining, _shut_down, args=(connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            connection.sock.settimeout(self.policy.read_timeout_s)
            response = connection.getresponse()
            if time.monotonic() > deadline:  # the watchdog cut the headers short
                raise self._too_slow(url)
            headers = {k.lower(): v for k, v in response.getheaders()}
            if response.status in (301, 302, 303, 307, 308):
                return response.status, headers, b""
            if response.status != 200:
                raise ImageFetchError(
                    ErrorCode.IMAGE_FETCH_FAILED, f"GET {url}: HTTP {response.status}"
                )
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type not in ALLOWED_MEDIA_TYPES:
                raise ImageFetchError(
                    ErrorCode.IMAGE_INVALID,
                    f"GET {url}: content type {media_type or '(none)'!r} is not an allowed image",
                )
            headers["content-type"] = media_type
            declared = headers.get("content-length")
            limit = self.policy.max_image_bytes
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ImageFetchError(
                    ErrorCode.IMAGE_TOO_LARGE, f"GET {url}: {declared} bytes, over {limit}"
                )
            chunks, size = [], 0
            # read1: whatever one recv brings, so the deadline is checked as bytes arrive.
            while chunk := response.read1(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ImageFetchError(
                        ErrorCode.IMAGE_TOO_LARGE, f"GET {url}: more than {limit} bytes"
                    )
                if time.monotonic() > deadline:
                    raise self._too_slow(url)
                chunks.append(chunk)
            if time.monotonic() > deadline:  # the watchdog ended the body early
                raise self._too_slow(url)
            if declared is not None and declared.isdigit() and size != int(declared):
                raise ImageFetchError(
                    ErrorCode.IMAGE_FETCH_FAILED,
                    f"GET {url}: the body ended after {size} of {declared} bytes",
                )
            return 200, headers, b"".join(chunks)
        except TimeoutError as exc:
            if time.monotonic() > deadline:
                raise self._too_slow(url) from exc
            raise ImageFetchError(ErrorCode.IMAGE_FETCH_FAILED, f"GET {url}: timed out") from exc
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            if time.monotonic() > deadline:
                raise self._too_slow(url) from exc
            raise ImageFetchError(ErrorCode.IMAGE_FETCH_FAILED, f"GET {url}: {exc}") from exc
        finally:
            watchdog.cancel()
            connection.close()

    def _too_slow(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            ErrorCode.IMAGE_FETCH_FAILED,
            f"GET {url}: slower than {self.policy.total_timeout_s:g} s in total",
        )
