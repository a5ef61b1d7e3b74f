"""The ``loupe`` command line: a Click group, and the one place errors become exit codes.

Exit codes: 0 done; 1 the command ran but what it checked or asked for failed (an invalid line,
a search answered with an error, no answer in time); 2 it could not run (bad usage, a bad
setting, no broker, a file it cannot read), with one line on stderr and no traceback; 130
interrupted. A traceback means a bug in Loupe.
"""

from __future__ import annotations

import sys

import click
from kafka.errors import KafkaError

from loupe import __version__
from loupe.cli import (
    client_cmds,
    dev_cmds,
    model_cmds,
    reindex_cmds,
    service_cmds,
    train_cmds,
)
from loupe.cli.common import CONTEXT_SETTINGS, configure_logging, global_options
from loupe.encoders.errors import ModelError
from loupe.schemas.errors import LoupeError


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="loupe")
@global_options
def cli() -> None:
    """Loupe: visual product search over Kafka (fused image + text encoder, Qdrant).

    Settings come from LOUPE_* environment variables, read once at start; each command's
    --help lists the ones it reads. `loupe demo` runs everything on this machine.
    """


for module in (service_cmds, client_cmds, model_cmds, train_cmds, reindex_cmds, dev_cmds):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (the ``loupe`` script exits with it)."""
    configure_logging()
    try:
        result = cli.main(args=argv, prog_name="loupe", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "loupe"
        print(f"{where}: error: {exc.format_message()} (see `{where} --help`)", file=sys.stderr)
        return 2
    except click.ClickException as exc:  # e.g. a file argument that does not exist
        print(f"loupe: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (LoupeError, ModelError) as exc:
        print(f"loupe: error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        refused = _refusal(exc, argv if argv is not None else sys.argv[1:])
        if refused is None:
            raise  # a bug, or a broker failure this command should have handled
        print(f"loupe: error: {refused}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.Abort):
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _refusal(exc: KafkaError, argv: list[str]) -> str | None:
    """One line for an ACL the broker found missing, naming it; None for any other error."""
    from loupe.consumers.kafka.acls import refusal
    from loupe.consumers.settings import load_settings

    command = next((arg for arg in argv if not arg.startswith("-")), "")  # its principal's
    return refusal(exc, load_settings(), command)


if __name__ == "__main__":
    sys.exit(main())
