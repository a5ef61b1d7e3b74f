"""The ACLs each principal needs, as an operator reads them (``loupe acls``, deploy/README.md),
and the one line a refusal by the broker becomes. That exactly these suffice on a broker that
allows nothing else is tests/integration/test_secure_broker.py's to prove."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)

from loupe.cli import main
from loupe.cli.common import RedactSecrets
from loupe.consumers.kafka import eof as kafka_eof
from loupe.consumers.kafka.acls import PRINCIPALS, Acl, refusal, required_acls
from loupe.consumers.settings import Settings

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def test_the_deploy_readme_lists_exactly_what_loupe_acls_prints(monkeypatch, capsys):
    blocks = re.findall(r"<!-- output of: (.*?) -->\n```\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2, "deploy/README.md shows `loupe acls` in both modes"
    for command, shown in blocks:
        *assignments, program, name = command.split()[: command.split().index("acls") + 1]
        assert (program, name) == ("loupe", "acls"), command
        for name in list(os.environ):
            if name.startswith("LOUPE_"):
                monkeypatch.delenv(name)
        for assignment in assignments:
            monkeypatch.setenv(*assignment.split("=", 1))
        assert main(command.split()[len(assignments) + 1 :]) == 0
        assert capsys.readouterr().out == shown, command


def test_acls_follow_the_configured_names_and_users(capsys):
    names = {"group_id": "shop", "products_topic": "shop.products", "vectors_topic": "shop.vec"}
    settings = Settings(**names)
    ingest = required_acls(settings, "ingest")
    products = ("Read", "Describe", "DescribeConfigs")
    assert Acl("topic", "shop.products", "literal", products) in ingest
    assert {acl.name for acl in ingest if acl.resource != "topic"} == {
        "shop.ingest",
        "shop.ingest.",
    }
    assert not any(acl.name == "shop.vec." for acl in ingest + required_acls(settings, "operator"))
    # Encode-once: the encoders' and writers' groups and transactional ids, and the vectors.
    once = required_acls(Settings(**names, encode_once=True), "ingest")
    assert {acl.name for acl in once if acl.resource == "transactional-id"} == {
        "shop.encode.",
        "shop.index.",
    }
    assert any(acl.name == "shop.vec." and "Create" in acl.operations for acl in once)
    # The search principal reads no catalog and writes no vectors topic.
    search = required_acls(settings, "search")
    assert not any(acl.name in ("shop.products", "shop.vec.") for acl in search)
    assert not any("Create" in acl.operations for acl in search)
    with pytest.raises(ValueError, match="ingest, search, operator"):
        required_acls(settings, "admin")

    assert main(["acls", "search", "--user", "search=app-search"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# search"
    assert all("--allow-principal User:app-search " in line for line in lines[1:])
    assert main(["acls", "--user", "nobody"]) == 2
    assert "PRINCIPAL=USER" in capsys.readouterr().err


def test_a_refusal_names_the_missing_acl():
    settings = Settings(sasl_plain_username="svc-search")
    line = refusal(GroupAuthorizationFailedError("loupe.search"), settings, "search")
    assert line is not None
    assert line.startswith("the broker refused 'svc-search' (GroupAuthorizationFailedError")
    assert "the search principal needs Read on group loupe.search;" in line
    assert "`loupe acls search`" in line
    # Wrapped as kafka-python wraps it, and for the worker of another role.
    wrapped = KafkaError(TransactionalIdAuthorizationFailedError("loupe.encode.host.7"))
    line = refusal(wrapped, Settings(sasl_plain_username="svc", encode_once=True), "encode")
    assert "ingest principal needs Write/Describe on transactional-id loupe.encode. (prefixed)" in (
        line or ""
    )
    # The broker did not say which topic: the line says which ACLs, not all of them.
    line = refusal(TopicAuthorizationFailedError(), settings, "topics")
    assert line is not None and "operator principal needs its topic ACLs" in line
    assert refusal(ValueError("not a refusal"), settings, "search") is None
    # `serve --role all` runs both principals' workers; a command that is not Loupe's own
    # principal's gets the general hint.
    line = refusal(TransactionalIdAuthorizationFailedError("loupe.search.h.1"), settings, "all")
    assert "ingest and search principal needs Write/Describe on transactional-id loupe.search." in (
        line or ""
    )
    assert "`loupe acls ingest search`" in (line or "")
    line = refusal(TopicAuthorizationFailedError(), settings, "publish")
    assert line is not None and "principal needs" not in line and "`loupe acls` prints" in line
    assert all(required_acls(settings, principal) for principal in PRINCIPALS)


def test_the_cli_names_the_acl_of_the_serve_role_it_was_given(monkeypatch, capsys):
    """A refusal at start-up (a transactional producer's first call) is the role's."""
    from loupe.consumers.kafka import io as kafka_io
    from loupe.consumers.service import lifecycle as service

    def refused(self):
        raise TransactionalIdAuthorizationFailedError()

    monkeypatch.setattr(kafka_io, "require_broker", lambda config, wait_s=0.0: None)
    monkeypatch.setattr(service.LoupeService, "start", refused)
    assert main(["serve", "--role", "search"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loupe: error: the broker refused 'this client' (Transactional")
    assert "`loupe acls search`" in err and "serve" not in err.split("`loupe acls")[1]
    assert main(["-v", "serve"]) == 2
    assert "`loupe acls ingest search`" in capsys.readouterr().err


def test_secrets_are_redacted_from_every_log_line():
    redact = RedactSecrets()
    redact.secrets.add("s3cret-pw")
    record = logging.LogRecord(
        "kafka.admin.client",
        logging.DEBUG,
        __file__,
        1,
        "Starting KafkaAdminClient with configuration: %s",
        ({"sasl_plain_password": "s3cret-pw", "user": "u"},),
        None,
    )
    assert redact.filter(record) is True
    assert "s3cret-pw" not in record.getMessage()
    assert "'sasl_plain_password': '***'" in record.getMessage()


class _Socket:
    """A socket whose peer sent ``data`` and closed."""

    def __init__(self, data: bytes) -> None:
        self.chunks = [data, b""]

    def recv(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_bytes_that_arrive_with_the_end_of_a_connection_are_delivered_first():
    from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

    assert kafka_eof.install()
    for transport_class in (KafkaTCPTransport, KafkaSSLTransport):
        transport = transport_class.__new__(transport_class)
        transport._sock, transport._closed = _Socket(b"the broker's last response"), False
        transport.host_port = lambda: "broker:9093"
        data, err = transport._sock_recv()
        assert (data, err) == (b"the broker's last response", None)
        data, err = transport._sock_recv()
        assert data == b"" and "socket disconnected" in str(err)
    assert kafka_eof.install(), "installing twice wraps once"
    assert not hasattr(KafkaTCPTransport._sock_recv.__wrapped__, "__wrapped__")
