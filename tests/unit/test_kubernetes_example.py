"""deploy/kubernetes: the example must agree with the code it runs (no cluster here, so the
manifests are checked against Settings, the CLI and each other)."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from loupe.cli.main import cli
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
WORKLOADS = ("Deployment", "Job", "StatefulSet")


def _docs() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_every_setting_named_is_a_real_setting():
    docs = _docs()
    names = set(docs[("ConfigMap", "loupe-config")]["data"])
    names |= set(docs[("ConfigMap", "loupe-replica-config")]["data"])
    for doc in docs.values():
        if doc["kind"] in WORKLOADS:
            for container in _containers(doc):
                names |= {env["name"] for env in container.get("env", [])}
    fields = {f"LOUPE_{name.upper()}" for name in Settings.model_fields}
    assert names and names <= fields, sorted(names - fields)


def test_every_container_runs_a_real_command_with_real_options():
    for doc in _docs().values():
        if doc["kind"] not in WORKLOADS:
            continue
        for container in _containers(doc):
            command, rest = cli, list(container["args"])
            while isinstance(command, click.Group):
                name = rest.pop(0)
                command = command.get_command(click.Context(command), name)
                assert command is not None, f"no command {name!r} in {container['args']}"
            command.make_context(name, rest)  # raises on an unknown option or a bad value


def test_keda_scales_each_role_on_its_own_group_topic_and_partition_count():
    docs = _docs()
    settings = Settings()
    topics_job = _containers(docs[("Job", "loupe-topics")])[0]["args"]
    partitions = int(topics_job[topics_job.index("--partitions") + 1])
    expected = {
        "loupe-ingest": (f"{settings.group_id}.ingest", settings.products_topic, "ingest"),
        "loupe-search": (f"{settings.group_id}.search", settings.search_requests_topic, "search"),
    }
    config = docs[("ConfigMap", "loupe-config")]["data"]
    for name, (group, topic, role) in expected.items():
        scaled = docs[("ScaledObject", name)]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == group
        assert trigger["metadata"]["topic"] == topic
        assert trigger["metadata"]["bootstrapServers"] == config["LOUPE_BOOTSTRAP_SERVERS"]
        assert scaled["spec"]["maxReplicaCount"] <= partitions, "pods beyond partitions idle"
        assert scaled["spec"]["scaleTargetRef"]["name"] == name
        args = _containers(docs[("Deployment", name)])[0]["args"]
        assert args == ["serve", "--role", role]


def test_with_encode_once_keda_scales_the_ingest_on_the_products_lag_the_pods_report():
    docs = _docs()
    settings = Settings()
    direct = docs[("ScaledObject", "loupe-ingest")]
    scaled = docs[("ScaledObject", "loupe-ingest-encode-once")]
    assert scaled["spec"]["scaleTargetRef"] == direct["spec"]["scaleTargetRef"]
    assert scaled["spec"]["maxReplicaCount"] == direct["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    (kafka,) = direct["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["threshold"] == kafka["metadata"]["lagThreshold"]
    # The products lag, whatever the group (the encoders' changes with each reindex); the
    # query itself runs on a real Prometheus in tests/integration/test_monitoring.py.
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(loupe_consumer_lag{") and "encode" not in query
    assert f'topic="{settings.products_topic}"' in query


def test_probes_and_metrics_use_the_metrics_port_and_checkpoints_share_a_volume():
    docs = _docs()
    port = int(docs[("ConfigMap", "loupe-config")]["data"]["LOUPE_METRICS_PORT"])
    for name in ("loupe-ingest", "loupe-search"):
        container = _containers(docs[("Deployment", name)])[0]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts == {"/data/models": "models"}
    trainer = _containers(docs[("Job", "loupe-train")])[0]
    assert {m["mountPath"] for m in trainer["volumeMounts"]} == {"/data/models"}
    claim = docs[("PersistentVolumeClaim", "loupe-models")]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_replicas_keep_their_index_on_their_own_volume_and_are_named_by_their_pod():
    docs = _docs()
    config = docs[("ConfigMap", "loupe-replica-config")]["data"]
    replicas = docs[("StatefulSet", "loupe-replica")]
    (container,) = _containers(replicas)
    assert container["args"] == ["serve", "--role", "all"], "a replica runs both roles"
    env = {e["name"]: e for e in container["env"]}
    assert env["LOUPE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The settings a pod would read: accepted (an index URL beside a replica id is refused).
    settings = Settings(**{k[len("LOUPE_") :].lower(): v for k, v in config.items()},
                        replica_id="loupe-replica-0")  # fmt: skip
    assert KafkaNames.of(settings).ingest_group() == f"{settings.group_id}.ingest.loupe-replica-0"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[config["LOUPE_STATE_DIR"]] == "state"
    (claim,) = replicas["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
