"""`loupe demo` in a reduced mode: it runs end to end and writes a report of answered queries."""

from __future__ import annotations

import re

import pytest

from loupe.cli import main

pytestmark = pytest.mark.integration


def test_reduced_demo_writes_a_report_of_answered_queries(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOUPE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LOUPE_METRICS_PORT", "0")
    report = tmp_path / "report.html"
    assert main(["demo", "--products", "24", "--queries", "5", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "products indexed                   24 / 24" in out
    assert "searches answered                  5 / 5" in out
    assert "==> stopped Loupe and the local Kafka broker" in out
    assert "==> [2/7] the fusion model, fitted to the catalog" in out
    assert re.search(r"trained in \d+ s: .*fusion-\w+\.safetensors", out)
    html = report.read_text()
    assert html.startswith("<!doctype html>")
    assert html.count("class='query'") == 5
    assert html.count("class='hit") >= 5, "answered queries show their hits"
    assert "no answer" not in html
    for kind in ("photo", "text", "photo + text", "text + filters"):
        assert f"<div class='kind'>{kind}</div>" in html
    assert not re.search(r"src='(?!data:)", html), "the report must be self-contained"
    assert not re.search(r"https?://", html), "nothing the demo served outlives it: no links"
    assert "<div class='legend'>Scores are cosine similarities" in html
    # The before/after table of the fitted model, with numbers for both.
    assert "The fusion model, fitted to this catalog" in html
    assert len(re.findall(r"<td>[01]\.\d{3}</td>", html)) >= 24
    # Each hit says which view ranked it: a photo query by image, photo + text by fused.
    assert "<span class='ranked'>i " in html and "<span class='ranked'>f " in html
