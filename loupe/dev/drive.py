"""Driving Loupe from outside, as an operator and a shopper app do: ``loupe`` as a child process
with its environment, and a steady search load with every answer recorded. The integration
tests and the benchmarks share them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def serve_env(
    bootstrap: str,
    topics: dict[str, str],
    *,
    group: str,
    state_dir: Path,
    metrics_port: int | str = 0,
    **settings: str,
) -> dict[str, str]:
    """The environment of a `loupe serve` child process on its own topics (keys ``products``,
    ``requests``, ``responses``, ``deadletter``), group and state; ``settings`` adds LOUPE_*
    variables by their lower-case names (``max_poll_records="8"``)."""
    env = {
        **os.environ,
        "LOUPE_BOOTSTRAP_SERVERS": bootstrap,
        "LOUPE_STATE_DIR": str(state_dir),
        "LOUPE_PRODUCTS_TOPIC": topics["products"],
        "LOUPE_SEARCH_REQUESTS_TOPIC": topics["requests"],
        "LOUPE_SEARCH_RESPONSES_TOPIC": topics["responses"],
        "LOUPE_DEADLETTER_TOPIC": topics["deadletter"],
        "LOUPE_GROUP_ID": group,
        "LOUPE_METRICS_PORT": str(metrics_port),
    }
    env.update({f"LOUPE_{name.upper()}": value for name, value in settings.items()})
    return env


def loupe_process(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``loupe <args>`` as a child process with ``env``, its output appended to ``log_path``."""
    return subprocess.Popen(
        [sys.executable, "-m", "loupe", *args],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 95, 99)}


class SearchLoad:
    """A shopper app: sends search requests at a steady rate from one thread and reads the
    answers from another, recording when each was sent and answered, its status and model.

    ``make_body(n)`` returns the request body (without type, request id and time)."""

    def __init__(
        self,
        bootstrap: str,
        requests_topic: str,
        responses_topic: str,
        make_body,
        every_s: float,
        prefix: str = "q",
    ) -> None:
        import threading

        from kafka import KafkaConsumer, KafkaProducer
        from kafka.structs import TopicPartition

        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        # Positioned at the end now, so that only this load's answers are read.
        self._reader = KafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        partitions = [
            TopicPartition(responses_topic, p)
            for p in self._reader.partitions_for_topic(responses_topic) or {0}
        ]
        self._reader.assign(partitions)
        for tp in partitions:
            self._reader.position(tp)  # resolves the end now, before anything is asked
        self.requests_topic, self.make_body = requests_topic, make_body
        self.every_s, self.prefix = every_s, prefix
        self.sent: dict[str, float] = {}  # request id -> monotonic send time
        self.answers: dict[str, list[tuple[float, dict]]] = {}  # id -> [(arrival, answer)]
        self._stop_sending = threading.Event()
        self._stop_reading = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send_loop, daemon=True),
            threading.Thread(target=self._read_loop, daemon=True),
        ]

    def __enter__(self) -> SearchLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_sending()
        self._stop_reading.set()
        for thread in self._threads:
            thread.join()
        self._reader.close()

    def _send_loop(self) -> None:
        from datetime import UTC, datetime

        n = 0
        while not self._stop_sending.is_set():
            rid = f"{self.prefix}{n}"
            body = {
                "type": "search.requested",
                "request_id": rid,
                "occurred_at": datetime.now(UTC).isoformat(),
                **self.make_body(n),
            }
            with self._lock:
                self.sent[rid] = time.monotonic()
            self._producer.send(
                self.requests_topic, key=rid.encode(), value=json.dumps(body).encode()
            )
            self._producer.flush()
            n += 1
            self._stop_sending.wait(self.every_s)
        self._producer.close()

    def _read_loop(self) -> None:
        while not self._stop_reading.is_set():
            for batch in self._reader.poll(timeout_ms=200).values():
                for record in batch:
                    answer = json.loads(record.value)
                    with self._lock:
                        self.answers.setdefault(answer["request_id"], []).append(
                            (time.monotonic(), answer)
                        )

    def stop_sending(self) -> None:
        self._stop_sending.set()
        self._threads[0].join()

    def wait_for_answers(self, timeout_s: float) -> bool:
        """After ``stop_sending``: wait until every request sent has an answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if set(self.sent) <= set(self.answers):
                    return True
            time.sleep(0.1)
        return False

    def answered_since(self, since: float) -> list[dict]:
        """Answers that arrived after ``since`` (a monotonic time), in arrival order."""
        with self._lock:
            found = [(t, a) for items in self.answers.values() for t, a in items if t >= since]
        return [answer for _, answer in sorted(found, key=lambda item: item[0])]

    def window(self, start: float, end: float) -> dict[str, object]:
        """The requests sent within [start, end): how many, answered how, how fast."""
        with self._lock:
            ids = [rid for rid, t in self.sent.items() if start <= t < end]
            latencies, statuses, models = [], {}, {}
            for rid in ids:
                for arrived, answer in self.answers.get(rid, [])[:1]:
                    latencies.append(arrived - self.sent[rid])
                    statuses[answer["status"]] = statuses.get(answer["status"], 0) + 1
                    models[answer["model_version"]] = models.get(answer["model_version"], 0) + 1
            duplicates = sum(len(self.answers.get(rid, [])) > 1 for rid in ids)
        return {
            "sent": len(ids),
            "answered": len(latencies),
            "statuses": statuses,
            "models": models,
            "duplicated": duplicates,
            "latency_s": percentiles(latencies) if latencies else {},
        }
