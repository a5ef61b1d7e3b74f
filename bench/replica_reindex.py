"""A second replica's ``loupe reindex`` under encode-once: from the vectors topic the first
replica's reindex published, against encoding the catalog again, side by side in one run.

    .venv/bin/python -m bench.replica_reindex [--products 236]

Everything on this machine: a local Kafka broker and ``loupe reindex`` processes, each a
replica (``LOUPE_REPLICA_ID``) with an embedded index of its own and ``LOUPE_ENCODE_ONCE=true``.
The products go in first (photos inline). Then, one after the other:

- ``a`` reindexes: it encodes the catalog and publishes the new collection's vectors topic;
- ``b`` reindexes as it would by itself: it finds that topic published and builds from it;
- ``c`` reindexes with ``--encode``: it encodes the catalog again, as every replica did before.

For each: the seconds the process ran (start-up included, the same for all three), the
source its first line names, and the points it built. No service runs meanwhile.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import summary
from bench.harness import create_service_topics, local_broker, publish_products, serve_env
from loupe.dev.catalog import load_catalog

RUNS = (
    ("a", [], "first replica: encodes, publishes the vectors topic"),
    ("b", [], "second replica, by itself: from the vectors topic"),
    ("c", ["--encode"], "second replica, --encode: encodes again"),
)
DONE = re.compile(r"reindex \S+: \d+/\d+ events .* (\d+) points")


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--products", type=int, default=236)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per reindex")
    args = parser.parse_args()
    catalog = load_catalog()
    with (
        tempfile.TemporaryDirectory(prefix="loupe-replica-reindex-") as tmp,
        local_broker() as bootstrap,
    ):
        work = Path(tmp)
        topics = create_service_topics(bootstrap)
        publish_products(bootstrap, topics["products"], catalog, args.products)
        rows = []
        for name, flags, how in RUNS:
            env = serve_env(
                bootstrap,
                topics,
                group="replica-reindex",
                state_dir=work / name,
                replica_id=name,
                encode_once="true",
            )
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "loupe", "reindex", "--metrics-port", "0", *flags],
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout_s,
                check=False,
            )
            seconds = time.monotonic() - started
            if done.returncode != 0:
                raise SystemExit(f"replica {name}'s reindex failed:\n{done.stderr[-3000:]}")
            lines = done.stdout.splitlines()
            source = next((line for line in lines if line.startswith("building ")), "?")
            points = [int(m.group(1)) for line in lines if (m := DONE.search(line))]
            rows.append(
                (name, how, seconds, source.split(" from ", 1)[-1].split(";")[0], points[-1])
            )
            print(f"replica {name}: {seconds:.1f} s", flush=True)
    print(f"\n{args.products} products, embedded indexes, this machine's CPU\n")
    print("| replica | how | seconds (process) | built from | points |")
    print("|---|---|---|---|---|")
    for name, how, seconds, source, points in rows:
        print(f"| {name} | {how} | {seconds:.1f} | {source} | {points} |")
    b, c = rows[1][2], rows[2][2]
    print(f"\nfrom the vectors topic: {c / b:.1f}x faster than encoding again")


if __name__ == "__main__":
    main()
