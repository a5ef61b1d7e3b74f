"""Encoder throughput: the full product path against the bare forward, side by side.

For each batch size: products/s through ``encode_products`` (decode + preprocess + both towers +
fusion), the same batch through the bare forward on ready tensors (pixels already decoded and
resized, text already tokenised), images/s through the image tower alone, and texts/s through
the text tower alone. Reports the full/bare ratio and peak memory.

    .venv/bin/python -m bench.encode                 # CPU: batch sizes 1, 8, 32
    .venv/bin/python -m bench.encode --device cuda   # GPU: adds 128 and 256
    .venv/bin/python -m bench.encode --precisions fp32,bf16   # precisions side by side
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.device import Acceleration
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.preprocess import Photo

# For a machine without the MiniLM package: BERT-base with seeded random weights.
IMAGE_ONLY_TEXT = {"text_backbone": "bert-base-uncased", "text_weights": "random"}


def _timed(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float) -> float:
    """Median seconds per call over repeats lasting at least ``min_seconds`` (after a warm-up)."""
    fn()
    sync()
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(
    encoder: FusedEncoder, items: list[EncodeInput], sync: Callable[[], None], min_seconds: float
) -> dict[str, float]:
    device = encoder.device
    size = len(items)
    image_items = [EncodeInput(image=item.image) for item in items]
    texts = [item.text or "" for item in items]
    pixels = torch.stack(
        [encoder.preprocessor.one(Photo(item.image, item.media_type)) for item in items]
    ).to(device)
    if encoder.acceleration.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    tokens = encoder.text_encoder.tokenize(texts, device)

    def bare_products() -> None:
        with torch.inference_mode(), encoder._autocast():
            image = encoder.image_encoder.encode(pixels)
            text = torch.nn.functional.normalize(encoder.text_encoder(**tokens).float(), dim=-1)
            encoder.fusion(image, text)

    def bare_images() -> None:
        with torch.inference_mode(), encoder._autocast():
            encoder.image_encoder.encode(pixels)

    def text_only() -> None:
        with torch.inference_mode(), encoder._autocast():
            encoder.text_encoder.encode(texts)

    full = _timed(lambda: encoder.encode_products(items), sync, min_seconds)
    bare = _timed(bare_products, sync, min_seconds)
    images_full = _timed(lambda: encoder.encode_queries(image_items), sync, min_seconds)
    images_bare = _timed(bare_images, sync, min_seconds)
    text_time = _timed(text_only, sync, min_seconds)
    return {
        "batch": size,
        "products_per_s_full": size / full,
        "products_per_s_bare": size / bare,
        "full_over_bare": bare / full,
        "images_per_s_full": size / images_full,
        "images_per_s_bare": size / images_bare,
        "texts_per_s": size / text_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default by device)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma-separated: auto, fp32, bf16, fp16; each batch size runs each in turn",
    )
    parser.add_argument(
        "--image-only",
        action="store_true",
        help="random BERT-base text tower (for a machine without the MiniLM package)",
    )
    parser.add_argument("--json", help="also write results to this file")
    args = parser.parse_args()
    text = IMAGE_ONLY_TEXT if args.image_only else {}

    catalog = load_catalog()
    base = FusedEncoder.from_profile(ModelProfile(device=args.device, batch_size=1024, **text))
    device = base.device
    encoders = {  # one set of towers, one encoder per precision
        precision: base.with_options(acceleration=Acceleration.for_device(device, precision))
        for precision in args.precisions.split(",")
    }
    encoder = next(iter(encoders.values()))
    sizes = (
        [int(s) for s in args.batch_sizes.split(",")]
        if args.batch_sizes
        else ([1, 8, 32, 128, 256] if device.type == "cuda" else [1, 8, 32])
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"device {device} ({name}), torch threads {torch.get_num_threads()}, "
        f"model {encoder.model_version}"
    )
    header = (
        f"{'precision':<26} {'batch':>5} {'products/s full':>16} {'products/s bare':>16} "
        f"{'full/bare':>9} "
        f"{'images/s full':>14} {'images/s bare':>14} {'texts/s':>8}"
    )
    print(header)
    rows = []
    for size in sizes:
        products = [catalog[i % len(catalog)] for i in range(size)]
        items = [encode_input(p) for p in products]
        for precision, encoder in encoders.items():
            row = _measure(encoder, items, sync, args.min_seconds)
            row["precision"] = precision
            row["acceleration"] = encoder.acceleration.describe()
            rows.append(row)
            print(
                f"{row['acceleration'][:26]:<26} {size:>5} {row['products_per_s_full']:>16.1f} "
                f"{row['products_per_s_bare']:>16.1f} "
                f"{row['full_over_bare']:>9.2f} {row['images_per_s_full']:>14.1f} "
                f"{row['images_per_s_bare']:>14.1f} {row['texts_per_s']:>8.1f}"
            )
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_rss_mib:.0f} MiB", end="")
    if device.type == "cuda":
        print(f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", end="")
    print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": str(device),
                    "model_version": encoder.model_version,
                    "rows": rows,
                    "peak_rss_mib": peak_rss_mib,
                },
                handle,
                indent=2,
            )
    for encoder in [base, *encoders.values()]:
        encoder.close()


if __name__ == "__main__":
    main()
