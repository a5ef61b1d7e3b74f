"""The embedded engines side by side at catalog scale: build rate, search latency (unfiltered
and filtered), recall@10 against exact search, time to reopen.

    .venv/bin/python -m bench.index_scale --points 10000 [--engines edge,qdrant-local]
    .venv/bin/python -m bench.index_scale --points 1000000 --engines edge --optimize \
        --acorn off --hnsw-ef 64,128 --quantization int8      # about an hour on 2 cores

Points are synthetic with the real model's dimensions (image 1280, text 384, fused 1664) and
realistic payloads (merchant, category, material, price). Like real embeddings they are
clustered: groups of about 50 products around a centre (cosine about 0.8 to it), the group's
category shared; a query is a perturbed copy of a stored point (cosine about 0.9 to it), as a
shopper's photo is of a product, so its true neighbours are its product and its group. (I.i.d.
random vectors have no neighbourhoods: the exact top ten of a query are near-ties that no
approximate index can find, and an HNSW recall measured on them means nothing.) Exact top-10
comes from numpy.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cli import summary
from bench.harness import percentiles
from loupe.consumers.index.edge import EdgeIndex
from loupe.consumers.index.interface import (
    DEFAULT_HNSW_EF,
    DEFAULT_QUANTIZATION,
    QUANTIZATIONS,
    IndexPoint,
    IndexQuery,
)
from loupe.consumers.index.qdrant import QdrantIndex
from loupe.schemas.search import SearchFilters

DIMS = {"image": 1280, "text": 384, "fused": 1664}
CATEGORIES = ("ring", "earring", "necklace", "pendant", "bangle", "bracelet")
ENGINES = {
    "edge": lambda path, quantization: EdgeIndex(
        model_version="bench", path=path, quantization=quantization
    ),
    "qdrant-local": lambda path, quantization: QdrantIndex(model_version="bench", path=path),
}


GROUP_SIZE = 50  # products per group of look-alikes
SPREAD = 0.75  # a product's offset from its group's centre (cosine to it about 0.8)
QUERY_NOISE = 0.5  # a query's offset from its product (cosine about 0.9)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, groups: np.ndarray, dim: int) -> np.ndarray:
    """Unit vectors around one random centre per group, built in chunks (bounded memory)."""
    centres = _unit(rng.standard_normal((int(groups.max()) + 1, dim)))
    out = np.empty((len(groups), dim), dtype=np.float32)
    for start in range(0, len(groups), 65_536):
        out[start : start + 65_536] = _around(rng, centres, groups[start : start + 65_536])
    return out


def _around(rng: np.random.Generator, centres: np.ndarray, groups: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal((len(groups), centres.shape[1])).astype(np.float32)
    return _unit(centres[groups] + SPREAD * noise / centres.shape[1] ** 0.5)


class _Views:
    """The points' vectors. The image view, which the queries search, is held whole (exact
    search needs it); the text and fused views are made per upsert batch from their groups'
    centres and a seed per batch, so a million points need 5 GB here, not 13."""

    def __init__(self, rng: np.random.Generator, groups: np.ndarray) -> None:
        self.groups = groups
        self.image = _clustered(rng, groups, DIMS["image"])
        self.centres = {
            view: _unit(rng.standard_normal((int(groups.max()) + 1, DIMS[view])))
            for view in DIMS
            if view != "image"
        }

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(start)
        part = self.groups[start:stop]
        other = {view: _around(rng, c, part) for view, c in self.centres.items()}
        return {"image": self.image[start:stop], **other}


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--engines", default="edge,qdrant-local")
    parser.add_argument("--batch", type=int, default=512, help="points per upsert")
    parser.add_argument(
        "--optimize", action="store_true", help="edge: build its HNSW index before searching"
    )
    parser.add_argument(
        "--hnsw-ef",
        default=str(DEFAULT_HNSW_EF),
        help="HNSW search breadths to measure, comma-separated (one row each; one build)",
    )
    parser.add_argument(
        "--acorn",
        default="on",
        choices=("on", "off", "both"),
        help="ACORN for filtered searches: on, off, or a row with each",
    )
    parser.add_argument(
        "--quantization",
        default=DEFAULT_QUANTIZATION,
        choices=QUANTIZATIONS,
        help="edge: int8 keeps an int8 copy in memory, float32 on disk (LOUPE_INDEX_QUANTIZATION)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    groups = rng.integers(0, max(args.points // GROUP_SIZE, 1), args.points)
    views = _Views(rng, groups)
    categories = groups % len(CATEGORIES)
    picks = rng.integers(0, args.points, args.queries)
    queries = _unit(
        views.image[picks] + QUERY_NOISE * rng.standard_normal((args.queries, 1280)) / 1280**0.5
    )
    exact = np.argsort(-(queries @ views.image.T), axis=1)[:, :10]
    # A filtered search asks for the photographed product's own category (a shopper who
    # photographs a ring and filters on rings): its true top ten are its look-alikes. Asked for
    # another category, its "true" neighbours would be near-ties at cosine ~0 that no
    # approximate index can rank, and the recall measured would mean nothing.
    asked = [CATEGORIES[c] for c in categories[picks]]
    members = {name: np.flatnonzero(categories == k) for k, name in enumerate(CATEGORIES)}
    exact_filtered = [
        members[a][np.argsort(-(views.image[members[a]] @ q))[:10]]
        for q, a in zip(queries, asked, strict=True)
    ]
    print(f"{args.points} points x {len(DIMS)} named vectors; {args.queries} queries")
    print(
        f"{'engine':<13} {'ef':>4} {'acorn':>5} {'upsert/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'filt p50':>8} "
        f"{'filt p99':>8} {'recall':>7} {'f.recall':>8} {'reopen s':>8} {'disk MB':>8} "
        f"{'RSS MB':>8}"
    )
    for name in args.engines.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            index = ENGINES[name](tmp, args.quantization)
            index.ensure_collection(DIMS)
            started = time.perf_counter()
            for start in range(0, args.points, args.batch):
                stop = min(start + args.batch, args.points)
                vectors = views.batch(start, stop)
                index.upsert(
                    [
                        IndexPoint(
                            merchant_id="m",
                            product_id=f"p{i}",
                            vectors={view: vectors[view][i - start] for view in DIMS},
                            payload={
                                "merchant_id": "m",
                                "product_id": f"p{i}",
                                "n": i,
                                "category": CATEGORIES[categories[i]],
                                "material": ("gold", "silver", "platinum")[i % 3],
                                "price": float(500 + (i * 37) % 200_000),
                            },
                        )
                        for i in range(start, stop)
                    ]
                )
            rate = args.points / (time.perf_counter() - started)
            built = 0.0
            if args.optimize and hasattr(index, "optimize"):
                started = time.perf_counter()
                index.optimize()
                built = time.perf_counter() - started
            breadths = [int(ef) for ef in args.hnsw_ef.split(",")]
            if name == "qdrant-local":  # exact search: the breadth changes nothing
                breadths = breadths[:1]
            # Untimed: the first searches after a build or an open page the index in.
            _searched(index, breadths[0], False, queries, asked)
            acorns = {"on": [True], "off": [False], "both": [False, True]}[args.acorn]
            if name == "qdrant-local":
                acorns = acorns[:1]
            rows = [
                ((ef, acorn), _searched(index, ef, acorn, queries, asked))
                for ef in breadths
                for acorn in acorns
            ]
            disk_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
            index.close()
            started = time.perf_counter()
            again = ENGINES[name](tmp, args.quantization)
            again.ensure_collection(DIMS)
            assert again.count() == args.points
            reopen = time.perf_counter() - started
            again.close()
        for (ef, acorn), (timings, found) in rows:
            recall = np.mean(
                [len(set(f) & set(e)) / 10 for f, e in zip(found["plain"], exact, strict=True)]
            )
            filtered_recall = np.mean(
                [
                    len(set(f) & set(e)) / 10
                    for f, e in zip(found["filtered"], exact_filtered, strict=True)
                ]
            )
            plain, filtered = percentiles(timings["plain"]), percentiles(timings["filtered"])
            print(
                f"{name:<13} {ef:>4} {'on' if acorn else 'off':>5} {rate:>9.0f} "
                f"{plain['p50']:>7.1f} {plain['p99']:>7.1f} "
                f"{filtered['p50']:>8.1f} {filtered['p99']:>8.1f} {recall:>7.3f} "
                f"{filtered_recall:>8.3f} {reopen:>8.1f} {disk_mb:>8.0f} {_peak_rss_mb():>8.0f}"
                + (f"  (optimize {built:.0f} s)" if built else "")
            )


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (the index's share grows with it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _searched(
    index, ef: int, acorn: bool, queries: np.ndarray, asked: list[str]
) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """Each query alone and within its ``asked`` category, at search breadth ``ef`` with ACORN
    on or off: the times (ms) and the products found."""
    index.store.hnsw_ef, index.store.acorn = ef, acorn
    timings: dict[str, list[float]] = {"plain": [], "filtered": []}
    found: dict[str, list[list[int]]] = {"plain": [], "filtered": []}
    for q, category in zip(queries, asked, strict=True):
        kinds = (("plain", SearchFilters()), ("filtered", SearchFilters(category=[category])))
        for kind, filters in kinds:
            t = time.perf_counter()
            hits = index.search_batch([IndexQuery("image", q, 10, "m", filters)])[0]
            timings[kind].append((time.perf_counter() - t) * 1000)
            found[kind].append([h.payload["n"] for h in hits])
    return timings, found


if __name__ == "__main__":
    main()
