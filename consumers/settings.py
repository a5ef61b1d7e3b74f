"""Loupe's one settings object, read from ``LOUPE_*`` environment variables once at start-up.

Nothing else in the code base reads the environment: the entry point builds a ``Settings`` and
passes what each part needs through constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "loupe"


class Settings(BaseSettings):
    """Service configuration. Names carry units (``_ms``, ``_bytes``) as kafka-python's do."""

    model_config = SettingsConfigDict(env_prefix="LOUPE_", frozen=True, extra="ignore")

    # Where local state lives: the dev Kafka broker, the embedded index, demo reports.
    state_dir: Path = Field(default_factory=_default_state_dir)

    # Kafka connection. Security settings pass straight through to kafka-python.
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # Topics (the v1 contract in schemas/).
    products_topic: str = "loupe.products.v1"
    search_requests_topic: str = "loupe.search.requests.v1"
    search_responses_topic: str = "loupe.search.responses.v1"
    deadletter_topic: str = "loupe.deadletter.v1"
    group_id: str = "loupe"

    def kafka_client_config(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                config["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                config[name] = str(value)
        return config

    def describe(self) -> dict[str, Any]:
        """The effective settings for the start-up log; SecretStr fields print masked."""
        return {name: str(value) for name, value in self.model_dump().items()}
