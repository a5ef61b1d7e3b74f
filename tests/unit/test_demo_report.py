"""The demo report marks the part of a shopper's photo that Loupe matched, where a part did."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from PIL import Image

from loupe.demo.report import DemoQuery, render_report
from loupe.schemas.search import HitScores, PhotoRegion, SearchCompleted, SearchHit


def _photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (400, 300), "tan").save(out, "JPEG")
    return out.getvalue()


def _answered(region: PhotoRegion | None) -> DemoQuery:
    hit = SearchHit(
        product_id="p1", merchant_id="m", score=0.7, scores=HitScores(image=0.7),
        title="Gold ring", region=region,
    )  # fmt: skip
    response = SearchCompleted(
        request_id="r1", status="ok", hits=[hit], model_version="m", took_ms=5.0,
        completed_at=datetime(2026, 12, 7, tzinfo=UTC),
    )  # fmt: skip
    return DemoQuery("photo of a scene", "a ring on a table", photo=_photo(), response=response)


def test_the_matched_part_is_framed_on_the_query_photo():
    region = PhotoRegion(left=0.25, top=0.5, width=0.4, height=0.3)
    html = render_report([_answered(region), _answered(None)], {"p1": ""}, {"searches": "2"})
    assert html.count("class='region'") == 1
    assert "style='left:25.0%;top:50.0%;width:40.0%;height:30.0%'" in html
    assert html.count("<div class='photo'>") == 2
