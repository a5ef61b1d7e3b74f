"""Loupe's one settings object, read from ``LOUPE_*`` environment variables once at start-up.

Nothing else in the code base reads the environment: the entry point builds a ``Settings`` and
passes what each part needs through constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumers.errors import ConfigError

if TYPE_CHECKING:
    from encoders.fused import ModelProfile


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

    # Consuming.
    # 256: the ingest pipeline keeps the model busy across a batch (bench/ingest.py: 0.87 of the
    # bare encoder vs 0.72 at 64); photos in memory are bounded separately (FETCH_LOOKAHEAD).
    max_poll_records: int = Field(default=256, ge=1, le=10_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    poll_timeout_ms: int = Field(default=500, ge=10)

    # The index: embedded Qdrant under state_dir unless a server URL is given.
    index_path: Path | None = None
    index_url: str | None = None
    index_api_key: SecretStr | None = None
    index_prefix: str = "loupe"

    # Metrics and health endpoint.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    # Fetching image URLs: where Loupe may connect, and how much it may cost.
    fetch_connect_timeout_s: float = Field(default=3.0, gt=0)
    fetch_read_timeout_s: float = Field(default=5.0, gt=0)
    fetch_total_timeout_s: float = Field(default=10.0, gt=0)
    fetch_max_redirects: int = Field(default=3, ge=0, le=10)
    fetch_allow_loopback: bool = False  # local demos and tests only
    fetch_allow_private: bool = False
    fetch_workers: int = Field(default=8, ge=1, le=64)

    # The model (encoders/). Defaults are the offline profile from DESIGN.md.
    image_backbone: str = "efficientnet-lite0"
    text_backbone: str = "all-minilm-l6-v2"
    image_weights: str | None = None  # a file, or "random"; None: the backbone's own source
    text_weights: str | None = None
    fusion_checkpoint: Path | None = None
    image_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    image_fit: Literal["pad", "center_crop", "squash"] = "pad"
    max_text_tokens: int = Field(default=128, ge=8, le=512)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA, else fp32
    encode_batch_size: int | None = Field(default=None, ge=1, le=1024)  # None: by device
    decode_workers: int = Field(default=2, ge=1, le=64)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=64 * 64)
    allow_model_download: bool = False  # never fetch weights at run time unless asked

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

    def model_profile(self) -> ModelProfile:
        from encoders.fused import ModelProfile

        return ModelProfile(
            image_backbone=self.image_backbone,
            text_backbone=self.text_backbone,
            image_weights=self.image_weights,
            text_weights=self.text_weights,
            fusion_checkpoint=self.fusion_checkpoint,
            image_weight=self.image_weight,
            fit=self.image_fit,
            max_text_tokens=self.max_text_tokens,
            device=self.device,
            precision=self.precision,
            batch_size=self.encode_batch_size,
            decode_workers=self.decode_workers,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            allow_download=self.allow_model_download,
        )

    def fetch_policy(self):
        from consumers.image_fetch import FetchPolicy

        return FetchPolicy(
            connect_timeout_s=self.fetch_connect_timeout_s,
            read_timeout_s=self.fetch_read_timeout_s,
            total_timeout_s=self.fetch_total_timeout_s,
            max_image_bytes=self.max_image_bytes,
            max_redirects=self.fetch_max_redirects,
            allow_loopback=self.fetch_allow_loopback,
            allow_private=self.fetch_allow_private,
        )

    def resolved_index_path(self) -> Path | None:
        if self.index_url:
            return None
        return self.index_path or self.state_dir / "index"

    def describe(self) -> dict[str, Any]:
        """The effective settings for the start-up log; SecretStr fields print masked."""
        return {name: str(value) for name, value in self.model_dump().items()}


def load_settings() -> Settings:
    """Read the environment once; a bad value raises ``ConfigError`` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "LOUPE_" + "_".join(str(part) for part in error["loc"]).upper()
            value = error.get("input")
            secret = any(word in name for word in ("PASSWORD", "API_KEY"))
            shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
            problems.append(f"{name}: {error['msg']}{shown}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
