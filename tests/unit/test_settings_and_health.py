"""Settings pass Kafka security through; the health server says which port is taken."""

from __future__ import annotations

import urllib.request

import pytest
import torch

from loupe.cli import main
from loupe.consumers.errors import ConfigError
from loupe.consumers.metrics import HealthServer, LoupeMetrics, MetricsPortUnavailable
from loupe.consumers.settings import Settings, load_settings
from loupe.encoders.device import pick_device
from loupe.encoders.errors import DeviceUnavailable


def test_kafka_security_settings_pass_through(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", "b1:9093,b2:9093")
    monkeypatch.setenv("LOUPE_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LOUPE_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LOUPE_SASL_PLAIN_USERNAME", "loupe")
    monkeypatch.setenv("LOUPE_SASL_PLAIN_PASSWORD", "s3cret")
    monkeypatch.setenv("LOUPE_SSL_CAFILE", str(ca))
    settings = Settings()
    config = settings.kafka_client_config()
    assert config == {
        "bootstrap_servers": ["b1:9093", "b2:9093"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "loupe",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": str(ca),
    }
    described = settings.describe()
    assert "s3cret" not in str(described)
    assert described["sasl_plain_password"] == "**********"


def test_invalid_settings_are_refused_with_the_name(monkeypatch):
    monkeypatch.setenv("LOUPE_IMAGE_WEIGHT", "1.5")
    with pytest.raises(ValueError, match="image_weight"):
        Settings()


def test_the_largest_graph_batch_is_a_power_of_two(monkeypatch):
    monkeypatch.setenv("LOUPE_CUDA_GRAPH_MAX_BATCH", "256")
    profile = load_settings().model_profile()
    assert profile.cuda_graph_max_batch == 256
    monkeypatch.setenv("LOUPE_CUDA_GRAPH_MAX_BATCH", "24")
    with pytest.raises(ConfigError, match="CUDA_GRAPH_MAX_BATCH"):
        load_settings()


def test_the_cli_names_every_bad_variable_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LOUPE_PRECISION", "fp8")
    monkeypatch.setenv("LOUPE_MAX_POLL_RECORDS", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    expected = "LOUPE_PRECISION: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'fp8')"
    assert expected in message
    assert "LOUPE_MAX_POLL_RECORDS" in message
    assert main(["embed", "--text", "ring"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loupe: error: invalid settings: LOUPE_")
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_a_missing_cuda_device_is_a_clear_start_up_error(monkeypatch, capsys):
    monkeypatch.setenv("LOUPE_DEVICE", "cuda")
    assert main(["embed", "--text", "ring"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' was requested but CUDA is not available" in err
    with pytest.raises(DeviceUnavailable):
        pick_device("cuda")


def test_health_endpoints_and_a_taken_port():
    metrics = LoupeMetrics()
    server = HealthServer(metrics, lambda: (False, "broker unreachable"), port=0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/healthz") as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/readyz")
        assert info.value.code == 503 and b"broker unreachable" in info.value.read()
        with urllib.request.urlopen(f"{base}/metrics") as response:
            assert b"loupe_dead_letters_total" in response.read()
        with pytest.raises(
            MetricsPortUnavailable, match=f"127.0.0.1:{server.port}.*LOUPE_METRICS_PORT"
        ):
            HealthServer(metrics, lambda: (True, "ready"), port=server.port)
    finally:
        server.stop()


def test_a_cluster_topology_needs_a_server_and_copies_enough(monkeypatch):
    from loupe.consumers.index.interface import Topology

    settings = Settings(
        index_url="http://127.0.0.1:6333",
        index_shards=3,
        index_replication_factor=2,
        index_write_consistency=1,
    )
    assert settings.index_topology() == Topology(3, 2, 1)
    assert settings.index_topology().collection_options() == {
        "shard_number": 3,
        "replication_factor": 2,
        "write_consistency_factor": 1,
    }
    monkeypatch.setenv("LOUPE_INDEX_SHARDS", "3")
    with pytest.raises(ConfigError, match="set LOUPE_INDEX_URL too"):
        load_settings()
    monkeypatch.setenv("LOUPE_INDEX_URL", "http://127.0.0.1:6333")
    monkeypatch.setenv("LOUPE_INDEX_WRITE_CONSISTENCY", "2")
    with pytest.raises(ConfigError, match=r"WRITE_CONSISTENCY \(2\) cannot exceed"):
        load_settings()


@pytest.mark.parametrize(
    ("version", "supported"),
    [("1.18.3", True), ("1.21.0", True), ("1.17.9", False), ("2.0.0", False), ("dev", False)],
)
def test_the_server_versions_loupe_supports(version, supported):
    from loupe.consumers.index.interface import check_server_version

    problem = check_server_version(version)
    assert (problem is None) == supported
    if not supported:
        assert "Loupe supports 1.18 to 1.21" in problem


def test_the_readmes_settings_table_is_the_one_the_settings_describe():
    """Every setting has its line (with its real default), and no line names a setting that is
    not there: `python -m loupe.dev.settings_table` rewrites the table from ``Settings``."""
    from loupe.dev.settings_table import README, rewrite, sections

    readme = README.read_text()
    assert rewrite(readme) == readme, "run: python -m loupe.dev.settings_table"
    grouped = [name for _, names in sections() for name in names]
    assert grouped == list(Settings.model_fields), "each setting in one table, in order"
    assert [title for title, _ in sections()][1:3] == ["Kafka", "The index"]
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description (its README line)"
        assert f"`LOUPE_{name.upper()}`" in readme
