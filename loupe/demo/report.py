"""The demo's HTML report: one self-contained file (thumbnails inlined as data URIs)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

from PIL import Image

from loupe.schemas.search import SearchCompleted


@dataclass
class DemoQuery:
    kind: str  # "photo", "text", "photo + text", "text + filters"
    description: str
    photo: bytes | None = None
    text: str | None = None
    filters: dict = field(default_factory=dict)
    expected_product_id: str | None = None  # for photos of a catalog product
    response: SearchCompleted | None = None
    latency_ms: float | None = None

    def expected_rank(self) -> int | None:
        if self.response is None or self.expected_product_id is None:
            return None
        for rank, hit in enumerate(self.response.hits, start=1):
            if hit.product_id == self.expected_product_id:
                return rank
        return None


def format_filters(filters: dict) -> str:
    return ", ".join(
        f"{k} = {' or '.join(v) if isinstance(v, list) else f'{v:g}'}" for k, v in filters.items()
    )


def thumbnail(data: bytes, side: int = 160) -> str:
    """A small JPEG data URI of an image."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{margin-bottom:.2rem} .muted{color:#666}
.summary{display:flex;gap:2rem;flex-wrap:wrap;background:#f6f6f4;padding:1rem;border-radius:8px}
.summary div b{display:block;font-size:1.4rem}
.query{display:flex;gap:1.5rem;border-top:1px solid #ddd;padding:1.2rem 0;align-items:flex-start}
.ask{width:190px;flex:none} .ask img{width:170px;border:1px solid #ccc;border-radius:6px;
  display:block}
.photo{position:relative;width:170px} .region{position:absolute;border:2px dashed #e76f51;
  box-sizing:border-box;border-radius:3px}
.hits{display:flex;gap:.8rem;flex-wrap:wrap}
.hit{width:170px;font-size:.82rem} .hit img{width:160px;height:160px;object-fit:contain;
  border:1px solid #e3e3e3;border-radius:6px;background:#fff}
.hit.expected img{border:3px solid #2a9d4b}
.scores{font-family:ui-monospace,monospace;color:#555} .scores span{white-space:nowrap}
.kind{font-weight:600}
.err{color:#b00020}
.legend{font-size:.85rem;background:#fbfbfa;border:1px solid #eee;border-radius:8px;
  padding:.6rem 1rem;margin:1rem 0} .legend b{font-family:ui-monospace,monospace}
.ranked{font-weight:700;color:#222}
.quality{border-collapse:collapse;margin:.5rem 0 1rem}
.quality td,.quality th{padding:.2rem .6rem;text-align:right;border-bottom:1px solid #eee}
.details{font-size:.8rem;color:#666;overflow-wrap:anywhere;margin-top:.5rem}
"""

VIEW_LEGEND = [
    ("image", "photo against photo: how alike the product looks"),
    ("text", "words against the product's title and attributes"),
    ("fused", "photo and words together against the product's photo and text"),
]


def _scores_html(hit_scores: dict[str, float | None], ranked_by: str | None) -> str:
    cells = []
    for view, _ in VIEW_LEGEND:
        value = hit_scores.get(view)
        shown = "&ndash;" if value is None else f"{value:.2f}"
        css = " class='ranked'" if view == ranked_by else ""
        cells.append(f"<span{css}>{view[0]} {shown}</span>")
    return " · ".join(cells)


def _photo_html(query: DemoQuery) -> str:
    """The query photo, with a frame on the part of it Loupe matched, where a part did."""
    hits = query.response.hits if query.response is not None else []
    region = hits[0].region if hits else None
    frame = ""
    if region is not None:
        box = (region.left, region.top, region.width, region.height)
        left, top, width, height = (f"{100 * v:.1f}%" for v in box)
        frame = (
            f"<span class='region' style='left:{left};top:{top};width:{width};height:{height}'"
            " title='the part of the photo Loupe matched'></span>"
        )
    return (
        f"<div class='photo'><img src='{thumbnail(query.photo, 340)}' alt='query photo'>"
        f"{frame}</div>"
    )


def ranking_view(query: DemoQuery) -> str:
    """The view Loupe ranks a query by: fused for photo + text, else the one it has."""
    if query.photo and query.text:
        return "fused"
    return "image" if query.photo else "text"


def quality_table(quality: dict[str, dict]) -> str:
    """Before/after retrieval metrics of the fusion model as an HTML table."""
    labels = list(quality)
    head = "".join(f"<th colspan='3'>{html.escape(label)}</th>" for label in labels)
    sub = "<th>R@1</th><th>R@10</th><th>P@10</th>" * len(labels)
    rows = []
    for split in ("seen", "held_out"):
        for kind in ("photo", "photo+text", "text"):
            cells = ""
            for label in labels:
                scores = quality[label].get(split, {}).get(kind, {})
                for name in ("recall_at_1", "recall_at_10", "category_p10"):
                    value = scores.get(name)
                    cells += f"<td>{'&ndash;' if value is None else f'{value:.3f}'}</td>"
            where = "trained on" if split == "seen" else "held out"
            rows.append(f"<tr><td>{where}</td><td>{kind}</td>{cells}</tr>")
    return (
        "<h2>The fusion model, fitted to this catalog</h2>"
        "<p class='muted'>One held-back photo of every product from training's own "
        "simulator, never trained on and harder than the demo's shoppers (some crops cut the "
        "product): a yardstick of what training changed, searched against the whole catalog. "
        "<code>python -m bench.quality</code> judges the model with simulators training never "
        "sees (docs/training.md). R@1 / R@10: the photographed "
        "product ranks first / in the top ten. P@10: share of the top ten in its category. "
        "Held-out products were never trained on: they stand for products added later.</p>"
        f"<table class='quality'><tr><th></th><th></th>{head}</tr>"
        f"<tr><th>products</th><th>query</th>{sub}</tr>{''.join(rows)}</table>"
    )


def render_report(
    queries: list[DemoQuery],
    thumbnails: dict[str, str],
    summary: dict[str, str],
    title: str = "Loupe demo: visual search on a real jewelry catalog",
    details: dict[str, str] | None = None,
    quality: dict[str, dict] | None = None,
) -> str:
    """``thumbnails`` maps product_id to a data URI; ``summary`` holds a few short headline
    numbers (label -> value); ``details`` longer facts (the model version) in small print. The
    file links nowhere: everything the demo served is gone once it ends. ``quality``: model
    label -> split -> query kind -> scores (``RetrievalScores.as_dict``), shown as a table."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='muted'>Each row is one search request sent through Kafka; the hits are the "
        "top results Loupe returned.</p>",
        "<div class='summary'>",
    ]
    for label, value in summary.items():
        parts.append(f"<div>{html.escape(label)}<b>{html.escape(value)}</b></div>")
    parts.append("</div>")
    if details:
        shown = "; ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in details.items())
        parts.append(f"<div class='details'>{shown}</div>")
    if quality:
        parts.append(quality_table(quality))
    parts.append(
        "<div class='legend'>Scores are cosine similarities (1 is identical), one per view: "
        + "; ".join(f"<b>{view[0]}</b> = {view}, {what}" for view, what in VIEW_LEGEND)
        + ". The view the hits are ranked by is in <span class='ranked'>bold</span>; "
        "'&ndash;' where the query has no such view. A green frame marks the product the shopper "
        "photographed; a dashed frame on a shopper's photo, the part of it Loupe matched "
        "(where the product lies in a wider scene).</div>"
    )
    for query in queries:
        parts.append("<div class='query'><div class='ask'>")
        parts.append(f"<div class='kind'>{html.escape(query.kind)}</div>")
        if query.photo:
            parts.append(_photo_html(query))
        if query.text:
            parts.append(f"<p>&ldquo;{html.escape(query.text)}&rdquo;</p>")
        if query.filters:
            shown = format_filters(query.filters)
            parts.append(f"<p class='muted'>filters: {html.escape(shown)}</p>")
        parts.append(f"<p class='muted'>{html.escape(query.description)}</p>")
        if query.latency_ms is not None:
            parts.append(f"<p class='muted'>answered in {query.latency_ms:.0f} ms</p>")
        parts.append("</div><div class='hits'>")
        response = query.response
        if response is None:
            parts.append("<p class='err'>no answer</p>")
        elif response.status == "error":
            message = f"{response.error.code}: {response.error.message}"
            parts.append(f"<p class='err'>{html.escape(message)}</p>")
        else:
            for rank, hit in enumerate(response.hits[:5], start=1):
                expected = " expected" if hit.product_id == query.expected_product_id else ""
                scores = _scores_html(hit.scores.model_dump(), ranking_view(query))
                price = f"{hit.price.amount} {hit.price.currency}" if hit.price else ""
                image = thumbnails.get(hit.product_id, "")
                parts.append(
                    f"<div class='hit{expected}'><img src='{image}' alt=''>"
                    f"<div>#{rank} {html.escape(hit.title)}</div>"
                    f"<div class='muted'>{html.escape(price)}</div>"
                    f"<div class='scores'>{scores}</div></div>"
                )
            if not response.hits:
                parts.append("<p class='muted'>no products match</p>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
