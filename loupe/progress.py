"""Progress bars that suit where the output goes.

On a terminal, a tqdm bar that redraws in place. Anywhere else (a log file, CI, a pipe) a
redrawn line would garble the log, so the same calls print a plain line at most every
``plain_every_s`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


class _PlainProgress:
    """tqdm's ``update``/``n``/context-manager surface, as occasional plain lines."""

    def __init__(
        self, total: int | None, desc: str, unit: str, stream: TextIO, every_s: float
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n = 0
        self._every_s = every_s
        self._started = self._last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._started, 1e-6)
        of = f"/{self.total}" if self.total is not None else ""
        print(
            f"    {self.desc}: {self.n}{of} {self.unit}s ({rate:.1f}/s)",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        self._line(time.monotonic())

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    *,
    total: int | None,
    desc: str,
    unit: str = "item",
    stream: TextIO | None = None,
    plain_every_s: float = 5.0,
) -> Any:
    """A progress bar on a terminal, plain lines elsewhere; use as a context manager."""
    stream = stream or sys.stdout
    if stream.isatty():
        return tqdm(total=total, desc=f"    {desc}", unit=unit, file=stream, dynamic_ncols=True)
    return _PlainProgress(total, desc, unit, stream, plain_every_s)
