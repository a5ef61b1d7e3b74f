"""The local broker's helpers and error messages, without starting Java."""

from __future__ import annotations

import socket

import pytest

from loupe.consumers.kafka.io import answers_metadata
from loupe.dev import kafka as kafka_broker
from loupe.dev.kafka import BrokerError, LocalKafkaBroker


def test_properties_bind_loopback_only(tmp_path):
    text = kafka_broker._server_properties(tmp_path / "data", 19092, 19093)
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_taken_port_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kafka_broker, "provision_jars", lambda cache_dir: tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            LocalKafkaBroker(state_dir=tmp_path / "state").start(port=port)


def test_missing_java_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no java, no mvn
    with pytest.raises(BrokerError, match=r"`java` is not on PATH.*apt-get install"):
        LocalKafkaBroker(state_dir=tmp_path / "state").start()


def test_missing_maven_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"`mvn` is not on PATH"):
        kafka_broker.provision_jars(cache_dir=tmp_path / "cache")


def test_stop_without_a_broker_is_a_no_op(tmp_path):
    assert LocalKafkaBroker(state_dir=tmp_path).stop() is False


def test_stale_state_of_a_dead_process_is_not_running(tmp_path):
    broker = LocalKafkaBroker(state_dir=tmp_path)
    broker.state_file.write_text(
        '{"pid": 999999999, "bootstrap_servers": "127.0.0.1:1", "controller_port": 2,'
        ' "state_dir": "x", "kafka_version": "4.1.2", "started_at": 0}'
    )
    assert broker.running_state() is None


def test_probe_of_a_closed_port_is_false():
    port = kafka_broker.free_loopback_port()
    assert answers_metadata({"bootstrap_servers": [f"127.0.0.1:{port}"]}, timeout_s=0.5) is False


def test_cluster_ids_never_look_like_an_option():
    ids = {kafka_broker.new_cluster_id() for _ in range(2000)}  # ~31 would start with '-'
    assert len(ids) == 2000
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
