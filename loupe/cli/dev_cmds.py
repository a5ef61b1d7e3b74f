"""``loupe kafka``, ``loupe schemas`` and ``loupe demo``: Loupe on a laptop, no infrastructure."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from loupe.cli.common import global_options, settings, settings_epilog

_STATE_DIR_HELP = (
    "Where the broker keeps its config, data, log and pid [default: $LOUPE_STATE_DIR/kafka, "
    "i.e. ~/.local/state/loupe/kafka]."
)


@click.group()
@global_options
def kafka() -> None:
    """A local single-node Apache Kafka broker (KRaft) on 127.0.0.1, for development.

    Its jars come from Maven Central once (needs Java 17+ and Maven) into ~/.cache/loupe/kafka.
    """


def _broker(state_dir: Path | None):
    from loupe.dev.kafka import LocalKafkaBroker

    return LocalKafkaBroker(state_dir=state_dir or settings().state_dir / "kafka")


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=False,
    help=_STATE_DIR_HELP,
)


@kafka.command("start", epilog=settings_epilog("state_dir"))
@state_dir_option
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    show_default=False,
    help="Broker port on 127.0.0.1 [default: a free one].",
)
@global_options
def kafka_start(state_dir: Path | None, port: int | None) -> int:
    """Start a broker in the background and print how to use it. The data directory is
    recreated on each start."""
    broker = _broker(state_dir)
    state = broker.start(port=port)
    click.echo(f"Kafka {state.kafka_version} running (pid {state.pid})")
    click.echo(f"  bootstrap servers: {state.bootstrap_servers}")
    click.echo(f"  state directory:   {state.state_dir}")
    click.echo(f"  broker log:        {broker.log_file}")
    click.echo(f"  use it:            export LOUPE_BOOTSTRAP_SERVERS={state.bootstrap_servers}")
    return 0


@kafka.command("stop", epilog=settings_epilog("state_dir"))
@state_dir_option
@global_options
def kafka_stop(state_dir: Path | None) -> int:
    """Stop the broker (SIGTERM; killed only if it does not exit in 30 s)."""
    broker = _broker(state_dir)
    stopped = broker.stop()
    click.echo("Kafka stopped" if stopped else f"no Kafka broker running from {broker.state_dir}")
    return 0


@kafka.command("status", epilog=settings_epilog("state_dir"))
@state_dir_option
@global_options
def kafka_status(state_dir: Path | None) -> int:
    """Say whether the broker runs and answers. Exits 0 if it does, 1 if it runs but does not
    answer, 3 if it is not running."""
    from loupe.consumers.kafka.io import answers_metadata

    broker = _broker(state_dir)
    state = broker.running_state()
    if state is None:
        click.echo(f"Kafka: not running (state directory {broker.state_dir})")
        return 3
    healthy = answers_metadata({"bootstrap_servers": [state.bootstrap_servers]})
    click.echo(f"Kafka {state.kafka_version}: {'running' if healthy else 'NOT ANSWERING'}")
    click.echo(f"  pid {state.pid}, bootstrap servers {state.bootstrap_servers}")
    click.echo(f"  state directory {state.state_dir}")
    return 0 if healthy else 1


@click.group()
@global_options
def schemas() -> None:
    """The event contracts' JSON Schemas (schemas/json in the repository)."""


@schemas.command("export")
@click.option("--check", is_flag=True, help="Only check that the files match the models.")
@global_options
def schemas_export(check: bool) -> int:
    """Write the JSON Schemas generated from the contract's models."""
    from loupe.schemas import export

    if check:
        stale = export.drifted()
        if stale:
            click.echo(f"out of date: {', '.join(stale)}; run `loupe schemas export`", err=True)
            return 1
        click.echo(f"JSON Schemas in {export.JSON_DIR} match the models")
        return 0
    for path in export.export():
        click.echo(f"wrote {path}")
    return 0


@click.command(
    epilog=settings_epilog("state_dir", "metrics_port", "fusion_checkpoint", "device", "precision")
)
@click.option(
    "--products",
    type=click.IntRange(1),
    default=None,
    show_default=False,
    help="Index only N products [default: all 236].",
)
@click.option("--queries", type=click.IntRange(1, 1000), default=15, help="Searches to send.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default=False,
    help="HTML report path [default: $LOUPE_STATE_DIR/demo/report.html].",
)
@click.option("--keep-running", is_flag=True, help="Leave Kafka and Loupe up until Ctrl-C.")
@click.option(
    "--train/--no-train",
    default=True,
    help="Fit the fusion model to the catalog first (cached after the first run); "
    "--no-train serves the untrained fusion.",
)
@global_options
def demo(
    products: int | None, queries: int, report: Path | None, keep_running: bool, train: bool
) -> int:
    """The end-to-end demo on the real jewelry catalog.

    Fits the fusion model to the catalog (as `loupe train` does; cached after the first run),
    starts Kafka and Loupe on this machine, publishes the catalog, sends searches of every
    kind, prints the answers and writes a self-contained HTML report with the model's
    before/after numbers.
    """
    from loupe.demo.run import run_demo

    # SIGTERM unwinds like Ctrl-C, so the broker and the service are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_demo(
        settings(),
        products=products,
        queries=queries,
        report=report,
        keep_running=keep_running,
        train=train,
    )


COMMANDS = [kafka, schemas, demo]
