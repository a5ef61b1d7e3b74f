"""The ``loupe`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from consumers import embed_cli, serve_cli
from consumers.errors import LoupeError
from consumers.settings import Settings, load_settings

log = logging.getLogger("loupe")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # kafka-python narrates every connection at INFO; keep its warnings only.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # transformers draws a progress bar for every weight load; the CLI says what it loads.
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.kafka_broker import LocalKafkaBroker, answers_metadata

    state_dir = args.state_dir or settings.state_dir / "kafka"
    broker = LocalKafkaBroker(state_dir=state_dir)
    if args.kafka_command == "start":
        state = broker.start(port=args.port)
        print(f"Kafka {state.kafka_version} running (pid {state.pid})")
        print(f"  bootstrap servers: {state.bootstrap_servers}")
        print(f"  state directory:   {state.state_dir}")
        print(f"  broker log:        {broker.log_file}")
        print(f"  use it:            export LOUPE_BOOTSTRAP_SERVERS={state.bootstrap_servers}")
        return 0
    if args.kafka_command == "stop":
        stopped = broker.stop()
        print("Kafka stopped" if stopped else f"no Kafka broker running from {state_dir}")
        return 0
    state = broker.running_state()
    if state is None:
        print(f"Kafka: not running (state directory {state_dir})")
        return 3
    healthy = answers_metadata(state.bootstrap_servers)
    print(f"Kafka {state.kafka_version}: {'running' if healthy else 'NOT ANSWERING'}")
    print(f"  pid {state.pid}, bootstrap servers {state.bootstrap_servers}")
    print(f"  state directory {state.state_dir}")
    return 0 if healthy else 1


def _cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    from schemas import export

    if args.check:
        stale = export.drifted()
        if stale:
            print(f"out of date: {', '.join(stale)}; run `loupe schemas export`", file=sys.stderr)
            return 1
        print(f"JSON Schemas in {export.JSON_DIR} match the models")
        return 0
    for path in export.export():
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from consumers.demo import run_demo

    # SIGTERM unwinds like Ctrl-C, so the broker and the service are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_demo(
        settings,
        products=args.products,
        queries=args.queries,
        report=args.report,
        keep_running=args.keep_running,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupe",
        description="Loupe: event-driven visual product search (Kafka, fused encoder, Qdrant).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kafka = commands.add_parser("kafka", help="run a local single-node Kafka broker (KRaft)")
    kafka.add_argument("kafka_command", choices=["start", "stop", "status"])
    kafka.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the broker keeps its config, data, log and pid "
        "(default: $LOUPE_STATE_DIR/kafka, i.e. ~/.local/state/loupe/kafka)",
    )
    kafka.add_argument(
        "--port", type=int, default=None, help="broker port on 127.0.0.1 (default: a free one)"
    )
    kafka.set_defaults(handler=_cmd_kafka)

    schemas = commands.add_parser("schemas", help="the event contracts' JSON Schemas")
    schemas.add_argument("schemas_command", choices=["export"])
    schemas.add_argument(
        "--check", action="store_true", help="only check that the committed files are current"
    )
    schemas.set_defaults(handler=_cmd_schemas)

    embed_cli.add_parser(commands)
    serve_cli.add_parsers(commands)

    demo = commands.add_parser(
        "demo",
        help="the end-to-end demo on the real jewelry catalog",
        description="Starts Kafka and Loupe on this machine, publishes the jewelry catalog, sends "
        "searches of every kind, prints the answers and writes an HTML report.",
    )
    demo.add_argument("--products", type=int, default=None, help="index only N products")
    demo.add_argument("--queries", type=int, default=15, help="how many searches to send")
    demo.add_argument(
        "--report",
        type=Path,
        default=None,
        help="HTML report path (default: $LOUPE_STATE_DIR/demo/report.html)",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave Kafka and Loupe running after the report, until Ctrl-C",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        settings = load_settings()
        return int(args.handler(args, settings))
    except LoupeError as exc:
        print(f"loupe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
