"""Chaos: a product stream and shoppers' searches while `loupe serve` is SIGKILLed again and
again, the Kafka broker is paused (SIGSTOP) again and again, and an image server drips bytes.
Then the books are checked.

    .venv/bin/python -m bench.chaos [--engines edge,server,edge-encode-once,server-encode-once]
        [--kills 10]

Everything runs on this machine: a local Kafka broker, the stand-in CDN, a dripping server,
for ``server`` a Qdrant server process (``LOUPE_QDRANT_BIN``, ``qdrant`` on the PATH, or
``make qdrant``'s), and `loupe serve` (ingest + search) as a child process that is restarted
after each kill, and after any exit of its own (what a supervisor does: those exits are
counted). Each engine runs the same schedule; the kills and the pauses (each ``--pause-min-s``
to ``--pause-max-s`` long) come in a random order while products and searches flow. Half the
pauses land at random moments; the other half are aimed at a commit: the bench sends a burst of
photo searches and pauses the broker as soon as the service's metrics show the search worker
took a batch, so the batch's transactional commit goes out to a silent broker. The producers
give up on a silent broker after ``--request-timeout-ms`` (5 s here, 30 s by default in
Loupe), so a pause longer than that makes the commit in flight fail; the service must recover
from each by itself. Bounded in time (--max-minutes).

It prints, per engine, and the target for each count is zero:

- lost products (their last event is an upsert, but no point), extra products (deleted or never
  valid, but a point), stale products (a point from an older version than the last);
- missing answers (a request never answered) and duplicated answers (answered twice, as a
  read_committed reader sees the responses topic);
- exits of the service on its own (the process ended without being killed: a worker that
  died, or anything else) and worker deaths in its log;

and how the pauses went (commits that failed and producers replaced, from the service's log),
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from bench.cli import summary
from bench.harness import loupe_process, serve_env
from loupe.client import encode_request, search_request
from loupe.consumers.index.interface import point_id
from loupe.consumers.kafka.admin import KafkaAdmin, TopicSpec
from loupe.consumers.kafka.names import ENCODE, KafkaNames
from loupe.consumers.service.app import build_catalog
from loupe.consumers.settings import Settings
from loupe.consumers.workers.live_model import open_collection
from loupe.dev.catalog import load_catalog, upserted_event
from loupe.dev.cdn import cdn_process
from loupe.dev.kafka import LocalKafkaBroker, free_loopback_port, has_read_all
from loupe.dev.qdrant import LocalQdrant, find_qdrant
from loupe.encoders.fused import FusedEncoder
from loupe.evaluation.simulators import phone_photo

MERCHANT = "giva"
ENGINES = ("edge", "server", "edge-encode-once", "server-encode-once")
BURST = 6  # photo searches sent to aim a pause at the search worker's commit


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
    what its point must be at the end: the version of its last upsert, or None (absent)."""
    products = max(50, count // 4)
    version = Counter()
    expected: dict[str, int | None] = {}
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
            expected[pid] = v
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
    """`loupe serve` as a child process, restarted after each kill and after each exit of its
    own (counted, with its status); its logs go to one file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.exits: list[int] = []  # statuses of the exits nobody asked for

    def start(self) -> None:
        self.proc = loupe_process(["serve"], self.env, self.log_path)
        self.starts += 1

    def kill(self) -> None:
        self.ensure_running()  # an exit of its own just before the kill still counts
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            print(f"  the service exited on its own with status {self.proc.returncode}", flush=True)
            self.start()
        elif self.proc is None:
            self.start()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.ensure_running()
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

    admin = KafkaAdmin({"bootstrap_servers": bootstrap})
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        ends = consumer.end_offsets(partitions)
        try:
            done = admin.committed(group)
        except KafkaError:
            return sum(ends.values())  # the group has not joined yet
        return sum(max(0, ends[tp] - done.get(tp, 0)) for tp in partitions)
    finally:
        consumer.close()
        admin.close()


def ingest_done(bootstrap: str, group: str, products_topic: str) -> bool:
    """Whether the service has applied every product event: its ingest group has no lag, or
    with encode-once, its encoders' group has none and its index writers have read their
    collection's vectors topic to the end."""
    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        groups = admin.groups()
    names = KafkaNames.of(Settings(group_id=group))
    encoders = [g for g in groups if g.startswith(names.groups_of(ENCODE))]
    if not encoders:
        return group_lag(bootstrap, names.ingest_group(), products_topic) == 0
    if len(encoders) != 1:
        return False  # a switch in flight
    collection = encoders[0].removeprefix(names.groups_of(ENCODE))
    return group_lag(bootstrap, encoders[0], products_topic) == 0 and has_read_all(
        bootstrap, names.index_group(collection), names.vectors_topic(collection)
    )


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    engine: str
    lost: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    deaths: int = 0
    points: int = 0
    expected_points: int = 0
    starts: int = 0
    kills: int = 0
    pauses: list[float] = field(default_factory=list)
    aimed: int = 0  # pauses that began while a search batch was being handled
    commit_failures: int = 0
    replacements: int = 0
    longest_batch_s: float = 0.0
    slow_batches: int = 0
    minutes: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(
            self.lost
            or self.extra
            or self.stale
            or self.missing
            or self.duplicated
            or self.exits
            or self.deaths
        )


def schedule(args, rng: random.Random) -> list[tuple[str, float]]:
    """The kills and pauses in a random order; a pause carries its length. Every other pause
    is aimed at a commit (``commit-pause``), the others land at random moments."""
    events = [("kill", 0.0)] * args.kills
    for n in range(args.pauses):
        kind = "commit-pause" if n % 2 == 0 else "pause"
        events.append((kind, rng.uniform(args.pause_min_s, args.pause_max_s)))
    rng.shuffle(events)
    return events


def batches_started(port: int, role: str) -> float:
    """How many batches the service's ``role`` worker has taken (its batch-size histogram's
    count: observed as a batch is polled, before it is handled)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return -1.0
    found = re.search(rf'^loupe_batch_size_count{{role="{role}"}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else -1.0


def aim_at_a_commit(port: int, send_burst, timeout_s: float = 30.0) -> bool:
    """Send a burst of photo searches and return once the search worker has taken a batch:
    it is now encoding photos, and its commit follows within seconds. False if no batch
    started in time (the pause then lands wherever it lands)."""
    before = batches_started(port, "search")
    send_burst()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if batches_started(port, "search") > before >= 0:
            return True
        time.sleep(0.02)
    return False


def run_engine(engine: str, args, catalog, plan, shopper_photos) -> Outcome:
    rng = random.Random(args.seed)
    outcome = Outcome(engine)
    started_run = time.monotonic()
    hard_deadline = started_run + args.max_minutes * 60
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loupe-chaos-")))
        drip = stack.enter_context(drip_server())
        broker = LocalKafkaBroker(state_dir=tmp / "kafka", die_with_parent=True)
        state = broker.start()
        stack.callback(broker.stop)
        stack.callback(os.kill, state.pid, signal.SIGCONT)  # never leave it paused
        bootstrap = state.bootstrap_servers
        topics = {
            "products": "chaos.products",
            "requests": "chaos.requests",
            "responses": "chaos.responses",
            "deadletter": "chaos.deadletter",
        }
        with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
            admin.create_missing([TopicSpec(t, 3) for t in topics.values()])
        extra_settings = {}
        if engine.endswith("-encode-once"):  # through the vectors topic (LOUPE_ENCODE_ONCE)
            extra_settings["encode_once"] = "true"
        if engine.startswith("server"):
            qdrant = LocalQdrant(tmp / "qdrant", find_qdrant(os.environ.get("LOUPE_QDRANT_BIN")))
            stack.enter_context(qdrant.start(1))
            extra_settings["index_url"] = qdrant.url
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
            producer_request_timeout_ms=str(args.request_timeout_ms),
            **extra_settings,
        )
        log_path = tmp / "serve.log"
        service = Service(env, log_path)
        photos_root = catalog[0].image_path.parent.parent  # one folder per category below
        cdn = stack.enter_context(cdn_process(photos_root))
        events, expected = build_events(catalog, args.events, cdn, drip, rng)
        print(
            f"chaos on {engine}: {len(events)} product events over {len(expected)} products, "
            f"{args.searches} searches, {args.kills} kills, {args.pauses} broker pauses "
            f"({args.pause_min_s:.0f} to {args.pause_max_s:.0f} s); Kafka on {bootstrap}",
            flush=True,
        )
        service.start()
        while not ready(port):
            assert time.monotonic() - started_run < 300, "loupe serve never became ready"
            time.sleep(0.5)
        print(f"  service ready in {time.monotonic() - started_run:.0f} s", flush=True)

        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
        request_ids = [f"q{n}" for n in range(args.searches)]
        burst_ids: list[str] = []  # the searches sent to aim a pause at a commit

        def send_burst() -> None:
            for n in range(BURST):
                rid = f"b{len(burst_ids)}"
                burst_ids.append(rid)
                photo = shopper_photos[(len(burst_ids) + n) % len(shopper_photos)]
                k, v = encode_request(search_request(photo=photo, top_k=5, request_id=rid))
                producer.send(topics["requests"], key=k, value=v)
            producer.flush()

        publish_done = threading.Event()
        # Spread the stream over the chaos: each kill costs a restart (some 20 s here), each
        # pause its length.
        planned_s = sum(length + 5 for kind, length in plan if kind == "pause")
        planned_s += 20 * sum(1 for kind, _ in plan if kind == "kill")
        chunk = 20
        pace_s = planned_s / max(1, len(events) / chunk)

        def publish() -> None:
            searches_every = max(1, len(events) // max(1, len(request_ids)))
            asked = 0
            for n, (key, event) in enumerate(events):
                producer.send(
                    topics["products"], key=key.encode(), value=json.dumps(event).encode()
                )
                if n % searches_every == 0 and asked < len(request_ids):
                    kind = asked % 3
                    request = search_request(
                        photo=shopper_photos[asked % len(shopper_photos)] if kind != 1 else None,
                        text="gold ring" if kind != 0 else None,
                        top_k=5,
                        request_id=request_ids[asked],
                    )
                    k, v = encode_request(request)
                    producer.send(topics["requests"], key=k, value=v)
                    asked += 1
                if n % chunk == 0:
                    time.sleep(pace_s)
            for rid in request_ids[asked:]:
                k, v = encode_request(search_request(text="pearl", request_id=rid))
                producer.send(topics["requests"], key=k, value=v)
            producer.flush()
            publish_done.set()

        threading.Thread(target=publish, daemon=True).start()

        def wait_ready() -> None:
            while not ready(port):
                service.ensure_running()
                assert time.monotonic() < hard_deadline, "out of time"
                time.sleep(0.3)

        # The chaos: each event lands at a random moment of a serving process's life (it
        # loads, joins its groups, then works for 1 to 12 s).
        chaos_started = time.monotonic()
        for kind, length in plan:
            wait_ready()
            time.sleep(rng.uniform(1, 12))
            at = time.monotonic() - chaos_started
            if kind == "kill":
                service.kill()
                outcome.kills += 1
                print(f"  SIGKILL {outcome.kills} at {at:.0f} s", flush=True)
                service.start()
            else:
                aimed = kind == "commit-pause" and aim_at_a_commit(port, send_burst)
                os.kill(state.pid, signal.SIGSTOP)
                outcome.aimed += aimed
                where = "as a search batch is handled" if aimed else "at a random moment"
                print(f"  broker paused at {at:.0f} s for {length:.0f} s, {where}", flush=True)
                deadline = time.monotonic() + length
                while time.monotonic() < deadline:
                    service.ensure_running()
                    time.sleep(0.2)
                os.kill(state.pid, signal.SIGCONT)
                outcome.pauses.append(length)

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
        wanted = set(request_ids) | set(burst_ids)
        while time.monotonic() < hard_deadline:
            service.ensure_running()
            for batch in reader.poll(timeout_ms=500).values():
                for record in batch:
                    answers[record.key.decode()] += 1
            if wanted <= set(answers) and ingest_done(bootstrap, group, topics["products"]):
                break
        settle = time.monotonic() + 5
        while time.monotonic() < settle:
            for batch in reader.poll(timeout_ms=500).values():
                for record in batch:
                    answers[record.key.decode()] += 1
        reader.close()
        service.stop()
        producer.close()

        settings = Settings(state_dir=tmp / "state", **extra_settings)
        catalog_index = build_catalog(settings)
        encoder, index = open_collection(
            catalog_index,
            catalog_index.live(),
            settings.model_profile(),
            FusedEncoder.from_profile,
        )
        ids = {pid: point_id(MERCHANT, pid) for pid in expected}
        stored = index.stored_versions(list(ids.values()))
        index.close()
        encoder.close()
        catalog_index.close()
        version = {pid: stored.get(ids[pid]) for pid in expected if ids[pid] in stored}
        outcome.lost = [p for p, v in expected.items() if v is not None and p not in version]
        outcome.extra = [p for p in version if expected.get(p) is None]
        outcome.stale = [
            p for p, v in expected.items() if v is not None and p in version and version[p] != v
        ]
        outcome.points = len(version)
        outcome.expected_points = sum(1 for v in expected.values() if v is not None)
        log = log_path.read_text(errors="replace")
        outcome.deaths = log.count("worker died")
        outcome.commit_failures = log.count("publish and commit failed (")  # the publisher's line
        outcome.replacements = log.count("a new producer replaced")
        slow = [float(x) for x in re.findall(r"slow batch: \d+ records in ([0-9.]+) s", log)]
        outcome.longest_batch_s, outcome.slow_batches = max(slow, default=0.0), len(slow)
        outcome.missing = sorted(wanted - set(answers))
        outcome.duplicated = sorted(r for r, n in answers.items() if r in wanted and n > 1)
        outcome.exits, outcome.starts = service.exits, service.starts
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.log_dir) / f"chaos-{engine}.log").write_text(log)
    outcome.minutes = (time.monotonic() - started_run) / 60
    return outcome


def report(outcome: Outcome) -> None:
    o = outcome
    print(f"\nresults on {o.engine} (target: 0 for each count), {o.minutes:.1f} min")
    print(f"  lost products          {len(o.lost)}  {o.lost[:5]}")
    print(f"  extra products         {len(o.extra)}  {o.extra[:5]}")
    print(f"  stale products         {len(o.stale)}  {o.stale[:5]}")
    print(f"  missing answers        {len(o.missing)}  {o.missing[:5]}")
    print(f"  duplicated answers     {len(o.duplicated)}  {o.duplicated[:5]}")
    print(f"  exits on its own       {len(o.exits)}  {o.exits[:5]}")
    print(f"  worker deaths          {o.deaths}")
    print(f"  points checked         {o.points} of {o.expected_points} expected")
    print(f"  starts of serve        {o.starts} (kills: {o.kills})")
    pauses = ", ".join(f"{p:.0f}" for p in o.pauses)
    print(f"  broker pauses          {len(o.pauses)} ({pauses} s), {o.aimed} during a batch")
    print(f"  commits failed         {o.commit_failures} (producers replaced: {o.replacements})")
    print(f"  longest batch          {o.longest_batch_s:.1f} s (over 5 s: {o.slow_batches})")


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument(
        "--engines",
        default="edge,server",
        help=f"any of {', '.join(ENGINES)} (*-encode-once: through the vectors topic)",
    )
    parser.add_argument("--events", type=int, default=2000, help="product events (>= 2000)")
    parser.add_argument("--searches", type=int, default=200, help="search requests (>= 200)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of loupe serve")
    parser.add_argument("--pauses", type=int, default=10, help="broker SIGSTOPs")
    parser.add_argument("--pause-min-s", type=float, default=5.0)
    parser.add_argument("--pause-max-s", type=float, default=40.0)
    parser.add_argument(
        "--request-timeout-ms",
        type=int,
        default=5000,
        help="LOUPE_PRODUCER_REQUEST_TIMEOUT_MS: a pause longer than this fails a commit",
    )
    parser.add_argument("--max-minutes", type=float, default=40.0, help="per engine")
    parser.add_argument("--log-dir", default=None, help="keep each engine's service log here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; expected {ENGINES}")
    if args.pause_min_s > args.pause_max_s:
        parser.error("--pause-min-s must not exceed --pause-max-s")
    catalog = load_catalog()
    plan = schedule(args, random.Random(args.seed))  # the same schedule for every engine
    shopper_photos = [
        phone_photo(p.image_path.read_bytes(), seed=i) for i, p in enumerate(catalog[::20])
    ]
    outcomes = []
    for engine in engines:  # each engine's results as soon as it is done
        outcomes.append(run_engine(engine, args, catalog, plan, shopper_photos))
        report(outcomes[-1])
    sys.exit(1 if any(o.failed for o in outcomes) else 0)


if __name__ == "__main__":
    main()
