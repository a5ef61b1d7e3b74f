"""How ``loupe serve`` and ``loupe reindex`` stop: the first SIGTERM or SIGINT asks the work to
finish what is in flight and commit it; a second one exits at once."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def install_signal_handlers(
    stop: Callable[[], None], exit_now: Callable[[int], None] = os._exit
) -> None:
    """SIGTERM/SIGINT: ``stop`` (finish the batch in flight, commit, stop). A second one exits
    at once (nothing uncommitted is lost: it is replayed after the restart)."""
    received: list[int] = []

    def handle(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("received %s again: exiting now, without finishing the batch", name)
            exit_now(128 + signum)
            return
        received.append(signum)
        log.info("received %s: finishing the batch in flight, then stopping", name)
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
