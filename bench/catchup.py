"""A replica that joins late: catching up from the vectors topic (encode-once) against a full
re-encode of the catalog, side by side in one run.

    .venv/bin/python -m bench.catchup [--products 236]

Everything on this machine: a local Kafka broker and `loupe serve` replicas with embedded
indexes. The products go in first (photos inline). Replica ``a`` (``LOUPE_ENCODE_ONCE=true``)
encodes them and its encoders fill the vectors topic; it keeps running. Then, one after the
other: replica ``b`` with encode-once (its index written from the vectors topic) and replica
``c`` without it (its own ingest fetches and encodes every product, as every replica did
before). For each: seconds from start to ready (a replica answers searches only once caught
up), the part of it spent catching up (from its workers starting to "caught up" in its log),
and how many products it encoded.
"""

from __future__ import annotations

import argparse
import re
import signal
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from bench.cli import summary
from bench.harness import (
    create_service_topics,
    local_broker,
    loupe_process,
    publish_products,
    serve_env,
)
from loupe.dev.catalog import load_catalog
from loupe.dev.kafka import free_loopback_port

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--products", type=int, default=236)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per replica")
    args = parser.parse_args()
    catalog = load_catalog()
    with tempfile.TemporaryDirectory(prefix="loupe-catchup-") as tmp, local_broker() as bootstrap:
        work = Path(tmp)
        topics = create_service_topics(bootstrap)
        publish_products(bootstrap, topics["products"], catalog, args.products)

        def replica(name: str, encode_once: bool):
            port = free_loopback_port()
            env = serve_env(
                bootstrap,
                topics,
                group="catchup",
                state_dir=work / name,
                metrics_port=port,
                replica_id=name,
                encode_once="true" if encode_once else "false",
            )
            log_path = work / f"{name}.log"
            return loupe_process(["serve"], env, log_path), port, log_path

        rows = []
        running = []
        try:
            for name, encode_once, how in (
                ("a", True, "first replica: encodes the catalog, fills the vectors topic"),
                ("b", True, "late, encode-once: from the vectors topic"),
                ("c", False, "late, without: fetches and encodes every product"),
            ):
                proc, port, log_path = replica(name, encode_once)
                running.append(proc)
                started = time.monotonic()
                _wait_ready(proc, port, log_path, args.timeout_s)
                ready_s = time.monotonic() - started
                rows.append(
                    (
                        name,
                        how,
                        ready_s,
                        _catching_up_s(log_path, name),
                        *_counts(port, topics["products"]),
                    )
                )
                print(f"replica {name} ready after {ready_s:.1f} s", flush=True)
        finally:
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            for proc in running:
                proc.wait(timeout=120)
        print(f"\n{args.products} products, embedded indexes, this machine's CPU\n")
        print("| replica | how it catches up | ready after s | catching up s | encoded | points |")
        print("|---|---|---|---|---|---|")
        for name, how, ready_s, catching_s, encoded, points in rows:
            print(
                f"| {name} | {how} | {ready_s:.1f} | {catching_s:.1f} | {encoded:.0f} | "
                f"{points:.0f} |"
            )
        b, c = rows[1][3], rows[2][3]
        print(f"\ncatching up from the vectors topic: {c / b:.1f}x faster than re-encoding")


def _wait_ready(proc, port: int, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"replica exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"replica not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _catching_up_s(log_path: Path, name: str) -> float:
    """From the first worker running to the replica's "caught up" line."""
    started = caught = None
    for line in log_path.read_text().splitlines():
        stamp = STAMP.match(line)
        if stamp is None:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if started is None and "consumer running on" in line:
            started = when
        if f"replica {name}: caught up" in line:
            caught = when
    if started is None or caught is None:
        return float("nan")
    return (caught - started).total_seconds()


def _counts(port: int, products_topic: str) -> tuple[float, float]:
    """Products this replica encoded (either way), and the points in its index."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M))

    # With encode-once the encoder counts what it encoded; without, the ingest of the products
    # topic encodes every product it indexes.
    encoded = total(r'loupe_events_total\{outcome="encoded",[^}]*\}') + total(
        rf'loupe_events_total\{{outcome="indexed",topic="{re.escape(products_topic)}"\}}'
    )
    return encoded, total("loupe_index_points")


if __name__ == "__main__":
    main()
