"""A reindex of the demo catalog under live traffic, run the way a user runs it.

A real broker, the 236 jewelry products published with photo URLs on a loopback 'CDN', and
``loupe serve`` indexing them under the untrained model (A). Then, while a shopper app sends
photo searches at a steady rate and a merchant keeps adding products, ``loupe reindex`` builds
the collection of model B (a fusion checkpoint: ``--checkpoint``, e.g. from ``loupe train``, or
a seeded one made here) and switches to it; the service follows. Reports the reindex's time and
the searches before, during and after it: answered, their status and model, latency.

    .venv/bin/python -m bench.reindex [--checkpoint fusion.safetensors] [--searches-per-s 2]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from kafka import KafkaProducer

from bench.chaos import group_lag
from bench.cli import summary
from bench.harness import (
    SearchLoad,
    local_broker,
    loupe_process,
    photo_server,
    product_event,
    serve_env,
)
from loupe.consumers.index.interface import point_id
from loupe.consumers.kafka.admin import COMPACTED, KafkaAdmin, TopicSpec
from loupe.consumers.service.app import build_catalog
from loupe.consumers.settings import Settings
from loupe.dev.catalog import load_catalog
from loupe.encoders.fused import FusedEncoder
from loupe.encoders.fusion import FusionModel, save_fusion
from loupe.encoders.profile import ModelProfile
from loupe.evaluation.simulators import phone_photo

MERCHANT = "giva"


def seeded_checkpoint(path: Path, seed: int = 11) -> Path:
    """Model B for a run without a trained checkpoint: model A's towers, other fusion heads."""
    encoder = FusedEncoder.from_profile(ModelProfile())
    module = FusionModel(encoder.fusion.config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (module.image_head, module.text_head):
            head.up.weight.copy_(torch.randn(head.up.weight.shape, generator=generator) * 0.05)
    save_fusion(module, path, base=encoder.base_version)
    encoder.close()
    return path


def _topics(bootstrap: str) -> dict[str, str]:
    suffix = str(int(time.time()))
    names = {k: f"bench.{k}.{suffix}" for k in ("products", "requests", "responses", "deadletter")}
    with KafkaAdmin({"bootstrap_servers": bootstrap}) as admin:
        admin.create_missing(
            [
                TopicSpec(name, 3, 1, COMPACTED) if kind == "products" else TopicSpec(name, 1)
                for kind, name in names.items()
            ]
        )
    return names


def _wait(condition, what: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise SystemExit(
                f"loupe serve exited while waiting for {what}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--checkpoint", type=Path, help="model B's fusion checkpoint")
    parser.add_argument("--searches-per-s", type=float, default=2.0)
    parser.add_argument("--products-per-s", type=float, default=1.0)
    parser.add_argument("--window-s", type=float, default=20.0, help="measured before and after")
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args()

    catalog = load_catalog()
    photos = {p.image_path.name: p.image_path.read_bytes() for p in catalog}
    shopper_photos = [
        phone_photo(photos[p.image_path.name], seed=n) for n, p in enumerate(catalog[:24])
    ]
    with (
        tempfile.TemporaryDirectory(prefix="loupe-bench-reindex-") as work,
        local_broker() as bootstrap,
        photo_server(photos) as cdn,
    ):
        work_dir = Path(work)
        checkpoint = args.checkpoint or seeded_checkpoint(work_dir / "fusion-b.safetensors")
        topics = _topics(bootstrap)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for product in catalog:
            image = {"url": f"{cdn}/{product.image_path.name}"}
            producer.send(
                topics["products"],
                key=f"{MERCHANT}/{product.product_id}".encode(),
                value=product_event(product, image),
            )
        producer.flush()
        env = serve_env(
            bootstrap,
            topics,
            group="bench-reindex",
            state_dir=work_dir / "state",
            fetch_allow_loopback="true",
        )
        serve_log = work_dir / "serve.log"
        service = loupe_process(["serve"], env, serve_log)
        try:
            print(f"==> loupe serve indexes {len(catalog)} products under model A", flush=True)
            started = time.monotonic()
            _wait(
                lambda: group_lag(bootstrap, "bench-reindex.ingest", topics["products"]) == 0,
                "the first ingest",
                900,
                service,
                serve_log,
            )
            print(f"    done in {time.monotonic() - started:.1f} s", flush=True)
            report = _under_load(
                args,
                bootstrap,
                topics,
                env,
                checkpoint,
                catalog,
                shopper_photos,
                cdn,
                producer,
                work_dir,
            )
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=120)
            producer.close()
        settings = Settings(state_dir=work_dir / "state")
        index_catalog = build_catalog(settings)
        index = index_catalog.open(report["model_b"])
        index.ensure_collection({"image": 1280, "text": 384, "fused": 1664})
        ids = [point_id(MERCHANT, p.product_id) for p in catalog] + [
            point_id(MERCHANT, pid) for pid in report.pop("products_sent_ids")
        ]
        report["new_collection_has_every_product"] = len(index.stored_versions(ids)) == len(ids)
        report["new_collection_points"] = index.count()
        index.close()
        index_catalog.close()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def _under_load(
    args, bootstrap, topics, env, checkpoint, catalog, shopper_photos, cdn, producer, work_dir
) -> dict:
    import base64

    def photo_search(n: int) -> dict:
        data = base64.b64encode(shopper_photos[n % len(shopper_photos)]).decode()
        return {"image": {"data": data, "media_type": "image/jpeg"}, "top_k": 10}

    sent_products: list[str] = []
    stop_products = threading.Event()

    def merchant() -> None:
        n = 0
        while not stop_products.wait(1.0 / args.products_per_s):
            product = catalog[n % len(catalog)]
            pid = f"new-{n}"
            image = {"url": f"{cdn}/{product.image_path.name}"}
            producer.send(
                topics["products"],
                key=f"{MERCHANT}/{pid}".encode(),
                value=product_event(product, image, product_id=pid),
            )
            producer.flush()
            sent_products.append(pid)
            n += 1

    load = SearchLoad(
        bootstrap,
        topics["requests"],
        topics["responses"],
        photo_search,
        every_s=1.0 / args.searches_per_s,
    )
    with load:
        print(
            f"==> {args.searches_per_s:g} photo searches/s; baseline {args.window_s:g} s",
            flush=True,
        )
        before = time.monotonic()
        time.sleep(args.window_s)
        merchant_thread = threading.Thread(target=merchant, daemon=True)
        merchant_thread.start()
        print(
            f"==> loupe reindex to model B ({checkpoint.name}), "
            f"{args.products_per_s:g} new products/s meanwhile",
            flush=True,
        )
        reindex_log = work_dir / "reindex.log"
        t0 = time.monotonic()
        job = subprocess.run(
            [sys.executable, "-m", "loupe", "reindex", "--grace-s", "60", "--metrics-port", "0"],
            env={**env, "LOUPE_FUSION_CHECKPOINT": str(checkpoint)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        t1 = time.monotonic()
        reindex_log.write_text(job.stdout)
        lines = [line for line in job.stdout.splitlines() if not line.startswith("Loading weights")]
        for line in lines:
            if line.startswith(("reindex ", "switched", "building", "loupe reindex")):
                print("    " + line, flush=True)
        if job.returncode != 0:
            raise SystemExit(f"loupe reindex failed ({job.returncode}):\n" + "\n".join(lines[-30:]))
        model_b = re.search(r"switched: \S+ -> \S+?__(\S+) ", job.stdout).group(1)
        followed = None
        deadline = time.monotonic() + 300
        while followed is None and time.monotonic() < deadline:
            for answer in load.answered_since(t1):
                if answer["model_version"] == model_b:
                    followed = time.monotonic()
                    break
            time.sleep(0.2)
        time.sleep(args.window_s)
        stop_products.set()
        merchant_thread.join()
        end = time.monotonic()
        load.stop_sending()
        all_answered = load.wait_for_answers(180)
    return {
        "model_b": model_b,
        "reindex_s": round(t1 - t0, 1),
        "service_followed_after_switch_s": round(followed - t1, 1) if followed else None,
        "products_sent_during_and_after": len(sent_products),
        "products_sent_ids": list(sent_products),
        "every_search_answered": all_answered,
        "searches_before": load.window(before, t0),
        "searches_during": load.window(t0, t1),
        "searches_after": load.window(t1, end),
    }


if __name__ == "__main__":
    main()
