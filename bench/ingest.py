"""Ingest throughput end to end through Kafka, against the encoder alone and a naive loop.

All three process the same products (the jewelry catalog, photos by URL from a loopback
server) in one run:
- encoder: ``encode_products`` on photo bytes already in memory (the ceiling);
- service: events produced to Kafka, consumed by ``IngestWorker`` (fetch, encode, upsert, commit),
  timed from the first produce to the last commit;
- naive: one event at a time (poll 1, fetch, encode 1, upsert 1, commit).

    .venv/bin/python -m bench.ingest [--products 236]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from kafka import KafkaProducer

from bench.cli import summary
from bench.harness import create_topic, local_broker, photo_server, product_event
from loupe.consumers.index.interface import IndexPoint
from loupe.consumers.index.qdrant import QdrantIndex
from loupe.consumers.kafka.io import make_consumer, make_producer
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.kafka.publisher import Publisher
from loupe.consumers.metrics import LoupeMetrics
from loupe.consumers.service.app import fixed_model
from loupe.consumers.settings import Settings
from loupe.consumers.workers.batch import WorkerBasics
from loupe.consumers.workers.image_fetch import FetchPolicy, ImageFetcher
from loupe.consumers.workers.ingest import IngestWorker
from loupe.consumers.workers.product_stage import ProductStage
from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.fused import EncodeInput, FusedEncoder
from loupe.encoders.preprocess import compose_product_text
from loupe.schemas.products import parse_product_event


def _produce(bootstrap: str, topic: str, events: list[tuple[str, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for key, value in events:
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--products", type=int, default=236)
    parser.add_argument("--max-poll-records", type=int, default=Settings().max_poll_records)
    args = parser.parse_args()

    catalog = load_catalog()
    products = [catalog[i % len(catalog)] for i in range(args.products)]
    settings = Settings()
    encoder = FusedEncoder.from_profile(settings.model_profile())
    photos = {p.image_path.name: p.image_path.read_bytes() for p in catalog}
    fetcher = ImageFetcher(FetchPolicy(allow_loopback=True))
    print(
        f"{len(products)} products, model {encoder.model_version}, device {encoder.device}, "
        f"micro-batch {encoder.batch_size}"
    )

    # 1. The encoder alone, on bytes in memory.
    inputs = [encode_input(p) for p in products]
    encoder.encode_products(inputs[:8])  # warm-up
    started = time.perf_counter()
    encoder.encode_products(inputs)
    encoder_rate = len(products) / (time.perf_counter() - started)

    with (
        local_broker() as bootstrap,
        photo_server(photos) as cdn,
        tempfile.TemporaryDirectory() as tmp,
    ):
        run_settings = Settings(bootstrap_servers=bootstrap, max_poll_records=args.max_poll_records)
        events = [
            (f"giva/p{i}", product_event(p, {"url": f"{cdn}/{p.image_path.name}"}, f"p{i}"))
            for i, p in enumerate(products)
        ]

        # 2. The service.
        topic, dlq = create_topic(bootstrap, "products"), create_topic(bootstrap, "dlq", 1)
        metrics = LoupeMetrics()
        index = QdrantIndex(model_version=encoder.model_version, path=f"{tmp}/service")
        index.ensure_collection(encoder.dims)
        producer = make_producer(run_settings)
        publisher = Publisher(producer, dlq, metrics)
        products = ProductsTopics(topic)
        indexer = IngestWorker(
            WorkerBasics(publisher=publisher, live=fixed_model(encoder, index), metrics=metrics),
            consumer=make_consumer(run_settings, "bench-service"),
            stage=ProductStage(
                fetcher=fetcher, publisher=publisher, metrics=metrics, source=products
            ),
            topic=products,
        )
        indexer.process_once()  # join the group before the clock starts
        started = time.perf_counter()
        _produce(bootstrap, topic, events)
        done = 0
        while done < len(events):
            done += indexer.process_once()
        service_rate = len(events) / (time.perf_counter() - started)
        assert index.count() == len(events)
        stages = {
            stage: metrics.registry.get_sample_value("loupe_stage_seconds_sum", {"stage": stage})
            for stage in ("parse", "fetch", "encode", "index_write", "publish", "commit")
        }
        indexer.close()
        index.close()

        # 3. The naive loop.
        topic = create_topic(bootstrap, "naive")
        _produce(bootstrap, topic, events)
        index = QdrantIndex(model_version=encoder.model_version, path=f"{tmp}/naive")
        index.ensure_collection(encoder.dims)
        consumer = make_consumer(run_settings, "bench-naive", max_poll_records=1)
        consumer.subscribe([topic])
        started = time.perf_counter()
        done = 0
        while done < len(events):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    event = parse_product_event(record.value)
                    image, media_type = fetcher.fetch(event.image.url)
                    text = compose_product_text(event.title, event.attributes, event.description)
                    result = encoder.encode_products([EncodeInput(image, media_type, text)])[0]
                    index.upsert(
                        [
                            IndexPoint(
                                event.merchant_id,
                                event.product_id,
                                result.vectors,
                                {"title": event.title},
                                event.version,
                            )
                        ]
                    )
                    consumer.commit()
                    done += 1
        naive_rate = len(events) / (time.perf_counter() - started)
        consumer.close()
        index.close()
        producer.close()

    print(f"\n{'path':<10} {'products/s':>11} {'vs encoder':>11}")
    for name, rate in (("encoder", encoder_rate), ("service", service_rate), ("naive", naive_rate)):
        print(f"{name:<10} {rate:>11.1f} {rate / encoder_rate:>11.2f}")
    print(f"service / naive: {service_rate / naive_rate:.2f}x")
    total = sum(v or 0 for v in stages.values())
    print(
        "service time by stage: "
        + ", ".join(f"{k} {100 * (v or 0) / total:.0f}%" for k, v in stages.items())
    )
    encoder.close()


if __name__ == "__main__":
    main()
