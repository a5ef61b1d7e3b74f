"""``loupe demo``: the whole service on the real jewelry catalog, on this machine.

It plays the merchant (publishes the catalog, most photos by URL from a loopback 'CDN', some
inline) and the shoppers (phone-camera photos of products, text, photo + text, filters), then
prints the answers and writes a self-contained HTML report.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from loupe.client import encode_request, search_request
from loupe.consumers.kafka.io import make_producer, reader_at_end
from loupe.consumers.settings import Settings
from loupe.demo.report import DemoQuery, format_filters, render_report, thumbnail
from loupe.dev.catalog import CatalogProduct, load_catalog, upserted_event
from loupe.dev.cdn import StandInCdn
from loupe.dev.kafka import LocalKafkaBroker, free_loopback_port
from loupe.evaluation.scenes import scene_photo
from loupe.evaluation.simulators import phone_photo
from loupe.progress import progress
from loupe.schemas.search import parse_search_response

SEARCH_RATE = 4.0  # requests per second the shoppers send
TEXT_QUERIES = [
    "rose gold ring with diamonds",
    "pearl drop earrings",
    "gold bangle for a wedding",
    "silver pendant necklace",
]


def _step(number: int, total: int, text: str) -> None:
    print(f"\n==> [{number}/{total}] {text}", flush=True)


# The photo queries: how each is simulated, and how the report describes it.
PHOTOS = {
    "photo": (phone_photo, "a shopper's photo of '{title}'"),
    "photo of a scene": (scene_photo, "'{title}' photographed where it lies"),
}


def _queries(catalog: list[CatalogProduct], count: int) -> list[DemoQuery]:
    """A mix of every kind; photos are altered as a phone camera would, never catalog bytes."""
    picks = catalog[7::19]
    queries: list[DemoQuery] = []
    kinds = ["photo", "text", "photo + text", "text + filters", "photo of a scene"]
    for n in range(count):
        kind = kinds[n % len(kinds)]
        product = picks[n % len(picks)]
        if kind in PHOTOS:  # a phone photo of the product, or of it lying on a table, a wrist
            simulate, described = PHOTOS[kind]
            queries.append(
                DemoQuery(
                    kind,
                    described.format(title=product.title),
                    photo=simulate(product.image_path.read_bytes(), seed=n),
                    expected_product_id=product.product_id,
                )
            )
        elif kind == "text":
            queries.append(DemoQuery(kind, "text only", text=TEXT_QUERIES[n % len(TEXT_QUERIES)]))
        elif kind == "photo + text":
            queries.append(
                DemoQuery(
                    kind,
                    f"a photo of '{product.title}' plus words",
                    photo=phone_photo(product.image_path.read_bytes(), seed=100 + n),
                    text=f"{product.material} {product.category}",
                    expected_product_id=product.product_id,
                )
            )
        else:
            category = ("ring", "earring", "necklace", "bracelet")[n % 4]
            prices = [float(p.price_inr) for p in catalog if p.category == category and p.price_inr]
            ceiling = round(float(np.median(prices)), -2)
            queries.append(
                DemoQuery(
                    kind,
                    f"{category}s under {ceiling:.0f} INR (their median price)",
                    text=f"diamond {category}",
                    filters={"category": [category], "price_max": ceiling},
                )
            )
    return queries


def run_demo(
    settings: Settings,
    *,
    products: int | None = None,
    queries: int = 15,
    report: Path | None = None,
    keep_running: bool = False,
    inline_every: int = 5,
    train: bool = True,
) -> int:
    from loupe.consumers.kafka.topics import ensure_topics
    from loupe.consumers.service.lifecycle import LoupeService

    total_steps = 7
    started_at = time.perf_counter()
    demo_dir = settings.state_dir / "demo"
    report = report or demo_dir / "report.html"
    broker = LocalKafkaBroker(state_dir=demo_dir / "kafka", die_with_parent=True)
    service: LoupeService | None = None
    service_thread: threading.Thread | None = None
    cdn: StandInCdn | None = None
    try:
        _step(1, total_steps, "the real jewelry catalog (PyPI giva-databricks)")
        catalog = load_catalog()
        chosen = (
            catalog if products is None else catalog[:: max(1, len(catalog) // products)][:products]
        )
        photos_dir = chosen[0].image_path.parent.parent
        print(f"    {len(chosen)} of {len(catalog)} products, photos in {photos_dir}")

        _step(2, total_steps, "the fusion model, fitted to the catalog (loupe train)")
        checkpoint, quality = _fusion_checkpoint(settings, chosen, train)

        _step(3, total_steps, "a local Apache Kafka broker")
        broker.stop()  # one left over from an interrupted demo
        state = broker.start()
        where = f"{state.bootstrap_servers} (state in {broker.state_dir})"
        print(f"    Kafka {state.kafka_version} on {where}")

        _step(4, total_steps, f"Loupe (ingest + search, embedded index: {settings.index_engine})")
        index_dir = demo_dir / "index"
        shutil.rmtree(index_dir, ignore_errors=True)  # a fresh index: the demo counts from zero
        metrics_port = settings.metrics_port or free_loopback_port()
        run = settings.model_copy(
            update={
                "bootstrap_servers": state.bootstrap_servers,
                "index_path": index_dir,
                "fetch_allow_loopback": True,  # the demo's CDN is on this machine
                "metrics_port": metrics_port,
                "group_id": "loupe-demo",
                "fusion_checkpoint": checkpoint,
            }
        )
        ensure_topics(run)
        service = LoupeService(run, role="all").start()
        service_thread = threading.Thread(target=service.run, name="loupe", daemon=True)
        service_thread.start()
        metrics_url = f"http://127.0.0.1:{service.health.port}/metrics"
        encoder = service.encoder
        print(
            f"    model {encoder.model_version} on {encoder.device} "
            f"({encoder.acceleration.describe()})"
        )
        print(f"    index in {index_dir}; metrics at {metrics_url}")

        _step(5, total_steps, "the merchant publishes the catalog")
        cdn = StandInCdn(photos_dir)
        cdn_url = cdn.url
        producer = make_producer(run)
        inline = 0
        for i, product in enumerate(chosen):
            if i % inline_every == inline_every - 1:
                image = {
                    "data": base64.b64encode(product.image_path.read_bytes()).decode(),
                    "media_type": "image/jpeg",
                }
                inline += 1
            else:
                relative = product.image_path.relative_to(product.image_path.parent.parent)
                image = {"url": f"{cdn_url}/{relative.as_posix()}"}
            event = upserted_event(product, image, event_id=f"demo-{i}")
            producer.send(
                run.products_topic,
                key=f"giva/{product.product_id}".encode(),
                value=json.dumps(event).encode(),
            )
        producer.flush()
        print(
            f"    published {len(chosen)} product events ({len(chosen) - inline} by URL, "
            f"{inline} inline)"
        )
        sample = service.metrics.registry.get_sample_value
        ingest_started = time.perf_counter()
        with progress(total=len(chosen), desc="indexed", unit="product") as bar:
            while True:
                done = int(
                    sum(
                        sample("loupe_events_total", {"topic": run.products_topic, "outcome": o})
                        or 0
                        for o in ("indexed", "dead_lettered", "stale")
                    )
                )
                bar.update(min(done, len(chosen)) - bar.n)
                if done >= len(chosen):
                    break
                if not service_thread.is_alive():
                    raise RuntimeError("the Loupe service stopped during ingest; see the log above")
                time.sleep(0.3)
        ingest_s = time.perf_counter() - ingest_started
        indexed = int(
            sample("loupe_events_total", {"topic": run.products_topic, "outcome": "indexed"}) or 0
        )

        _step(6, total_steps, f"shoppers send {queries} searches")
        asks = _queries(catalog, queries)
        reader = reader_at_end(run, run.search_responses_topic)
        sent_at: dict[str, float] = {}
        by_id = {f"demo-q{n}": ask for n, ask in enumerate(asks)}
        stop_reading, all_answered = threading.Event(), threading.Event()

        def read_answers() -> None:
            # Reads while the shoppers are still asking: latency = answer seen - request sent.
            while not stop_reading.is_set():
                for records in reader.poll(timeout_ms=100).values():
                    for record in records:
                        key = record.key.decode()
                        ask = by_id.get(key)
                        if ask is not None and ask.response is None and key in sent_at:
                            ask.response = parse_search_response(record.value)
                            ask.latency_ms = (time.perf_counter() - sent_at[key]) * 1000
                if all(a.response is not None for a in asks):
                    all_answered.set()
                    return

        reading = threading.Thread(target=read_answers, name="answers", daemon=True)
        reading.start()
        sends_started = time.perf_counter()
        for n, ask in enumerate(asks):
            request = search_request(
                photo=ask.photo,
                text=ask.text,
                top_k=5,
                filters=ask.filters,
                request_id=f"demo-q{n}",
            )
            key, value = encode_request(request)
            # A steady rate, as shoppers arrive, so latency is the service's, not a queue's.
            time.sleep(max(0.0, sends_started + n / SEARCH_RATE - time.perf_counter()))
            sent_at[request.request_id] = time.perf_counter()
            producer.send(run.search_requests_topic, key=key, value=value)
            producer.flush()
        producer.close()
        all_answered.wait(120)
        stop_reading.set()
        reading.join(5)
        reader.close()
        answered = [a for a in asks if a.response is not None]
        print(f"    {len(answered)}/{len(asks)} answered")

        _step(7, total_steps, "results")
        _print_table(asks)
        latencies = [a.latency_ms for a in answered if a.latency_ms is not None]
        p50, p95, p99 = (
            (np.percentile(latencies, q) for q in (50, 95, 99)) if latencies else (0, 0, 0)
        )
        photo_asks = [a for a in asks if a.expected_product_id]
        firsts = sum(1 for a in photo_asks if a.expected_rank() == 1)
        summary = {
            "products indexed": f"{indexed} / {len(chosen)}",
            "ingest": f"{ingest_s:.1f} s ({indexed / max(ingest_s, 1e-6):.1f}/s)",
            "searches answered": f"{len(answered)} / {len(asks)}",
            "photo: own product first": f"{firsts} / {len(photo_asks)}",
            "latency p50 / p95 / p99": f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms",
        }
        details = {
            "model version": service.encoder.model_version,
            "device": f"{encoder.device} ({encoder.acceleration.describe()})",
            "Kafka": f"{state.kafka_version}, single node on this machine",
        }
        thumbs = {p.product_id: thumbnail(p.image_path.read_bytes()) for p in catalog}
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(
            render_report(asks, thumbs, summary, details=details, quality=quality),
            encoding="utf-8",
        )
        print()
        for label, value in {**summary, "model": encoder.model_version}.items():
            print(f"    {label:<34} {value}")
        print(f"\n    report: {report}")
        print(f"    demo took {time.perf_counter() - started_at:.0f} s")

        if keep_running:
            print("\nLoupe keeps running (Ctrl-C to stop). Try:")
            print(
                f"    LOUPE_BOOTSTRAP_SERVERS={state.bootstrap_servers} "
                "loupe search --text 'gold ring' --top-k 5"
            )
            print(f"    curl -s {metrics_url} | grep ^loupe_events_total")
            try:
                while service_thread.is_alive():
                    service_thread.join(1.0)
            except KeyboardInterrupt:
                print()
        return 0 if len(answered) == len(asks) and indexed > 0 else 1
    finally:
        if service is not None:
            service.stop()
        if service_thread is not None:
            service_thread.join(60)
        if cdn is not None:
            cdn.close()
        if broker.stop():
            print("==> stopped Loupe and the local Kafka broker", flush=True)


def _fusion_checkpoint(
    settings: Settings, products: list[CatalogProduct], train: bool
) -> tuple[Path | None, dict | None]:
    """The checkpoint the demo serves, and the before/after metrics for the report."""
    if settings.fusion_checkpoint is not None:
        print(f"    serving LOUPE_FUSION_CHECKPOINT={settings.fusion_checkpoint} as configured")
        return settings.fusion_checkpoint, None
    if not train:
        print("    skipped (--no-train): the untrained fusion (identity heads) serves")
        return None, None
    from loupe.demo.fit import demo_checkpoint
    from loupe.train.evaluate import scores_from_record, scores_table

    started = time.perf_counter()
    path, record, cached = demo_checkpoint(settings, products)
    took = "found in the cache" if cached else f"trained in {time.perf_counter() - started:.0f} s"
    print(f"    {took}: {path}")
    before, after = scores_from_record(record["before"]), scores_from_record(record["after"])
    print("    " + scores_table({"untrained": before, "trained": after}).replace("\n", "\n    "))
    return path, {"untrained": record["before"], "trained": record["after"]}


def _print_table(asks: list[DemoQuery]) -> None:
    for n, ask in enumerate(asks, start=1):
        what = ask.text or ""
        if ask.filters:
            what += f" [{format_filters(ask.filters)}]"
        print(f"\n    {n:>2}. {ask.kind}: {ask.description}" + (f" — {what}" if what else ""))
        response = ask.response
        if response is None:
            print("        (no answer)")
            continue
        if response.status == "error":
            print(f"        error {response.error.code}: {response.error.message}")
            continue
        for rank, hit in enumerate(response.hits[:3], start=1):
            mark = (
                "  <- the photographed product" if hit.product_id == ask.expected_product_id else ""
            )
            print(f"        #{rank} {hit.score:.3f}  {hit.title[:60]}{mark}")
        if not response.hits:
            print("        (no products match)")
    sys.stdout.flush()
