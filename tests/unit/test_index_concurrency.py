"""Each embedded engine under concurrent writers and readers, as `serve --role all` uses it.

qdrant-client's local mode is not thread-safe: an upsert during a search raised IndexError in
its payload-mask code and killed the search thread (without QdrantIndex's lock this test
failed 3 times in 3). Both engines serialise every call.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from loupe.consumers.index.interface import IndexPoint, IndexQuery
from loupe.schemas.search import SearchFilters

DIMS = {"image": 8, "text": 4, "fused": 12}


def _point(n: int, rng: np.random.Generator) -> IndexPoint:
    vectors = {view: rng.standard_normal(dim).astype(np.float32) for view, dim in DIMS.items()}
    return IndexPoint(
        merchant_id="m",
        product_id=f"p{n}",
        vectors=vectors,
        payload={"merchant_id": "m", "product_id": f"p{n}", "category": ("ring", "bangle")[n % 2]},
        version=1,
    )


@pytest.mark.parametrize("engine", ["qdrant-local", "edge"])
def test_concurrent_upserts_deletes_and_searches_all_succeed(engine, tmp_path, index_engines):
    index = index_engines.handle(engine, str(tmp_path / "index"))
    index.ensure_collection(DIMS)
    errors: list[BaseException] = []
    searches = 0
    stop = threading.Event()

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return threading.Thread(target=run)

    def write() -> None:
        # At least 150 rounds, and on until the readers have overlapped it (a fast engine
        # finishes 150 rounds before the readers got going), at most 30 s.
        rng = np.random.default_rng(1)
        n, deadline = 0, time.monotonic() + 30
        while not stop.is_set() and (n < 150 or searches <= 100) and time.monotonic() < deadline:
            index.upsert([_point(n * 3 + k, rng) for k in range(3)])
            if n % 4 == 3:
                index.delete([_point(n * 3 - 6, rng).id])
            n += 1

    def search() -> None:
        nonlocal searches
        rng = np.random.default_rng(2)
        while not stop.is_set():
            for view, dim in DIMS.items():
                query = IndexQuery(
                    view,
                    rng.standard_normal(dim).astype(np.float32),
                    top_k=5,
                    merchant_id="m",
                    filters=SearchFilters(category=["ring"]),
                    with_vectors=[v for v in DIMS if v != view],
                )
                index.search_batch([query])
                searches += 1

    writer, readers = guarded(write), [guarded(search) for _ in range(2)]
    for thread in [writer, *readers]:
        thread.start()
    writer.join(120)
    stop.set()
    for thread in readers:
        thread.join(30)
    index.close()
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    assert searches > 100, "the readers must actually have overlapped the writer"
