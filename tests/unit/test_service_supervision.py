"""The service's own policies, without Kafka: readiness, and what signals do."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from loupe.consumers.errors import WorkerDied
from loupe.consumers.service import lifecycle as service
from loupe.consumers.service import signals
from loupe.consumers.settings import Settings


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_second_signal_exits_at_once(restore_signals):
    stops, exits = [], []
    signals.install_signal_handlers(lambda: stops.append(1), exits.append)
    handler = signal.getsignal(signal.SIGTERM)
    handler(signal.SIGTERM, None)
    assert stops == [1] and exits == []  # the first one: finish the batch, then stop
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]  # the second one: now


def _readiness(settings: Settings, failure=None, workers=()) -> service.Readiness:
    """A built service's readiness: its workers, and an index that answers."""
    readiness = service.Readiness(settings)
    readiness.stage, readiness.failure, readiness.workers = None, failure, list(workers)
    readiness.index = lambda: SimpleNamespace(count=lambda: 3)
    return readiness


def test_a_service_is_not_ready_while_it_starts():
    readiness = service.Readiness(Settings())
    assert readiness() == (False, "starting: checking the topics")
    readiness.stage = "starting: loading the model"
    assert readiness() == (False, "starting: loading the model")


def test_readiness_probes_kafka_with_the_consumers_security_settings(monkeypatch):
    settings = Settings(
        bootstrap_servers="b1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="loupe",
        sasl_plain_password="s3cret",
    )
    probed = []
    monkeypatch.setattr(
        service, "answers_metadata", lambda config, timeout_s: probed.append(config) or True
    )
    assert _readiness(settings)() == (True, "ready")
    assert probed == [settings.kafka_client_config()]
    assert probed[0]["sasl_plain_password"] == "s3cret"


def test_a_dead_worker_makes_the_service_unready_at_once(monkeypatch):
    monkeypatch.setattr(service, "answers_metadata", lambda config, timeout_s: True)
    died = WorkerDied("the search worker died: RuntimeError: boom")
    ok, detail = _readiness(Settings(), failure=died)()
    assert not ok and detail == "not serving: the search worker died: RuntimeError: boom"


def test_a_worker_waiting_on_kafka_makes_the_service_unready_with_the_reason(monkeypatch):
    monkeypatch.setattr(service, "answers_metadata", lambda config, timeout_s: False)
    waiting = SimpleNamespace(
        role="search",
        waiting_on="publish and commit: retrying after [Error 7] RequestTimedOutError: after 5 s",
    )
    idle = SimpleNamespace(role="ingest", waiting_on=None)
    ok, detail = _readiness(Settings(), workers=[waiting, idle])()
    assert not ok
    assert detail == (
        "search: publish and commit: retrying after [Error 7] RequestTimedOutError: after 5 s; "
        "broker unreachable"
    )
