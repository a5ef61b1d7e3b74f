"""One batched index call returns what the same searches return one by one (real embedded
Qdrant), each with its own view, scope, filters and size."""

from __future__ import annotations

import numpy as np

from loupe.consumers.index.interface import IndexPoint, IndexQuery
from loupe.consumers.index.qdrant import QdrantIndex
from loupe.schemas.search import SearchFilters

DIMS = {"image": 8, "text": 4, "fused": 12}


def test_a_batch_equals_its_searches_one_by_one(tmp_path):
    rng = np.random.default_rng(3)
    index = QdrantIndex(model_version="m1", path=str(tmp_path / "index"))
    index.ensure_collection(DIMS)
    index.upsert(
        [
            IndexPoint(
                merchant_id=("a", "b")[n % 2],
                product_id=f"p{n}",
                vectors={v: rng.standard_normal(d).astype(np.float32) for v, d in DIMS.items()},
                payload={
                    "merchant_id": ("a", "b")[n % 2],
                    "product_id": f"p{n}",
                    "category": ("ring", "bangle", "pendant")[n % 3],
                },
            )
            for n in range(60)
        ]
    )
    queries = [
        IndexQuery(view, rng.standard_normal(DIMS[view]).astype(np.float32), top_k, merchant, f)
        for view, top_k, merchant, f in (
            ("image", 5, None, SearchFilters()),
            ("text", 3, "a", SearchFilters()),
            ("fused", 7, None, SearchFilters(category=["ring"])),
            ("image", 4, "b", SearchFilters(category=["bangle", "pendant"])),
        )
    ]
    batched = index.search_batch(queries)
    alone = [index.search_batch([query])[0] for query in queries]
    index.close()
    assert [[h.id for h in hits] for hits in batched] == [[h.id for h in hits] for hits in alone]
    assert [len(hits) for hits in batched] == [5, 3, 7, 4]
    assert {h.payload["merchant_id"] for h in batched[1]} == {"a"}
    assert {h.payload["category"] for h in batched[2]} == {"ring"}
