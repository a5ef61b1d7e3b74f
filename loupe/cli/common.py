"""What every ``loupe`` command shares: options that work anywhere, settings help, logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from loupe.consumers.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}


# Libraries whose INFO lines are about their own plumbing, not about Loupe's work.
LIBRARY_LOGGERS = ("kafka", "httpx", "httpcore", "urllib3", "qdrant_client")


class RedactSecrets(logging.Filter):
    """Writes each secret it was told of as ``***`` in every log line. Loupe never logs one, but
    libraries log their configuration at debug (``-v``): kafka-python's admin client logs its
    options, the SASL password among them."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, None
        return True


REDACT_SECRETS = RedactSecrets()


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(REDACT_SECRETS)
    # kafka-python narrates every connection at INFO, httpx every request to a Qdrant server
    # (an alias poll every 2 s): keep their warnings only, unless -v.
    for library in LIBRARY_LOGGERS:
        logging.getLogger(library).setLevel(logging.WARNING)
    # transformers draws a progress bar for every weight load; the CLI says what it loads.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.DEBUG)
        for library in LIBRARY_LOGGERS:
            logging.getLogger(library).setLevel(logging.NOTSET)  # the root's level: debug


def global_options(command: F) -> F:
    """Options accepted both before and after the command name (``loupe -v serve`` and
    ``loupe serve -v``)."""
    return click.option(
        "-v",
        "--verbose",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbose,
        help="Debug logging.",
    )(command)


def settings_epilog(*names: str) -> str:
    """An epilog listing the ``LOUPE_*`` settings a command reads, with their defaults."""
    fields = Settings.model_fields
    lines = ["\b", "Settings (environment variables):"]
    for name in names:
        field = fields[name]
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else str(default)
        if "password" in name or "api_key" in name:
            shown = "unset"
        lines.append(f"  LOUPE_{name.upper():<28} default: {shown}")
    return "\n".join(lines)


KAFKA_SETTINGS = ("bootstrap_servers", "security_protocol", "sasl_mechanism")


def settings() -> Settings:
    """The settings, read from the environment once per command (``ConfigError`` if bad)."""
    ctx = click.get_current_context()
    found = ctx.find_object(Settings)
    if found is None:
        found = load_settings()
        REDACT_SECRETS.secrets.update(found.secrets())
        ctx.obj = found
    return found
