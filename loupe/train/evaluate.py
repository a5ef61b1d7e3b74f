"""Retrieval quality of a fusion model on a catalog's cached features.

The index holds every product of the catalog (seen in training or not: a merchant's index has
them all). Each product is asked for three ways: a simulated shopper photo (``photo``), that
photo plus a short query text (``photo+text``), and the text alone (``text``). For a photo the
measure is where its own product ranks (recall@1, recall@10); for every kind, how many of the
top ten share the product's category (category precision@10). A text names a kind of product,
not one product, so it has no recall. A photo + text query is ranked as the service ranks it:
the image view's best match first, then the fused view's ranking (``loupe/ranking.py``).
A photo is ranked by the image view, or, given a ``photo_kind_weight``, as the service ranks it
with ``LOUPE_PHOTO_KIND_WEIGHT`` (the best match first, then its kind: ``ranking.kind_kept``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from loupe.encoders.fusion import FusionModel
from loupe.ranking import KIND_CANDIDATES, anchored, best_scores, kind_kept

KINDS = ("photo", "photo+text", "text")
TOP_K = 10


@dataclass(frozen=True)
class RetrievalScores:
    recall_at_1: float | None  # share of queries whose own product ranks first
    recall_at_10: float | None  # ... within the top ten
    category_p10: float | None  # mean share of the top ten in the query's category
    queries: int

    def as_dict(self) -> dict:
        return asdict(self)


def retrieval_scores(
    queries: np.ndarray,
    index: np.ndarray,
    *,
    recall: bool,
    categories: np.ndarray | None,
    rows: np.ndarray,
    anchors: np.ndarray | None = None,
    kind: tuple[float, np.ndarray] | None = None,
    parts: np.ndarray | None = None,
    chunk: int = 256,
) -> RetrievalScores:
    """``queries`` ``(Q, D)``, query ``j`` about product ``rows[j]``, against ``index``
    ``(N, D)`` unit vectors, ``chunk`` queries at a time (a 100k catalog's score matrix would
    not fit). ``recall`` False for text queries. ``anchors[j]``: the product ranked first
    whatever the scores (a photo + text query's image view best match). ``kind``: ``(weight,
    fused)``, the products' fused-view vectors ``(N, Df)``: the top ten re-ranked after the best
    match by ``ranking.kind_kept``, as the service ranks a photo alone. ``parts``: ``(Q, k, D)``,
    the parts of each query's photo; each product then scores its closest part's score
    (``ranking.best_scores``), as the service ranks a photo."""
    if kind is not None and kind[0] > 0:
        return _kind_kept_scores(
            queries, index, kind, categories=categories, rows=rows, parts=parts
        )
    if parts is not None:  # a chunk's part scores are k times its whole's
        chunk = max(1, chunk // (1 + parts.shape[1]))
    ranks, precisions = [], []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]  # the products asked for
        scores = _scores(queries, parts, index, start, start + chunk)  # (q, N)
        first = None if anchors is None else anchors[start : start + chunk]
        if recall:
            own = scores[np.arange(len(part)), part][:, None]  # (q, 1)
            rank = (scores > own).sum(axis=1) + 1  # ties favour the own product
            if first is not None:  # the anchor moves to the front: own shifts back unless it
                ahead = scores[np.arange(len(part)), first] > own[:, 0]  # was already behind it
                rank = np.where(first == part, 1, rank + 1 - ahead)
            ranks.append(rank)
        if categories is not None:
            k = min(TOP_K, scores.shape[1])
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (q, 10), unordered
            if first is not None:
                order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
                top = np.array(
                    [
                        anchored(list(np.take(row, ranked)), a, k)
                        for row, ranked, a in zip(top, order, first, strict=True)
                    ]
                )
            precisions.append((categories[top] == categories[part][:, None]).mean(axis=1))
    recall_1 = recall_10 = precision = None
    if recall and ranks:
        rank = np.concatenate(ranks)
        recall_1, recall_10 = float(np.mean(rank == 1)), float(np.mean(rank <= TOP_K))
    if precisions:
        precision = float(np.mean(np.concatenate(precisions)))
    return RetrievalScores(recall_1, recall_10, precision, len(rows))


def _kind_kept_scores(
    queries: np.ndarray,
    index: np.ndarray,
    kind: tuple[float, np.ndarray],
    *,
    categories: np.ndarray | None,
    rows: np.ndarray,
    parts: np.ndarray | None = None,
) -> RetrievalScores:
    """``retrieval_scores`` of photos ranked by ``ranking.kind_kept`` over the image view's top
    ``KIND_CANDIDATES``, a query at a time (the service's ranking, item by item)."""
    weight, fused = kind
    ranks, precisions = [], []
    for j, product in enumerate(rows):
        scores = _scores(queries, parts, index, j, j + 1)[0]  # (N,)
        n = min(KIND_CANDIDATES, len(scores))
        candidates = np.argpartition(-scores, n - 1)[:n]
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
        top = kind_kept(
            list(candidates),
            TOP_K,
            weight,
            score=lambda r, scores=scores: float(scores[r]),
            fused=lambda r: fused[r],
        )
        if product in top:
            ranks.append(top.index(product) + 1)
        else:  # behind the ten shown, wherever the image view had it
            ranks.append(max(int((scores > scores[product]).sum()) + 1, TOP_K + 1))
        if categories is not None:
            precisions.append(float(np.mean(categories[top] == categories[product])))
    rank = np.asarray(ranks)
    precision = float(np.mean(precisions)) if precisions else None
    if not len(rank):
        return RetrievalScores(None, None, precision, 0)
    return RetrievalScores(
        float(np.mean(rank == 1)), float(np.mean(rank <= TOP_K)), precision, len(rows)
    )


@torch.inference_mode()
def evaluate(
    model: FusionModel,
    catalog_image: torch.Tensor,
    catalog_text: torch.Tensor,
    photo: torch.Tensor,
    query_text: torch.Tensor,
    categories: np.ndarray | None,
    rows: np.ndarray,
    *,
    anchor: bool = True,
    photo_kind_weight: float = 0.0,
    regions: torch.Tensor | None = None,
) -> dict[str, RetrievalScores]:
    """Scores per query kind. Tensors are the frozen towers' vectors, row ``i`` = product ``i``:
    ``catalog_image`` ``(N, Di)``, ``catalog_text`` ``(N, Dt)``, the evaluation ``photo`` ``(N,
    Di)`` and ``query_text`` ``(N, Dt)``. ``anchor`` False ranks photo + text by the fused view
    alone (the ablation). ``photo_kind_weight``: photos ranked as the service ranks them with
    ``LOUPE_PHOTO_KIND_WEIGHT`` (``ranking.kind_kept``). ``regions``: ``(N, k, Di)``, the parts
    of each photo where its product may be; each product then scores its closest part's score,
    the whole photo's included, as the service ranks it (``ranking.best_of``)."""
    model.eval()
    catalog_image, catalog_text = catalog_image.float(), catalog_text.float()
    photo, query_text = photo[rows].float(), query_text[rows].float()
    index = {
        "photo": model.image(catalog_image),
        "photo+text": model(catalog_image, catalog_text),
        "text": model.text(catalog_text),
    }
    asked = {  # row j is about product rows[j]
        "photo": model.image(photo),
        "photo+text": model(photo, query_text),
        "text": model.text(query_text),
    }
    asked = {kind: vectors.float().cpu().numpy() for kind, vectors in asked.items()}
    index = {kind: vectors.float().cpu().numpy() for kind, vectors in index.items()}
    parts = None
    if regions is not None:
        parts = model.image(regions[rows].float()).float().cpu().numpy()  # (Q, k, D)
    anchors = _best_matches(asked["photo"], parts, index["photo"]) if anchor else None
    return {
        kind: retrieval_scores(
            asked[kind],
            index[kind],
            recall=kind != "text",
            categories=categories,
            rows=rows,
            anchors=anchors if kind == "photo+text" else None,
            kind=(photo_kind_weight, index["photo+text"]) if kind == "photo" else None,
            parts=parts if kind == "photo" else None,
        )
        for kind in KINDS
    }


def scores_from_record(record: dict) -> dict[str, dict[str, RetrievalScores]]:
    """Scores back from a training record (a checkpoint's metadata): split -> kind -> scores."""
    return {
        split: {kind: RetrievalScores(**values) for kind, values in kinds.items()}
        for split, kinds in record.items()
    }


def _scores(
    queries: np.ndarray, parts: np.ndarray | None, index: np.ndarray, start: int, stop: int
) -> np.ndarray:
    """``(q, N)`` scores of queries ``start:stop``: their whole photos' or, given their
    ``parts``, each product's closest part's (``ranking.best_scores``)."""
    scores = queries[start:stop] @ index.T
    if parts is None:
        return scores
    return best_scores(scores, parts[start:stop] @ index.T)


def _best_matches(
    queries: np.ndarray, parts: np.ndarray | None, index: np.ndarray, chunk: int = 64
) -> np.ndarray:
    """The index row each query (with its ``parts``, if any) scores highest, ``chunk`` queries
    at a time."""
    if not len(queries):
        return np.empty(0, dtype=np.int64)
    return np.concatenate(
        [
            _scores(queries, parts, index, i, i + chunk).argmax(axis=1)
            for i in range(0, len(queries), chunk)
        ]
    )


def _cell(value: float | None) -> str:
    return "    -" if value is None else f"{value:.3f}"


def scores_table(columns: dict[str, dict[str, dict[str, RetrievalScores]]]) -> str:
    """A text table: one row per (split, query kind), one group of R@1 / R@10 / P@10 columns
    per model (``columns``: model label -> split -> kind -> scores)."""
    labels = list(columns)
    splits = [s for s in ("seen", "held_out") if any(s in c for c in columns.values())]
    width = 23
    head = f"{'products':<9} {'query':<11}" + "".join(f" | {label:^{width}}" for label in labels)
    sub = f"{'':<9} {'':<11}" + " | {:>7} {:>7} {:>7}".format("R@1", "R@10", "P@10") * len(labels)
    lines = [head, sub, "-" * len(sub)]
    for split in splits:
        for kind in KINDS:
            row = f"{split.replace('_', '-'):<9} {kind:<11}"
            for label in labels:
                s = columns[label].get(split, {}).get(kind)
                cells = (s.recall_at_1, s.recall_at_10, s.category_p10) if s else (None,) * 3
                row += " | " + " ".join(f"{_cell(c):>7}" for c in cells)
            lines.append(row)
    return "\n".join(lines)
