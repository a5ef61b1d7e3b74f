"""``loupe serve``, ``loupe publish`` and ``loupe search``."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from consumers.settings import Settings
from schemas.common import MAX_INLINE_IMAGE_BYTES
from schemas.errors import InvalidEvent
from schemas.products import parse_product_event
from schemas.search import parse_search_request, parse_search_response


def add_parsers(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the ingest and/or search consumers",
        description="Run Loupe with settings from LOUPE_* environment variables; prints them "
        "(secrets masked) at start. SIGTERM finishes the batch in flight, commits and exits.",
    )
    serve.add_argument("--role", choices=["ingest", "search", "all"], default="all")
    serve.add_argument(
        "--create-topics",
        action="store_true",
        help="create Loupe's topics if missing (development)",
    )
    serve.set_defaults(handler=_serve)

    publish = commands.add_parser(
        "publish",
        help="send product events or search requests from a JSON-lines file",
    )
    publish.add_argument("file", type=Path, help="one event per line; '-' for standard input")
    publish.set_defaults(handler=_publish)

    search = commands.add_parser("search", help="send one search request and print the answer")
    search.add_argument("--image", type=Path, help="a photo (sent inline, at most 512 KiB)")
    search.add_argument("--image-url", help="a photo by URL")
    search.add_argument("--text")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--merchant")
    search.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="category=ring, material=gold, price_max=5000, ... (repeatable)",
    )
    search.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    search.add_argument("--json", action="store_true", help="print the raw response")
    search.set_defaults(handler=_search)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.service import LoupeService, ensure_topics

    print("effective settings:")
    for name, value in sorted(settings.describe().items()):
        print(f"  LOUPE_{name.upper()}={value}")
    if args.create_topics:
        ensure_topics(settings)
    service = LoupeService(settings, role=args.role)
    service.install_signal_handlers()
    service.run()
    return 0


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.kafka_io import make_producer

    lines = (sys.stdin if str(args.file) == "-" else args.file.open(encoding="utf-8")).read()
    producer = make_producer(settings)
    sent = {"products": 0, "searches": 0}
    errors = 0
    for number, line in enumerate(lines.splitlines(), start=1):
        if not line.strip():
            continue
        raw = line.encode("utf-8")
        try:
            if json.loads(line).get("type", "").startswith("search."):
                event = parse_search_request(raw)
                producer.send(
                    settings.search_requests_topic, key=event.request_id.encode(), value=raw
                )
                sent["searches"] += 1
            else:
                event = parse_product_event(raw)
                producer.send(settings.products_topic, key=event.key.encode(), value=raw)
                sent["products"] += 1
        except (InvalidEvent, ValueError, AttributeError) as exc:
            print(f"{args.file}:{number}: not sent: {exc}", file=sys.stderr)
            errors += 1
    producer.flush()
    producer.close()
    print(
        f"sent {sent['products']} product events and {sent['searches']} search requests"
        + (f"; {errors} invalid lines skipped" if errors else "")
    )
    return 1 if errors else 0


def _filters(pairs: list[str]) -> tuple[dict, str | None]:
    filters: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"loupe search: --filter wants KEY=VALUE, got {pair!r}")
        if key in ("category", "subcategory", "material"):
            filters.setdefault(key, []).append(value)
        elif key in ("price_min", "price_max"):
            filters[key] = float(value)
        elif key == "currency":
            filters[key] = value
        else:
            filters.setdefault("attributes", {})[key] = value
    return filters, None


def _search(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.kafka_io import make_producer, reader_at_end

    body: dict = {
        "type": "search.requested",
        "request_id": f"cli-{uuid.uuid4().hex[:12]}",
        "occurred_at": datetime.now(UTC).isoformat(),
        "top_k": args.top_k,
    }
    if args.image:
        data = args.image.read_bytes()
        if len(data) > MAX_INLINE_IMAGE_BYTES:
            print(
                f"loupe search: {args.image} is over {MAX_INLINE_IMAGE_BYTES} bytes; "
                "serve it and use --image-url",
                file=sys.stderr,
            )
            return 2
        media = {".png": "image/png", ".webp": "image/webp"}.get(
            args.image.suffix.lower(), "image/jpeg"
        )
        body["image"] = {"data": base64.b64encode(data).decode(), "media_type": media}
    elif args.image_url:
        body["image"] = {"url": args.image_url}
    if args.text:
        body["text"] = args.text
    if args.merchant:
        body["merchant_id"] = args.merchant
    body["filters"], _ = _filters(args.filter)
    raw = json.dumps(body).encode()
    request = parse_search_request(raw)  # fail here, with the field named, not in the service

    # Listen from the current end of the response topic before asking.
    consumer = reader_at_end(settings, settings.search_responses_topic)
    producer = make_producer(settings)
    producer.send(settings.search_requests_topic, key=request.request_id.encode(), value=raw).get(
        30
    )
    producer.close()
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if record.key == request.request_id.encode():
                        return _print_response(record.value, args.json)
    finally:
        consumer.close()
    print(
        f"loupe search: no answer within {args.timeout:.0f} s (is `loupe serve` running "
        f"against {settings.bootstrap_servers}?)",
        file=sys.stderr,
    )
    return 1


def _print_response(value: bytes, as_json: bool) -> int:
    response = parse_search_response(value)
    if as_json:
        print(value.decode())
        return 0 if response.status == "ok" else 1
    if response.status == "error":
        print(f"error {response.error.code}: {response.error.message}")
        return 1
    print(
        f"{len(response.hits)} hits in {response.took_ms:.0f} ms (model {response.model_version})"
    )
    print(f"{'#':>2} {'score':>6} {'image':>6} {'text':>6} {'fused':>6}  {'price':>12}  title")
    for rank, hit in enumerate(response.hits, start=1):
        s = hit.scores
        cells = [f"{v:6.3f}" if v is not None else "     -" for v in (s.image, s.text, s.fused)]
        price = f"{hit.price.amount} {hit.price.currency}" if hit.price else ""
        print(f"{rank:>2} {hit.score:6.3f} {' '.join(cells)}  {price:>12}  {hit.title}")
    return 0
