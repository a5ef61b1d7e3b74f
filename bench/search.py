"""Search latency through Kafka: request produced -> response consumed, at a steady rate.

The index (Qdrant Edge, the service's default; ``--engine qdrant-local`` for the old one) holds
the jewelry catalog (236 products) and, with ``--catalog 10k``, also
Fashion-MNIST's 10,000 test images (Debian ``dataset-fashion-mnist``) as a second merchant, so
the same jewelry queries run against a 10,246-point index. Queries rotate: a phone photo of a
catalog product, text, photo + text. Prints p50/p95/p99 and where the time goes.

    .venv/bin/python -m bench.search --catalog 236
    .venv/bin/python -m bench.search --catalog 10k      # encodes Fashion-MNIST once (cached)
    .venv/bin/python -m bench.search --burst 236        # all at once: batched vs one by one

``--burst N`` sends N photo queries at once to search services side by side: one that takes one
request per poll (each fetched, encoded, searched and committed alone), and ones that take
``--burst-polls`` requests per poll as a batch (one encode call, one index call, one commit);
then the default poll again with kafka-python's pure-Python CRC32C (``--no-crc-compare`` skips
it). The bare encoder is timed before and after; each row gives the service's time per request
by stage.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer

from bench.cli import summary
from bench.harness import create_topic, local_broker, percentiles, pure_python_crc32c
from loupe.client import encode_request, search_request
from loupe.consumers.index.edge import EdgeIndex
from loupe.consumers.index.interface import IndexPoint
from loupe.consumers.index.qdrant import QdrantIndex
from loupe.consumers.kafka.io import make_consumer, make_producer
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.app import SEARCH_POLL_TIMEOUT_MS, fixed_model
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher
from loupe.consumers.workers.search import SearchService
from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.evaluation.simulators import phone_photo

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CACHE = Path.home() / ".cache" / "loupe" / "bench"
TEXT_QUERIES = [
    "rose gold ring with diamonds",
    "gold bangle",
    "pearl earrings",
    "silver pendant necklace",
    "diamond bracelet",
]


def _fashion_points(encoder: FusedEncoder) -> list[IndexPoint]:
    cache = CACHE / f"fashion-mnist-t10k.{encoder.model_version}.npz"
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read()[8:], np.uint8)
    if not cache.exists():
        with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as handle:
            raw = handle.read()
        count, rows, cols = struct.unpack(">III", raw[4:16])
        images = np.frombuffer(raw[16:], np.uint8).reshape(count, rows, cols)
        from PIL import Image

        def png(array: np.ndarray) -> bytes:
            import io

            out = io.BytesIO()
            Image.fromarray(255 - array).save(out, "PNG")  # dark garment on white, like a shop
            return out.getvalue()

        print(f"encoding {count} Fashion-MNIST images once (cached in {cache})...", flush=True)
        started = time.perf_counter()
        image_vectors = np.stack(
            [
                r.vectors["image"]
                for r in encoder.encode_queries([EncodeInput(image=png(a)) for a in images])
            ]
        )
        print(f"  {count / (time.perf_counter() - started):.0f} images/s")
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cache, image=image_vectors)
    image_vectors = np.load(cache)["image"]
    text_vectors = encoder.text_encoder.encode(FASHION_CLASSES).numpy()
    with torch.inference_mode():
        fused = encoder.fusion(
            torch.from_numpy(image_vectors), torch.from_numpy(text_vectors[labels])
        ).numpy()
    return [
        IndexPoint(
            "fashion-mnist",
            f"fm-{i}",
            {"image": image_vectors[i], "text": text_vectors[label], "fused": fused[i]},
            {
                "merchant_id": "fashion-mnist",
                "product_id": f"fm-{i}",
                "title": FASHION_CLASSES[label],
                "attributes": {},
                "category": "apparel",
            },
        )
        for i, label in enumerate(labels)
    ]


def _start_service(run: Settings, index, encoder, group: str):
    """A search service on fresh topics in its own thread: (service, thread, producer,
    requests topic, responses topic)."""
    bootstrap = run.bootstrap_servers
    requests_topic = create_topic(bootstrap, "req")
    responses_topic = create_topic(bootstrap, "resp", 1)
    metrics = LoupeMetrics()
    producer = make_producer(run)
    service = SearchService(
        WorkerBasics(
            publisher=Publisher(producer, create_topic(bootstrap, "dlq", 1), metrics),
            live=fixed_model(encoder, index),
            metrics=metrics,
            poll_timeout_ms=SEARCH_POLL_TIMEOUT_MS,  # as the service's search worker
        ),
        consumer=make_consumer(run, group),
        fetcher=ImageFetcher(FetchPolicy()),
        topic=requests_topic,
        response_topic=responses_topic,
    )
    worker = threading.Thread(target=service.run, daemon=True)
    worker.start()
    return service, worker, producer, requests_topic, responses_topic


BURST_POLLS = (1, 16, 32, 256)


def _burst(
    bootstrap: str, index, encoder, catalog, count: int, polls: list[int], crc_compare: bool
) -> None:
    """The same burst of photo queries through services that take ``polls`` requests per poll
    (1: each fetched, encoded, searched and committed alone), side by side; with
    ``crc_compare``, also the default poll with kafka-python's pure-Python CRC32C (as installed
    without its ``crc32c`` extra), on both ends of the topic."""
    photos = [phone_photo(p.image_path.read_bytes(), seed=i) for i, p in enumerate(catalog)]
    burst = [
        EncodeInput(image=photos[n % len(photos)], media_type="image/jpeg") for n in range(count)
    ]

    def bare_rate() -> float:
        started = time.perf_counter()
        encoder.encode_queries(burst)
        return count / (time.perf_counter() - started)

    bare_before = bare_rate()
    print(f"\nburst of {count} photo queries sent at once (waits: request sent -> answer read)")
    print(f"bare encoder (encode_queries, no Kafka, no index): {bare_before:.1f} queries/s")
    default_poll = Settings.model_fields["search_max_poll_records"].default
    variants = [(("one per poll" if p == 1 else f"batched, poll {p}"), p, False) for p in polls]
    if crc_compare:
        variants.append((f"poll {default_poll}, CRC in Python", default_poll, True))
    rows = []
    for label, poll, python_crc in variants:
        with pure_python_crc32c() if python_crc else contextlib.nullcontext():
            rows.append((label, *_burst_once(bootstrap, index, encoder, photos, count, poll)))
    bare_after = bare_rate()
    bare = (bare_before + bare_after) / 2
    print(f"bare encoder again: {bare_after:.1f} queries/s; 'of bare' is of their mean {bare:.1f}")
    print(
        f"{'service':<28} {'total s':>8} {'req/s':>7} {'of bare':>7} {'p50 s':>7} {'p95 s':>7}"
        "   service ms per request by stage"
    )
    for label, waits, stages in rows:
        total = max(waits) if waits else float("nan")
        rate = len(waits) / total
        print(
            f"{label:<28} {total:>8.1f} {rate:>7.1f} {rate / bare:>7.2f} "
            f"{np.percentile(waits, 50):>7.2f} {np.percentile(waits, 95):>7.2f}   {stages}"
        )


def _burst_once(bootstrap: str, index, encoder, photos, count: int, poll: int):
    """(waits in s, stage summary) of one burst through a fresh service."""
    run = Settings(bootstrap_servers=bootstrap, max_poll_records=poll)
    service, worker, producer, requests_topic, responses_topic = _start_service(
        run, index, encoder, f"bench-burst-{poll}-{time.monotonic_ns()}"
    )
    reader = KafkaConsumer(
        responses_topic, bootstrap_servers=bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )  # fmt: skip
    client = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    key, value = encode_request(search_request(text="ring", request_id="warm"))
    client.send(requests_topic, key=key, value=value)
    client.flush()
    received: dict[str, float] = {}
    while "warm" not in received:  # the group is joined and the model warm
        for records in reader.poll(timeout_ms=100).values():
            for record in records:
                received[record.key.decode()] = time.perf_counter()
    sample = service.metrics.registry.get_sample_value
    stages = ("fetch", "encode", "search", "publish", "commit")
    before = {s: sample("loupe_stage_seconds_sum", {"stage": s}) or 0.0 for s in stages}
    sent_at = time.perf_counter()
    for n in range(count):
        request = search_request(photo=photos[n % len(photos)], top_k=10, request_id=f"b{n}")
        key, value = encode_request(request)
        client.send(requests_topic, key=key, value=value)
    client.flush()
    deadline = time.perf_counter() + 600
    while len(received) < count + 1 and time.perf_counter() < deadline:
        for records in reader.poll(timeout_ms=100).values():
            for record in records:
                received.setdefault(record.key.decode(), time.perf_counter())
    waits = sorted(at - sent_at for rid, at in received.items() if rid != "warm")
    spent = {
        s: (sample("loupe_stage_seconds_sum", {"stage": s}) or 0.0) - before[s] for s in stages
    }
    summary = ", ".join(f"{s} {1000 * spent[s] / max(1, len(waits)):.1f}" for s in stages)
    service.stop_event.set()
    worker.join(30)
    reader.close()
    client.close()
    producer.close()
    return waits, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--catalog", choices=["236", "10k"], default="236")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=0, help="N photo queries at once instead")
    parser.add_argument(
        "--burst-polls",
        default=",".join(map(str, BURST_POLLS)),
        help="requests per poll of the services the burst goes through (1: one at a time)",
    )
    parser.add_argument(
        "--no-crc-compare",
        action="store_true",
        help="skip the burst through kafka-python's pure-Python CRC32C",
    )
    parser.add_argument(
        "--engine",
        choices=["edge", "qdrant-local"],
        default="edge",
        help="the embedded index (LOUPE_INDEX_ENGINE; edge is the service's default)",
    )
    args = parser.parse_args()

    catalog = load_catalog()
    settings = Settings()
    encoder = FusedEncoder.from_profile(settings.model_profile())
    with local_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        index = (
            EdgeIndex(model_version=encoder.model_version, path=f"{tmp}/index")
            if args.engine == "edge"
            else QdrantIndex(model_version=encoder.model_version, path=f"{tmp}/index")
        )
        index.ensure_collection(encoder.dims)
        items = [encode_input(p) for p in catalog]
        points = [
            IndexPoint(
                "giva",
                p.product_id,
                r.vectors,
                {
                    "merchant_id": "giva",
                    "product_id": p.product_id,
                    "title": p.title,
                    "attributes": p.attributes(),
                    "category": p.category,
                },
            )
            for p, r in zip(catalog, encoder.encode_products(items), strict=True)
        ]
        if args.catalog == "10k":
            points += _fashion_points(encoder)
        for start in range(0, len(points), 512):
            index.upsert(points[start : start + 512])
        print(
            f"index ({args.engine}): {index.count()} points; model {encoder.model_version}; "
            f"{encoder.device}"
        )

        if args.burst:
            polls = [int(p) for p in args.burst_polls.split(",")]
            _burst(bootstrap, index, encoder, catalog, args.burst, polls, not args.no_crc_compare)
            index.close()
            encoder.close()
            return
        run = Settings(bootstrap_servers=bootstrap)
        service, worker, producer, requests_topic, responses_topic = _start_service(
            run, index, encoder, "bench-search"
        )
        metrics = service.metrics

        sent: dict[str, float] = {}
        received: dict[str, float] = {}
        reader = KafkaConsumer(
            responses_topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        stop_reading = threading.Event()

        def read() -> None:
            while not stop_reading.is_set():
                for records in reader.poll(timeout_ms=100).values():
                    for record in records:
                        received.setdefault(record.key.decode(), time.perf_counter())

        threading.Thread(target=read, daemon=True).start()
        photos = [
            phone_photo(p.image_path.read_bytes(), seed=i) for i, p in enumerate(catalog[::12])
        ]
        client = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        for warm in range(3):  # joins the group, warms the model
            key, value = encode_request(search_request(text="ring", request_id=f"warm-{warm}"))
            client.send(requests_topic, key=key, value=value)
        client.flush()
        while len(received) < 3:
            time.sleep(0.05)

        total = int(args.rate * args.seconds)
        kinds = {"photo": [], "text": [], "photo+text": []}
        kind_of: dict[str, str] = {}
        started = time.perf_counter()
        for n in range(total):
            due = started + n / args.rate
            time.sleep(max(0.0, due - time.perf_counter()))
            kind = ("photo", "text", "photo+text")[n % 3]
            request = search_request(
                photo=photos[n % len(photos)] if kind != "text" else None,
                text=TEXT_QUERIES[n % len(TEXT_QUERIES)] if kind != "photo" else None,
                top_k=10,
                request_id=f"q{n}",
            )
            key, value = encode_request(request)
            kind_of[request.request_id] = kind
            sent[request.request_id] = time.perf_counter()
            client.send(requests_topic, key=key, value=value)
            client.flush()
        deadline = time.perf_counter() + 60
        while sum(1 for rid in sent if rid in received) < total and time.perf_counter() < deadline:
            time.sleep(0.05)
        stop_reading.set()
        service.stop_event.set()
        worker.join(10)
        for rid, at in sent.items():
            if rid in received:
                kinds[kind_of[rid]].append((received[rid] - at) * 1000)
        all_ms = [v for values in kinds.values() for v in values]
        print(f"\n{total} requests at {args.rate}/s, {len(all_ms)} answered")
        print(f"{'queries':<11} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
        for name, values in [("all", all_ms), *kinds.items()]:
            if values:
                p = percentiles(values)
                cells = " ".join(f"{p[q]:>8.0f}" for q in ("p50", "p95", "p99"))
                print(f"{name:<11} {len(values):>4} {cells}")
        sample = metrics.registry.get_sample_value
        answered = max(1, len(all_ms) + 3)  # + the warm-up requests

        def mean_ms(stage: str) -> float:
            return 1000 * (sample("loupe_stage_seconds_sum", {"stage": stage}) or 0) / answered

        stages = ("parse", "fetch", "encode", "search", "publish", "commit")
        print(
            "service time per request by stage (mean ms): "
            + ", ".join(f"{stage} {mean_ms(stage):.1f}" for stage in stages)
        )
        client.close()
        producer.close()
        index.close()
    encoder.close()


if __name__ == "__main__":
    main()
