"""Chaos: a product stream and shoppers' searches while `loupe serve` is SIGKILLed again and
again, the broker is paused, and an image server drips bytes. Then the books are checked.

    .venv/bin/python -m bench.chaos [--events 2000] [--searches 200] [--kills 10]

Everything runs on this machine: a local Kafka broker, the stand-in CDN, a dripping server and
`loupe serve` (ingest + search, embedded Qdrant) as a child process restarted after each kill.
Bounded in time (--max-minutes). It prints, and the target for each is zero:

- lost products (their last event is an upsert, but no point), extra products (deleted or never
  valid, but a point), stale products (a point from an older version than the last);
- missing answers (a request never answered) and duplicated answers (answered twice, as a
  read_committed reader sees the responses topic);
- worker deaths (a worker thread that died and took the process down);

and the longest any one batch held a worker (the dripping photos are bounded by the fetch
deadline, so it stays near LOUPE_FETCH_TOTAL_TIMEOUT_S, far under max_poll_interval_ms).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from bench.harness import serve_env
from loupe.client import encode_request, search_request
from loupe.consumers.index import QdrantIndex
from loupe.dev.catalog import load_catalog, upserted_event
from loupe.dev.cdn import cdn_process
from loupe.dev.kafka import LocalKafkaBroker, free_loopback_port
from loupe.train.augment import phone_photo

MERCHANT = "giva"


# --- the dripping image server ------------------------------------------------------------------


@contextlib.contextmanager
def drip_server(byte_every_s: float = 0.5) -> Iterator[str]:
    """Answers every GET with image headers and then one byte every ``byte_every_s`` (each
    within any read timeout), for a minute: only the total fetch deadline can end it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 120\r\n\r\n"
            )
            for _ in range(120):
                if stop.wait(byte_every_s):
                    return
                conn.sendall(b"\xff")

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


# --- the workload ---------------------------------------------------------------------------------


def build_events(catalog, count: int, cdn: str, drip: str, rng: random.Random):
    """``count`` product events over a set of products: upserts with growing versions, deletes,
    and a few products whose photo drips (dead-lettered). Returns the events and, per product,
    what its point must be at the end: the title of its last upsert, or None (absent)."""
    products = max(50, count // 4)
    version = Counter()
    expected: dict[str, str | None] = {}
    events: list[tuple[str, dict]] = []
    for n in range(count):
        index = rng.randrange(products)
        product = catalog[index % len(catalog)]
        pid = f"p{index}"
        version[pid] += 1
        v = version[pid]
        if pid in expected and rng.random() < 0.12:
            event = {
                "type": "product.deleted",
                "event_id": f"e{n}",
                "occurred_at": datetime.now(UTC).isoformat(),
                "merchant_id": MERCHANT,
                "product_id": pid,
                "version": v,
            }
            expected[pid] = None
        else:
            if rng.random() < 0.2:
                image = {
                    "data": base64.b64encode(product.image_path.read_bytes()).decode(),
                    "media_type": "image/jpeg",
                }
            else:
                relative = product.image_path.relative_to(product.image_path.parent.parent)
                image = {"url": f"{cdn}/{relative.as_posix()}"}
            event = upserted_event(product, image, product_id=pid, event_id=f"e{n}", version=v)
            event["title"] = f"{product.title} v{v}"
            expected[pid] = event["title"]
        events.append((f"{MERCHANT}/{pid}", event))
    for d in range(8):  # photos that drip: each must be dead-lettered, none indexed
        pid = f"drip{d}"
        product = catalog[d]
        event = upserted_event(
            product, {"url": f"{drip}/{d}.jpg"}, product_id=pid, event_id=f"drip{d}"
        )
        events.insert(rng.randrange(len(events)), (f"{MERCHANT}/{pid}", event))
        expected[pid] = None
    return events, expected


# --- running and killing loupe serve --------------------------------------------------------------


class Service:
    """`loupe serve` as a child process, restarted after each kill; its logs go to one file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loupe", "serve"],
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records of ``topic`` that ``group`` has not committed yet."""
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        ends = consumer.end_offsets(partitions)
        try:
            committed = admin.list_group_offsets(group).get(group, {})
        except KafkaError:
            return sum(ends.values())  # the group has not joined yet
        done = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
        return sum(max(0, ends[tp] - done.get(tp, 0)) for tp in partitions)
    finally:
        consumer.close()
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="product events (>= 2000)")
    parser.add_argument("--searches", type=int, default=200, help="search requests (>= 200)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of loupe serve")
    parser.add_argument("--pause-s", type=float, default=20.0, help="broker SIGSTOP length")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="give up after this")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    hard_deadline = time.monotonic() + args.max_minutes * 60
    catalog = load_catalog()

    with tempfile.TemporaryDirectory(prefix="loupe-chaos-") as tmp_name, drip_server() as drip:
        tmp = Path(tmp_name)
        broker = LocalKafkaBroker(state_dir=tmp / "kafka", die_with_parent=True)
        state = broker.start()
        bootstrap = state.bootstrap_servers
        topics = {
            "products": "chaos.products",
            "requests": "chaos.requests",
            "responses": "chaos.responses",
            "deadletter": "chaos.deadletter",
        }
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics(
            [NewTopic(t, num_partitions=3, replication_factor=1) for t in topics.values()]
        )
        admin.close()
        port = free_loopback_port()
        group = "chaos"
        env = serve_env(
            bootstrap,
            topics,
            group=group,
            state_dir=tmp / "state",
            metrics_port=port,
            fetch_allow_loopback="true",
            max_poll_records="64",
        )
        log_path = tmp / "serve.log"
        service = Service(env, log_path)
        photos_root = catalog[0].image_path.parent.parent  # one folder per category below
        with cdn_process(photos_root) as cdn:
            events, expected = build_events(catalog, args.events, cdn, drip, rng)
            print(
                f"chaos: {len(events)} product events over {len(expected)} products, "
                f"{args.searches} searches, {args.kills} kills, one {args.pause_s:.0f} s broker "
                f"pause; Kafka on {bootstrap}",
                flush=True,
            )
            service.start()
            started = time.monotonic()
            while not ready(port):
                assert time.monotonic() - started < 300, "loupe serve never became ready"
                time.sleep(0.5)
            print(f"  service ready in {time.monotonic() - started:.0f} s", flush=True)

            producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
            request_ids = [f"q{n}" for n in range(args.searches)]
            shopper_photos = [
                phone_photo(p.image_path.read_bytes(), seed=i) for i, p in enumerate(catalog[::20])
            ]
            publish_done = threading.Event()

            def publish() -> None:
                # Products and searches interleaved, over about two minutes.
                searches_every = max(1, len(events) // max(1, len(request_ids)))
                asked = 0
                for n, (key, event) in enumerate(events):
                    producer.send(
                        topics["products"], key=key.encode(), value=json.dumps(event).encode()
                    )
                    if n % searches_every == 0 and asked < len(request_ids):
                        kind = asked % 3
                        request = search_request(
                            photo=shopper_photos[asked % len(shopper_photos)]
                            if kind != 1
                            else None,
                            text="gold ring" if kind != 0 else None,
                            top_k=5,
                            request_id=request_ids[asked],
                        )
                        k, v = encode_request(request)
                        producer.send(topics["requests"], key=k, value=v)
                        asked += 1
                    if n % 20 == 0:
                        time.sleep(0.9)
                for rid in request_ids[asked:]:
                    k, v = encode_request(search_request(text="pearl", request_id=rid))
                    producer.send(topics["requests"], key=k, value=v)
                producer.flush()
                publish_done.set()

            publisher = threading.Thread(target=publish, daemon=True)
            publisher.start()

            # The chaos: each kill lands at a random moment of a serving process's life (it
            # loads, joins its groups, then works for 1 to 12 s); halfway, the broker pauses.
            def wait_ready() -> None:
                while not ready(port):
                    service.ensure_running()  # what a supervisor does after an exit
                    assert time.monotonic() < hard_deadline, "out of time"
                    time.sleep(0.3)

            chaos_started = time.monotonic()
            for kill in range(1, args.kills + 1):
                wait_ready()
                time.sleep(rng.uniform(1, 12))
                service.kill()
                print(f"  SIGKILL {kill} at {time.monotonic() - chaos_started:.0f} s", flush=True)
                service.start()
                if kill == args.kills // 2:
                    wait_ready()
                    time.sleep(rng.uniform(1, 5))
                    print(f"  pausing the broker for {args.pause_s:.0f} s", flush=True)
                    os.kill(state.pid, signal.SIGSTOP)
                    time.sleep(args.pause_s)
                    os.kill(state.pid, signal.SIGCONT)

            # Let it finish: everything consumed and every request answered.
            publish_done.wait(600)
            answers: Counter[str] = Counter()
            reader = KafkaConsumer(
                topics["responses"],
                bootstrap_servers=bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            wanted = set(request_ids)
            while time.monotonic() < hard_deadline:
                service.ensure_running()
                for batch in reader.poll(timeout_ms=500).values():
                    for record in batch:
                        answers[record.key.decode()] += 1
                if (
                    wanted <= set(answers)
                    and group_lag(bootstrap, f"{group}.ingest", topics["products"]) == 0
                ):
                    break
            settle = time.monotonic() + 5
            while time.monotonic() < settle:
                for batch in reader.poll(timeout_ms=500).values():
                    for record in batch:
                        answers[record.key.decode()] += 1
            reader.close()
            exit_code = service.stop()
            producer.close()

        index = QdrantIndex(model_version="unused", path=str(tmp / "state" / "index"))
        collection = index.client.get_aliases().aliases[0].collection_name
        points, offset = [], None
        while True:
            batch, offset = index.client.scroll(
                collection, limit=1000, offset=offset, with_payload=["product_id", "title"]
            )
            points += batch
            if offset is None:
                break
        index.close()
        stored = {p.payload["product_id"]: p.payload["title"] for p in points}
        lost = [pid for pid, title in expected.items() if title is not None and pid not in stored]
        extra = [pid for pid in stored if expected.get(pid) is None]
        stale = [
            pid
            for pid, title in expected.items()
            if title is not None and pid in stored and stored[pid] != title
        ]
        log = log_path.read_text(errors="replace")
        deaths = log.count("worker died")
        slow = [float(s) for s in re.findall(r"slow batch: \d+ records in ([0-9.]+) s", log)]
        broker.stop()

    missing = sorted(wanted - set(answers))
    duplicated = sorted(rid for rid, count in answers.items() if rid in wanted and count > 1)
    print("\nresults (target: 0 for each count)")
    print(f"  lost products        {len(lost)}  {lost[:5]}")
    print(f"  extra products       {len(extra)}  {extra[:5]}")
    print(f"  stale products       {len(stale)}  {stale[:5]}")
    print(f"  missing answers      {len(missing)}  {missing[:5]}")
    print(f"  duplicated answers   {len(duplicated)}  {duplicated[:5]}")
    print(f"  worker deaths        {deaths}")
    print(
        f"  points checked       {len(stored)} of {sum(1 for t in expected.values() if t)} expected"
    )
    print(f"  starts of serve      {service.starts} (kills: {args.kills}); last exit {exit_code}")
    print(f"  longest batch        {max(slow, default=0.0):.1f} s (batches over 5 s: {len(slow)})")
    failed = lost or extra or stale or missing or duplicated or deaths
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
