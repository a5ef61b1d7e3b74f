"""Qdrant behind an API key and TLS, as the session's server runs (tests/conftest.py): Loupe with
the key and the CA works (here `loupe collections`; ingest, search and reindex run against the
same server in test_reindex.py and test_secure_broker.py), and each misconfiguration stops it at
once with one line naming the setting to fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def _collections(qdrant_server, index_prefix: str, *flags: str, **settings: str | None):
    """``loupe [flags] collections`` against the session's server, with ``settings`` over its
    own (None: unset); returns the exit code, the output and how long it took."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    chosen = {**qdrant_server.settings(), "index_prefix": index_prefix, **settings}
    env.update({f"LOUPE_{k.upper()}": v for k, v in chosen.items() if v is not None})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "loupe", *flags, "collections"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("loupe: error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def test_with_the_key_and_the_ca_loupe_reaches_the_server(qdrant_server, index_prefix):
    assert qdrant_server.url.startswith("https://")
    code, output, _ = _collections(qdrant_server, index_prefix, "-v")
    assert code == 0, output
    assert "no collections yet" in output
    assert "DEBUG" in output, "ran at -v"
    assert qdrant_server.security.api_key not in output, "the key is in no log line"


@pytest.mark.parametrize(
    ("key", "said"),
    [(None, "needs an API key and none was set"), ("wrong-key", "it refused the API key")],
    ids=["no-key", "wrong-key"],
)
def test_a_missing_or_wrong_key_stops_with_one_line_naming_the_setting(
    qdrant_server, index_prefix, key, said
):
    code, output, took = _collections(qdrant_server, index_prefix, index_api_key=key)
    line = _one_line(output)
    assert code == 2, output
    assert f"Qdrant at {qdrant_server.url} answered 401" in line
    assert said in line and "set LOUPE_INDEX_API_KEY" in line
    assert took < 30, f"a refused key is not retried ({took:.0f} s)"
    if key is not None:
        assert key not in output, "the key is not shown"


def test_tls_without_the_ca_stops_with_one_line_naming_the_ca_setting(
    qdrant_server, index_prefix, tmp_path
):
    code, output, took = _collections(qdrant_server, index_prefix, index_ca=None)
    line = _one_line(output)
    assert code == 2, output
    assert f"cannot verify the TLS certificate of Qdrant at {qdrant_server.url}" in line
    assert "set LOUPE_INDEX_CA to the CA certificate that signed it" in line
    assert took < 30, f"an untrusted certificate is not retried ({took:.0f} s)"

    # A CA that did not sign it: the line says which file was tried.
    from loupe.dev.tls import make_certificates

    other = make_certificates(tmp_path / "other").ca
    code, output, _ = _collections(qdrant_server, index_prefix, index_ca=str(other))
    assert code == 2 and f"LOUPE_INDEX_CA={other} did not sign it" in _one_line(output)
