"""Settings pass Kafka security through; the health server says which port is taken."""

from __future__ import annotations

import urllib.request

import pytest

from consumers.metrics import HealthServer, LoupeMetrics, MetricsPortUnavailable
from consumers.settings import Settings


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
