"""Proof that the broker is real: keyed idempotent produce, grouped consume, exact resume."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

pytestmark = pytest.mark.integration

MESSAGES = 1000
PARTITIONS = 4


def _consumer(bootstrap_servers: str, topic: str, group_id: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=37,  # odd on purpose: batches straddle the commit points
    )
    consumer.subscribe([topic])
    return consumer


def test_group_resumes_exactly_after_committed_offsets(bootstrap_servers, make_topic, group_id):
    topic = make_topic("resume", partitions=PARTITIONS)

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    assert producer.config["enable_idempotence"], "kafka-python 3 should default to idempotence"
    futures = [
        producer.send(topic, key=f"product-{i % 97}".encode(), value=str(i).encode())
        for i in range(MESSAGES)
    ]
    producer.flush()
    written = {}
    for i, future in enumerate(futures):
        meta = future.get(timeout=30)
        written[(meta.partition, meta.offset)] = i
    producer.close()
    assert len(written) == MESSAGES
    assert len({p for p, _ in written}) == PARTITIONS, "keys should spread over all partitions"

    # First consumer: processes some messages, commits only what it processed (not the whole
    # fetched batch), then goes away midway.
    first = _consumer(bootstrap_servers, topic, group_id)
    processed: dict[tuple[int, int], int] = {}
    committed: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(processed) < MESSAGES // 2:
        assert time.monotonic() < deadline, "first consumer made no progress"
        for tp, records in first.poll(timeout_ms=1000).items():
            # Process only the first two thirds of each batch; the rest is fetched, not done.
            done = records[: max(1, 2 * len(records) // 3)]
            for record in done:
                processed[(tp.partition, record.offset)] = int(record.value)
            next_offset = done[-1].offset + 1
            first.commit({tp: OffsetAndMetadata(next_offset, "", -1)})
            committed[tp.partition] = next_offset
            # Rewind to the first unprocessed message, as a consumer that abandons work must.
            first.seek(tp, next_offset)
    first.close(autocommit=False)

    # A new consumer in the same group starts exactly at the committed offsets.
    second = _consumer(bootstrap_servers, topic, group_id)
    resumed: dict[tuple[int, int], int] = {}
    first_seen: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(processed) + len(resumed) < MESSAGES:
        assert time.monotonic() < deadline, f"stuck at {len(processed) + len(resumed)} messages"
        for tp, records in second.poll(timeout_ms=1000).items():
            for record in records:
                first_seen.setdefault(tp.partition, record.offset)
                resumed[(tp.partition, record.offset)] = int(record.value)
        second.commit()
    for partition in range(PARTITIONS):
        assert (
            second.committed(TopicPartition(topic, partition))
            == max(o for p, o in written if p == partition) + 1
        )
    second.close()

    # Exactly where the first left off, per partition: no gap, nothing seen twice.
    for partition, offset in committed.items():
        assert first_seen.get(partition, offset) == offset, (
            f"partition {partition}: resumed at {first_seen.get(partition)}, committed {offset}"
        )
    assert not processed.keys() & resumed.keys(), "a message was delivered again past a commit"
    assert processed | resumed == written, "some message was lost or altered"
    per_partition = defaultdict(list)
    for p, o in sorted(resumed):
        per_partition[p].append(o)
    for offsets in per_partition.values():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), "a gap in a partition"


def test_serve_refuses_to_start_without_its_topics(bootstrap_servers, make_topic):
    from loupe.consumers.kafka.topics import TopicsMissing
    from loupe.consumers.service.lifecycle import LoupeService
    from loupe.consumers.settings import Settings

    existing = make_topic("products")
    settings = Settings(
        bootstrap_servers=bootstrap_servers,
        products_topic=existing,
        deadletter_topic="loupe.no-such-deadletter",
        metrics_port=0,
    )
    with pytest.raises(TopicsMissing, match=r"loupe\.no-such-deadletter") as info:
        LoupeService(settings, role="ingest").start()
    assert existing not in str(info.value)
    assert "--create-topics" in str(info.value)


def test_a_broker_started_for_a_process_dies_with_it(tmp_path):
    """A SIGKILLed test run or demo must not leave a broker behind."""
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from loupe.dev.kafka import LocalKafkaBroker\n"
        f"broker = LocalKafkaBroker(state_dir=Path({str(tmp_path)!r}), die_with_parent=True)\n"
        "state = broker.start()\n"
        "print(state.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(broker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(broker_pid, signal.SIGKILL)
    pytest.fail("the broker outlived the process that started it")


def test_topics_create_compacts_the_products_topic_and_check_warns_when_not(
    bootstrap_servers, make_topic, monkeypatch, capsys
):
    """The products topic is the catalog's source of truth: created compacted; an existing one
    that is not compacted is named in a warning at start-up (and by `topics check`)."""
    import uuid

    from loupe.cli import main

    suffix = uuid.uuid4().hex[:8]
    names = {
        "LOUPE_PRODUCTS_TOPIC": f"products.{suffix}",
        "LOUPE_SEARCH_REQUESTS_TOPIC": f"requests.{suffix}",
        "LOUPE_SEARCH_RESPONSES_TOPIC": f"responses.{suffix}",
        "LOUPE_DEADLETTER_TOPIC": f"deadletter.{suffix}",
    }
    monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", bootstrap_servers)
    for name, value in names.items():
        monkeypatch.setenv(name, value)
    assert main(["topics", "create", "--partitions", "2"]) == 0
    out = capsys.readouterr().out
    assert f"products.{suffix}: created (compacted)" in out
    assert f"requests.{suffix}: created\n" in out
    assert main(["topics", "check"]) == 0
    checked = capsys.readouterr()  # the CLI logs to stderr
    assert f"products.{suffix}: cleanup.policy=compact" in checked.out
    assert "not compacted" not in checked.err

    plain = make_topic("products")  # as a cluster's defaults would make it: delete
    monkeypatch.setenv("LOUPE_PRODUCTS_TOPIC", plain)
    assert main(["topics", "check", "--role", "ingest"]) == 0
    checked = capsys.readouterr()
    assert f"{plain}: cleanup.policy=delete" in checked.out
    assert f"the products topic {plain} is not compacted" in checked.err
    assert "--add-config cleanup.policy=compact" in checked.err
