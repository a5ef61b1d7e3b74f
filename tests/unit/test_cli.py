"""The `loupe` command as a person meets it: help, versions, one-line errors, client-side work.

None of these needs a broker: each checks what happens before one is reached, or that a missing
one is reported properly (against a loopback port nothing listens on).
"""

from __future__ import annotations

import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from loupe import __version__
from loupe.cli import main, service_cmds
from loupe.cli.common import LIBRARY_LOGGERS, configure_logging
from loupe.client import PhotoUnusable, parse_filters, shrink_photo
from loupe.schemas import export
from loupe.schemas.common import MAX_INLINE_IMAGE_BYTES


@pytest.fixture
def closed_port(monkeypatch) -> str:
    """LOUPE_BOOTSTRAP_SERVERS pointing at a loopback port with no listener."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", address)
    return address


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"loupe, version {__version__}"


def test_help_shows_defaults_and_the_settings_a_command_reads(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "[default: all]" in out
    assert "LOUPE_BOOTSTRAP_SERVERS" in out and "default: 127.0.0.1:9092" in out


@pytest.mark.parametrize(
    "argv", [["-v", "schemas", "export", "--check"], ["schemas", "export", "--check", "-v"]]
)
def test_verbose_works_before_and_after_the_command(argv, capsys):
    assert main(argv) == 0
    assert "match the models" in capsys.readouterr().out


def test_a_bad_filter_is_one_line_naming_it(capsys, closed_port):
    assert main(["search", "--text", "ring", "--filter", "price_max=abc"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "filter price_max: 'abc' is not a number" in line


def test_bad_usage_is_one_line_with_where_to_look(capsys):
    assert main(["search"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "give a photo (--image or --image-url), --text, or both" in line
    assert "loupe search --help" in line


def test_search_without_a_broker_names_the_setting_quickly(capsys, closed_port):
    started = time.monotonic()
    assert main(["search", "--text", "ring"]) == 2
    assert time.monotonic() - started < 10
    line = _one_line_error(capsys.readouterr().err)
    assert f"no Kafka broker answers at {closed_port}" in line
    assert "LOUPE_BOOTSTRAP_SERVERS" in line


def test_serve_without_a_broker_names_the_setting(capsys, closed_port, monkeypatch):
    monkeypatch.setattr(service_cmds, "SERVE_BROKER_WAIT_S", 0.5)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    line = _one_line_error(err)
    assert f"no Kafka broker answers at {closed_port} (LOUPE_BOOTSTRAP_SERVERS" in line


def test_publish_validate_reports_line_numbers_and_sends_nothing(tmp_path, capsys, closed_port):
    good = json.loads((export.JSON_DIR.parent / "examples" / "product.upserted.json").read_text())
    lines = [json.dumps(good), "[1, 2]", "", '{"type": "product.upserted"}', "{not json"]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    # No broker is reachable (closed_port): --validate must not need one.
    assert main(["publish", "--validate", str(events)]) == 1
    out, err = capsys.readouterr()
    assert "1 valid (1 product events, 0 search requests), 3 invalid; nothing sent" in out
    assert f"{events}:2: invalid: expected a JSON object (an event), got a JSON list" in err
    assert f"{events}:4: invalid: invalid product event" in err
    assert f"{events}:5: invalid:" in err and "not valid JSON" in err


def test_publish_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["publish", str(tmp_path / "nope.jsonl")]) == 2
    assert "No such file or directory" in _one_line_error(capsys.readouterr().err)


def _phone_photo(width: int, height: int, orientation: int) -> bytes:
    """A noisy (so: large) JPEG as a phone writes it: pixels stored sideways, EXIF says so."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image).copy()
    pixels[: height // 2, :, 0] = 255  # a red top half (as stored) to check the orientation
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, exif=exif)
    return out.getvalue()


def test_a_phone_photo_is_shrunk_upright_under_the_inline_limit():
    photo = _phone_photo(4000, 3000, orientation=6)  # stored landscape, shown portrait
    assert len(photo) > 3 * MAX_INLINE_IMAGE_BYTES
    shrunk = shrink_photo(photo)
    assert len(shrunk) <= MAX_INLINE_IMAGE_BYTES
    image = Image.open(io.BytesIO(shrunk))
    assert image.size == (768, 1024)  # rotated upright, long side 1024
    assert image.getexif().get(0x0112, 1) == 1
    # Orientation 6 turns the stored top edge to the right: the red half is now on the right.
    array = np.asarray(image.convert("RGB")).astype(int)
    right, left = array[:, 400:, 0].mean(), array[:, :368, 0].mean()
    assert right > left + 60


def test_a_small_upright_jpeg_is_sent_as_it_is():
    photo = _phone_photo(300, 200, orientation=1)
    assert shrink_photo(photo) == photo


def test_a_file_that_is_not_an_image_is_refused_by_name():
    with pytest.raises(PhotoUnusable, match=r"ring\.jpg is not an image"):
        shrink_photo(b"<html>not a photo</html>", name="ring.jpg")


def test_filters_become_the_contracts_filters():
    filters = parse_filters(["category=ring", "category=band", "price_max=5000", "stone=ruby"])
    assert filters.category == ["ring", "band"]
    assert filters.price_max == 5000.0
    assert filters.attributes == {"stone": "ruby"}


def test_collections_and_rollback_say_what_there_is(tmp_path, capsys, monkeypatch):
    from loupe.consumers.index.catalog import Catalog, CollectionCard, ModelCard
    from loupe.consumers.index.edge import EdgeStore
    from loupe.encoders.profile import ModelProfile

    monkeypatch.setenv("LOUPE_STATE_DIR", str(tmp_path))
    assert main(["collections"]) == 0
    assert "no collections yet" in capsys.readouterr().out
    assert main(["reindex", "--rollback"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    catalog = Catalog(EdgeStore(path=str(tmp_path / "edge-index")))
    for version, live in (("old", False), ("new", True)):
        index = catalog.open(version)
        index.ensure_collection({"image": 4, "text": 4, "fused": 8})
        if live:
            catalog.store.switch_alias(index.collection)
        state = "live" if live else "retired"
        card = CollectionCard(ModelCard.of(ModelProfile(), version), state)
        catalog.write_card(index.collection, card)
        index.close()
    assert main(["collections"]) == 0
    out = capsys.readouterr().out
    assert "* loupe__new\n    state live" in out and "  loupe__old\n    state retired" in out
    assert main(["reindex", "--rollback", "--grace-s", "60"]) == 0
    assert "rolled back: loupe -> loupe__old (was loupe__new)" in capsys.readouterr().out
    assert main(["collections"]) == 0
    assert "* loupe__old" in capsys.readouterr().out


@pytest.fixture
def restore_logging():
    import logging

    names = ("", *LIBRARY_LOGGERS)
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_library_loggers_keep_their_warnings_only_unless_verbose(restore_logging, capsys):
    import logging

    configure_logging()
    # httpx logs every request to a Qdrant server at INFO (an alias poll every 2 s).
    assert all(logging.getLogger(n).level == logging.WARNING for n in LIBRARY_LOGGERS)
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert main(["-v", "--version"]) == 0
    assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)


def test_an_answer_from_a_part_of_the_photo_says_which_part():
    from datetime import UTC, datetime

    from loupe.client import describe_answer
    from loupe.schemas.search import HitScores, PhotoRegion, SearchCompleted, SearchHit

    hit = SearchHit(
        product_id="p1",
        merchant_id="m",
        score=0.8,
        scores=HitScores(image=0.8),
        title="Gold ring",
        region=PhotoRegion(left=0.25, top=0.5, width=0.4, height=0.3),
    )
    answer = SearchCompleted(
        request_id="r1", status="ok", hits=[hit], model_version="m", took_ms=12.0,
        completed_at=datetime(2026, 12, 7, tzinfo=UTC),
    )  # fmt: skip
    lines = describe_answer(answer)
    assert "Gold ring" in lines[2]
    assert lines[-1] == (
        "matched the part of the photo 25% from its left and 50% from its top, 40% of its width "
        "by 30% of its height"
    )
    whole = answer.model_copy(update={"hits": [hit.model_copy(update={"region": None})]})
    assert len(describe_answer(whole)) == 3


def test_models_says_how_many_passes_a_photo_query_costs(monkeypatch):
    from loupe.cli.model_cmds import query_parts_summary
    from loupe.consumers.settings import Settings

    default = query_parts_summary(Settings())
    assert "4 parts around its product (0.3, 0.4, 0.5, 0.6 of its square), 5 passes" in default
    monkeypatch.setenv("LOUPE_QUERY_REGION_SHARES", "0.4")
    assert "one part around its product (0.4 of its square), 2 passes" in query_parts_summary(
        Settings()
    )
    monkeypatch.setenv("LOUPE_QUERY_REGIONS", "false")
    assert query_parts_summary(Settings()).startswith("the whole photo, one pass")
