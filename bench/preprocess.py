"""Which square-fitting transform suits jewelry photos? Measured, not assumed.

1. Geometry: how much of the product (non-white pixels) an ImageNet centre crop cuts away.
2. Retrieval: image-only search with each transform, catalog photos as the index and simulated
   phone photos of the same products as queries (own product's rank), plus leave-one-out
   nearest-neighbour category accuracy on the catalog.

    .venv/bin/python -m bench.preprocess
    .venv/bin/python -m bench.preprocess --fits pad --precisions fp32,bf16   # precision's cost
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from bench.cli import summary
from loupe.dev.catalog import load_catalog
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.evaluation.photos import nearest_category_accuracy
from loupe.evaluation.simulators import phone_photo

FITS = ("pad", "center_crop", "squash")


def foreground_loss(path) -> tuple[float, bool]:
    """Share of the product's pixels outside the centre crop, and whether it touches the edge."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    mask = rgb.min(axis=2) < 235  # (H, W): not the white backdrop
    height, width = mask.shape
    short = min(height, width)
    side = int(short * 0.875)  # Resize(256) + CenterCrop(224) keeps 87.5% of the short side
    top, left = (height - side) // 2, (width - side) // 2
    inside = mask[top : top + side, left : left + side].sum()
    total = max(1, mask.sum())
    edge = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
    return 1.0 - inside / total, bool(edge)


def ranks(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Rank (1 = first) of query i's own item i among all index items, by cosine."""
    scores = queries @ index.T  # (Q, N)
    own = scores[np.arange(len(queries)), np.arange(len(queries))][:, None]
    return (scores > own).sum(axis=1) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--limit", type=int, default=None, help="use only the first N products")
    parser.add_argument("--fits", default=",".join(FITS), help="comma-separated fits to compare")
    parser.add_argument("--precisions", default="auto", help="comma-separated: fp32, bf16, ...")
    args = parser.parse_args()
    catalog = load_catalog()[: args.limit]
    losses = [foreground_loss(p.image_path) for p in catalog]
    cut = np.array([loss for loss, _ in losses])
    print(f"catalog photos: {len(catalog)}")
    print(
        f"centre crop cuts away: mean {cut.mean():.1%} of the product's pixels, "
        f">1% of it in {np.mean(cut > 0.01):.0%} of photos, >5% in {np.mean(cut > 0.05):.0%} "
        f"(worst {cut.max():.1%}); product touches the frame edge in "
        f"{np.mean([e for _, e in losses]):.0%}"
    )
    catalog_bytes = [p.image_path.read_bytes() for p in catalog]
    query_bytes = [phone_photo(data, seed=i) for i, data in enumerate(catalog_bytes)]
    labels = [p.category for p in catalog]
    print(
        f"\n{'fit':<12} {'precision':<9} {'top-1':>6} {'top-10':>7} {'MRR':>6} "
        f"{'LOO category':>13} {'s':>6}"
    )
    runs = [(f, p) for f in args.fits.split(",") for p in args.precisions.split(",")]
    for fit, precision in runs:
        started = time.perf_counter()
        encoder = FusedEncoder.from_profile(ModelProfile(fit=fit, precision=precision))
        index = np.stack(
            [
                e.vectors["image"]
                for e in encoder.encode_queries([EncodeInput(image=b) for b in catalog_bytes])
            ]
        )
        queries = np.stack(
            [
                e.vectors["image"]
                for e in encoder.encode_queries([EncodeInput(image=b) for b in query_bytes])
            ]
        )
        r = ranks(index, queries)
        category = nearest_category_accuracy(index, labels)
        print(
            f"{fit:<12} {precision:<9} {np.mean(r == 1):>6.1%} {np.mean(r <= 10):>7.1%} "
            f"{np.mean(1 / r):>6.3f} {category:>13.1%} {time.perf_counter() - started:>6.1f}"
        )
        encoder.close()


if __name__ == "__main__":
    main()
