"""deploy/: promtool checks, the compose file, and every dashboard query against a real
Prometheus scraping a running ``loupe serve`` during a small ingest and search."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer

from loupe.dev.catalog import load_catalog
from loupe.dev.drive import serve_env
from loupe.dev.kafka import free_loopback_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loupe.json"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs Debian's prometheus package"
    return subprocess.run([promtool, *args], capture_output=True, text=True, check=False)


def test_promtool_accepts_the_config_and_rules():
    config = _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "7 rules found" in rules.stdout


def test_every_alert_fires_when_it_should():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == {name for name, _ in _alert_expressions()}, "every alert needs a test"
    result = _promtool("test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_compose_file_parses_and_references_only_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "kafka",
        "kafka-init",
        "qdrant",
        "loupe-ingest",
        "loupe-search",
        "prometheus",
        "grafana",
    } <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        assert service.get("restart") or name == "kafka-init", f"{name} has no restart policy"
        assert "healthcheck" in service or name in ("kafka-init", "loupe-ingest", "loupe-search")
    gpu = services["loupe-ingest"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for path in (
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/loupe.yml",
        "prometheus/alerts.yml",
    ):
        assert (DEPLOY / path).is_file()


def test_dockerfile_runs_loupe_as_a_non_root_user():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["loupe"\]', dockerfile, re.M)
    assert re.search(r"^FROM nvidia/cuda:[\w.-]+-runtime", dockerfile, re.M)
    assert re.search(r"^USER loupe", dockerfile, re.M)
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (DEPLOY.parent / copied).exists(), copied


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def _alert_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def _query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # 400 with Prometheus's error for an invalid query
    except urllib.error.URLError as exc:  # not listening yet
        return {"status": "unreachable", "error": str(exc), "data": {"result": []}}


def _wait(condition, what: str, timeout_s: float, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: a process exited early:\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.integration
def test_every_panel_and_alert_query_against_a_real_prometheus(
    bootstrap_servers, make_topic, group_id, tmp_path
):
    metrics_port, prometheus_port = free_loopback_port(), free_loopback_port()
    names = ("products", "requests", "responses", "deadletter")
    topics = {name: make_topic(name) for name in names}
    env = serve_env(
        bootstrap_servers,
        topics,
        group=group_id,
        state_dir=tmp_path / "state",
        metrics_port=metrics_port,
        max_poll_records="4",
    )
    loupe_log = tmp_path / "loupe.log"
    loupe = subprocess.Popen(
        [sys.executable, "-m", "loupe", "serve"],
        env=env,
        stdout=loupe_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    (tmp_path / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "loupe",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    prometheus_log = tmp_path / "prometheus.log"
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=prometheus_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{prometheus_port}"
    procs = [(loupe, loupe_log), (prometheus, prometheus_log)]
    try:

        def up() -> bool:
            result = _query(api, 'up{job="loupe"} == 1').get("data", {}).get("result", [])
            return bool(result)

        _wait(up, "Prometheus scraping Loupe", 120, procs)
        catalog = load_catalog()[::30]
        producer = KafkaProducer(bootstrap_servers=bootstrap_servers)
        now = datetime.now(UTC).isoformat()
        for p in catalog:
            event = {
                "type": "product.upserted",
                "event_id": p.product_id,
                "occurred_at": now,
                "merchant_id": "giva",
                "product_id": p.product_id,
                "title": p.title,
                "attributes": p.attributes(),
                "image": {
                    "data": base64.b64encode(p.image_path.read_bytes()).decode(),
                    "media_type": "image/jpeg",
                },
            }
            producer.send(
                topics["products"],
                key=f"giva/{p.product_id}".encode(),
                value=json.dumps(event).encode(),
            )
        producer.send(topics["products"], key=b"bad", value=b"{not json")
        producer.flush()
        _wait(
            lambda: (
                (_query(api, "max(loupe_index_points)")["data"]["result"] or [{}])[0].get(
                    "value", [0, "0"]
                )[1]
                == str(len(catalog))
            ),
            "ingest",
            120,
            procs,
        )
        for n in range(6):  # spread over several scrapes so rates are non-zero
            request = {
                "type": "search.requested",
                "request_id": f"q{n}",
                "occurred_at": datetime.now(UTC).isoformat(),
                "text": "gold ring",
            }
            producer.send(
                topics["requests"], key=f"q{n}".encode(), value=json.dumps(request).encode()
            )
            producer.flush()
            time.sleep(0.7)
        producer.close()
        _wait(
            lambda: _query(api, "sum(loupe_search_request_latency_seconds_count) >= 6")["data"][
                "result"
            ],
            "searches answered",
            60,
            procs,
        )
        time.sleep(3)  # a few more scrapes after the last answer

        empty = []
        for title, expr in _panel_queries():
            answer = _query(api, expr)
            assert answer["status"] == "success", f"{title}: {expr}: {answer}"
            if not answer["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
        for name, expr in _alert_expressions():
            answer = _query(api, expr)
            assert answer["status"] == "success", f"{name}: {expr}: {answer}"
        # keda-encode-once.yaml's query: the products lag, summed over the pods that report it.
        keda = yaml.safe_load((DEPLOY / "kubernetes" / "keda-encode-once.yaml").read_text())
        query = keda["spec"]["triggers"][0]["metadata"]["query"]
        lag = _query(api, query.replace('"loupe.products.v1"', f'"{topics["products"]}"'))
        assert lag["status"] == "success" and lag["data"]["result"], lag
        assert float(lag["data"]["result"][0]["value"][1]) == 0.0, "every event was ingested"
        dead = _query(api, 'loupe_dead_letters_total{reason="invalid_json"}')
        assert float(dead["data"]["result"][0]["value"][1]) == 1.0
    finally:
        loupe.send_signal(signal.SIGTERM)
        prometheus.send_signal(signal.SIGTERM)
        loupe.wait(60)
        prometheus.wait(30)
