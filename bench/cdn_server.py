"""A static file server for the benchmarks' stand-in CDN: ``python -m bench.cdn_server ROOT PORT``.

``python -m http.server`` listens with a backlog of 5 (socketserver's default), so concurrent
fetches overflow it and the kernel drops SYNs, which are retried after a second: a benchmark
artifact no real CDN has. This one raises the backlog.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main() -> None:
    root, port = sys.argv[1], int(sys.argv[2])
    handler = functools.partial(_QuietHandler, directory=root)
    _Server(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    main()
