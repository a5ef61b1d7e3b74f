"""Loupe on a three-peer Qdrant cluster: products/s into it, and search latency through Kafka
with all peers up, with one peer down, and after it returns, side by side in one run.

    .venv/bin/python -m bench.cluster [--products 236] [--phase-s 30] [--peer node2] [--encode-once]

Everything on this machine: a local Kafka broker, three Qdrant peers on loopback (the binary
from LOUPE_QDRANT_BIN, the PATH or `make qdrant`), and `loupe serve` (ingest + search) with the
collection sharded 3 ways and replicated twice (write consistency 1). The products go in first
(their photos inline) and their rate is measured from the committed offsets; then shoppers send
a text or photo search every 0.2 s for three phases: all peers, ``--peer`` SIGKILLed, and
``--peer`` restarted. ``--peer node0`` kills the peer Loupe talks to (every call then waits).
``--encode-once``: the products go through the vectors topic (``LOUPE_ENCODE_ONCE``), the
cluster written by the index writer.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import tempfile
import time
from pathlib import Path

from kafka import KafkaProducer

from bench.chaos import ingest_done
from bench.cli import summary
from bench.harness import (
    SearchLoad,
    create_service_topics,
    local_broker,
    loupe_process,
    product_event,
    serve_env,
)
from loupe.dev.catalog import load_catalog
from loupe.dev.kafka import free_loopback_port
from loupe.dev.qdrant import LocalQdrant, find_qdrant
from loupe.evaluation.simulators import phone_photo


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--products", type=int, default=236)
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds per search phase")
    parser.add_argument("--peer", default="node2", help="the peer to kill: node0, node1, node2")
    parser.add_argument(
        "--encode-once", action="store_true", help="through the vectors topic (LOUPE_ENCODE_ONCE)"
    )
    args = parser.parse_args()
    catalog = load_catalog()
    photos = [phone_photo(p.image_path.read_bytes(), seed=n) for n, p in enumerate(catalog[::12])]
    with tempfile.TemporaryDirectory(prefix="loupe-cluster-") as tmp, local_broker() as bootstrap:
        work = Path(tmp)
        topics = create_service_topics(bootstrap)
        binary = find_qdrant(os.environ.get("LOUPE_QDRANT_BIN"))
        with LocalQdrant(work / "qdrant", binary).start(3) as cluster:
            port = free_loopback_port()
            env = serve_env(
                bootstrap,
                topics,
                group="cluster",
                state_dir=work / "state",
                metrics_port=port,
                index_url=cluster.url,
                index_shards="3",
                index_replication_factor="2",
                index_write_consistency="1",
                encode_once="true" if args.encode_once else "false",
            )
            log_path = work / "serve.log"
            service = loupe_process(["serve"], env, log_path)
            try:
                ids = [f"p{n}" for n in range(args.products)]
                producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
                started = time.monotonic()
                for n, pid in enumerate(ids):
                    product = catalog[n % len(catalog)]
                    data = base64.b64encode(product.image_path.read_bytes()).decode()
                    image = {"data": data, "media_type": "image/jpeg"}
                    value = product_event(product, image, product_id=pid)
                    producer.send(topics["products"], key=f"giva/{pid}".encode(), value=value)
                producer.close()
                while not ingest_done(bootstrap, "cluster", topics["products"]):
                    if service.poll() is not None:
                        raise SystemExit(log_path.read_text()[-3000:])
                    time.sleep(0.5)
                took = time.monotonic() - started
                print(
                    f"{len(ids)} products into the cluster in {took:.1f} s: "
                    f"{len(ids) / took:.1f} products/s (fetch, encode, 3 shards x 2 replicas)"
                )

                def body(n: int) -> dict:
                    if n % 2:
                        return {"text": "diamond ring", "top_k": 10}
                    data = base64.b64encode(photos[n % len(photos)]).decode()
                    return {"image": {"data": data, "media_type": "image/jpeg"}, "top_k": 10}

                phases = []
                with SearchLoad(
                    bootstrap, topics["requests"], topics["responses"], body, every_s=0.2
                ) as load:
                    for label, action in (
                        ("all three peers", None),
                        (f"{args.peer} down", lambda: cluster.kill(args.peer)),
                        (f"{args.peer} back", lambda: cluster.restart(args.peer)),
                    ):
                        if action is not None:
                            action()
                        start = time.monotonic()
                        time.sleep(args.phase_s)
                        phases.append((label, start, time.monotonic()))
                    load.stop_sending()
                    load.wait_for_answers(180)
                    print("\n| phase | searches | answered | ok | p50 s | p99 s | duplicated |")
                    print("|---|---|---|---|---|---|---|")
                    for label, start, end in phases:
                        window = load.window(start, end)
                        latency = window["latency_s"] or {}
                        ok = window["statuses"].get("ok", 0)
                        print(
                            f"| {label} | {window['sent']} | {window['answered']} | {ok} | "
                            f"{latency.get('p50', float('nan')):.3f} | "
                            f"{latency.get('p99', float('nan')):.3f} | {window['duplicated']} |"
                        )
            finally:
                service.send_signal(signal.SIGTERM)
                service.wait(timeout=120)


if __name__ == "__main__":
    main()
