"""``loupe publish`` and ``loupe search``: Loupe's Kafka API from a terminal."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from loupe.cli.common import KAFKA_SETTINGS, global_options, settings, settings_epilog
from loupe.schemas.errors import ErrorCode, InvalidEvent
from loupe.schemas.products import parse_product_event
from loupe.schemas.search import MAX_TOP_K, parse_search_request, parse_search_response


@dataclass(frozen=True)
class _Line:
    number: int
    raw: bytes
    topic_kind: str  # "products" or "searches"
    key: bytes
    merchant_id: str = ""  # a product event's


def _check_line(number: int, line: str) -> _Line:
    """One JSON-lines event checked against the contract; raises ``InvalidEvent``."""
    raw = line.encode("utf-8")
    try:
        body = json.loads(line)
    except ValueError:
        body = None  # the parser below says what is wrong, as the service would
    if body is not None and not isinstance(body, dict):
        raise InvalidEvent(
            ErrorCode.INVALID_EVENT,
            f"expected a JSON object (an event), got a JSON {type(body).__name__}",
        )
    kind = body.get("type", "") if isinstance(body, dict) else ""
    if isinstance(kind, str) and kind.startswith("search."):
        request = parse_search_request(raw)
        return _Line(number, raw, "searches", request.request_id.encode())
    event = parse_product_event(raw)
    return _Line(number, raw, "products", event.key.encode(), event.merchant_id)


def _read_lines(file: str) -> list[str]:
    if file == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise click.BadParameter(f"{file}: {exc.strerror}", param_hint="FILE") from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{file} is not UTF-8 text ({exc})", param_hint="FILE") from None


@click.command(epilog=settings_epilog(*KAFKA_SETTINGS, "products_topic", "search_requests_topic"))
@click.argument("file", metavar="FILE")
@click.option(
    "--validate",
    is_flag=True,
    help="Only check every line against the contract and report; send nothing.",
)
@global_options
def publish(file: str, validate: bool) -> int:
    """Send product events or search requests from a JSON-lines FILE ('-' for stdin).

    Each line is checked against the event contract first; invalid lines are reported with
    their line number and not sent. Exits 1 if any line was invalid.
    """
    checked: list[_Line] = []
    invalid = 0
    for number, line in enumerate(_read_lines(file), start=1):
        if not line.strip():
            continue
        try:
            checked.append(_check_line(number, line))
        except InvalidEvent as exc:
            click.echo(f"{file}:{number}: {'invalid' if validate else 'not sent'}: {exc}", err=True)
            invalid += 1
    counts = {
        kind: sum(1 for line in checked if line.topic_kind == kind)
        for kind in ("products", "searches")
    }
    if validate:
        click.echo(
            f"{len(checked)} valid ({counts['products']} product events, {counts['searches']} "
            f"search requests), {invalid} invalid; nothing sent"
        )
        return 1 if invalid else 0

    from loupe.consumers.kafka.io import make_producer, require_broker

    config = settings()
    require_broker(config)
    products = config.products_topics()

    def topic(line: _Line) -> str:
        if line.topic_kind == "searches":
            return config.search_requests_topic
        # Per merchant: the merchant's own topic (a producer with that merchant's ACLs).
        return products.merchant_topic(line.merchant_id) if products.per_merchant else products.base

    producer = make_producer(config)
    try:
        for line in checked:
            producer.send(topic(line), key=line.key, value=line.raw)
        producer.flush()
    finally:
        producer.close()
    click.echo(
        f"sent {counts['products']} product events and {counts['searches']} search requests"
        + (f"; {invalid} invalid lines skipped" if invalid else "")
    )
    return 1 if invalid else 0


@click.command(
    epilog=settings_epilog(*KAFKA_SETTINGS, "search_requests_topic", "search_responses_topic")
)
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A photo file; shrunk to 1024 px (upright) before it is sent inline.",
)
@click.option("--image-url", help="A photo by URL (the service fetches it).")
@click.option("--text", help="Words: alone, or with a photo.")
@click.option("--top-k", type=click.IntRange(1, MAX_TOP_K), default=10, help="How many hits.")
@click.option("--merchant", help="Search one merchant's catalog only.")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="category=ring, material=gold, price_max=5000, or any attribute; repeatable.",
)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw response.")
@global_options
def search(
    image: Path | None,
    image_url: str | None,
    text: str | None,
    top_k: int,
    merchant: str | None,
    filters: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> int:
    """Send one search request and print the answer.

    Exits 0 with hits, 1 if the answer is an error or none came in time.
    """
    from pydantic import ValidationError

    from loupe.client import (
        await_answers,
        describe_answer,
        encode_request,
        first_error,
        parse_filters,
        read_photo,
        search_request,
    )

    if image is not None and image_url is not None:
        raise click.UsageError("give --image or --image-url, not both")
    if image is None and image_url is None and not text:
        raise click.UsageError("give a photo (--image or --image-url), --text, or both")
    parsed_filters = parse_filters(list(filters))
    photo = read_photo(image) if image is not None else None
    try:
        request = search_request(
            photo=photo,
            image_url=image_url,
            text=text,
            top_k=top_k,
            merchant_id=merchant,
            filters=parsed_filters,
        )
    except ValidationError as exc:
        raise click.UsageError(first_error(exc)) from None

    from loupe.consumers.kafka.io import make_producer, reader_at_end, require_broker

    config = settings()
    require_broker(config)
    key, value = encode_request(request)
    # Listen from the current end of the response topic before asking.
    consumer = reader_at_end(config, config.search_responses_topic)
    try:
        producer = make_producer(config)
        try:
            producer.send(config.search_requests_topic, key=key, value=value).get(30)
        finally:
            producer.close()
        for _, answer in await_answers(consumer, {request.request_id}, timeout):
            response = parse_search_response(answer)
            if as_json:
                click.echo(answer.decode())
            else:
                for line in describe_answer(response):
                    click.echo(line)
            return 0 if response.status == "ok" else 1
    finally:
        consumer.close()
    click.echo(
        f"loupe search: no answer within {timeout:.0f} s; is `loupe serve` running against "
        f"{config.bootstrap_servers} (LOUPE_BOOTSTRAP_SERVERS)?",
        err=True,
    )
    return 1


COMMANDS = [publish, search]
