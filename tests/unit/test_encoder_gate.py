"""One model, two roles: a waiting search request goes before the next ingest micro-batch."""

from __future__ import annotations

import threading
import time

from loupe.consumers.service.lifecycle import EncoderGate


def test_search_overtakes_queued_ingest_batches():
    gate = EncoderGate()
    order: list[str] = []
    first_batch_running = threading.Event()
    release_first_batch = threading.Event()

    def ingest(name: str, hold: threading.Event | None = None) -> None:
        with gate.ingest():
            order.append(name)
            if hold is not None:
                first_batch_running.set()
                hold.wait(5)

    def search() -> None:
        with gate.search():
            order.append("search")

    first = threading.Thread(target=ingest, args=("ingest-1", release_first_batch))
    first.start()
    assert first_batch_running.wait(5)
    queued_ingest = threading.Thread(target=ingest, args=("ingest-2",))
    queued_ingest.start()
    time.sleep(0.05)  # ingest-2 is now waiting on the gate
    searcher = threading.Thread(target=search)
    searcher.start()
    deadline = time.monotonic() + 5
    while gate._searches_waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # wait until the search is queued too (a condition, not a fixed sleep)
    release_first_batch.set()
    for thread in (first, queued_ingest, searcher):
        thread.join(5)
    assert order == ["ingest-1", "search", "ingest-2"]


def test_the_gate_is_exclusive():
    gate = EncoderGate()
    inside = 0
    peak = 0
    lock = threading.Lock()

    def work(role: str) -> None:
        nonlocal inside, peak
        for _ in range(50):
            with gate.search() if role == "search" else gate.ingest():
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.0005)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=work, args=(r,)) for r in ("search", "ingest", "ingest")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert peak == 1
