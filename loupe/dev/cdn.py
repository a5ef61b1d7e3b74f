"""A stand-in for a merchant's CDN: a static file server on loopback, for the demo and benchmarks.

``python -m http.server`` listens with a backlog of 5 (socketserver's default), so concurrent
fetches overflow it and the kernel drops SYNs, which are retried after a second: an artifact no
real CDN has. This server raises the backlog and logs nothing.

In the same process (``StandInCdn``) it is enough for the demo; a benchmark that measures the
consumer runs it in another process (``cdn_process``) so it does not compete for the GIL.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class StandInCdn:
    """Serves ``root`` on 127.0.0.1 from a background thread until ``close()``."""

    def __init__(self, root: Path, port: int = 0) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = _Server(("127.0.0.1", port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="stand-in-cdn", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StandInCdn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def cdn_process(root: Path, ready_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve ``root`` from a child process; yields its base URL once it accepts connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "loupe.dev.cdn", str(root), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the stand-in CDN did not start on port {port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    """``python -m loupe.dev.cdn ROOT PORT``: serve ROOT on 127.0.0.1:PORT until killed."""
    if len(sys.argv) != 3:
        sys.exit("usage: python -m loupe.dev.cdn ROOT PORT")
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    handler = functools.partial(_QuietHandler, directory=str(root))
    _Server(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    main()
