"""Encoder throughput and latency: the full product path against the bare forward, side by side.

For each batch size and precision:

- **full**: products/s through ``encode_products`` (header parse, decode, fit, tokenize, both
  towers, fusion, vectors back on the host) over a stream of ``--stream-batches`` micro-batches,
  as the ingest consumer feeds it: on a GPU the next micro-batch is prepared while the current
  one runs, so a single batch would hide what the pipeline does;
- **bare**: the same batch through the forward pass alone, on ready tensors (pixels already
  decoded and fitted, text already tokenized): the device's own ceiling;
- the image tower alone on the full path and bare, and the text tower alone.

Then (``--stages``) where one micro-batch's time goes, stage by stage, and (``--latency``) the
latency of a single query of each kind: photo, text, photo + text.

    .venv/bin/python -m bench.encode                 # CPU: batch sizes 1, 8, 32
    .venv/bin/python -m bench.encode --device cuda --stages --latency
    .venv/bin/python -m bench.encode --precisions fp32,bf16   # precisions side by side
    .venv/bin/python -m bench.encode --backends torch,onnxruntime   # the CPU's two runtimes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

from bench.cli import summary
from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.device import Acceleration
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.images import fit_batch, orient, plain_jpeg_header
from loupe.encoders.preprocess import Photo

# For a machine without the MiniLM weights (a lent GPU machine: they do not fit what may travel
# there): the same architecture, from its config, with seeded random weights. Speed is the
# architecture's; agreement between two devices holds for any weights.
RANDOM_TEXT = {"text_weights": "random"}


def timed(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float) -> float:
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


def syncer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _ready_inputs(encoder: FusedEncoder, items: list[EncodeInput]):
    pixels = torch.stack(
        [encoder.preprocessor.one(Photo(item.image, item.media_type)) for item in items]
    ).to(encoder.device)
    if encoder.acceleration.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    tokens = encoder.text_encoder.tokenize([item.text or "" for item in items], encoder.device)
    return pixels, tokens


def measure(
    encoder: FusedEncoder,
    items: list[EncodeInput],
    min_seconds: float,
    stream_batches: int = 8,
) -> dict[str, float]:
    """One row of the table: ``items`` is one micro-batch."""
    sync = syncer(encoder.device)
    size = len(items)
    stream = items * stream_batches
    image_stream = [EncodeInput(image=item.image) for item in stream]
    texts = [item.text or "" for item in items]
    pixels, tokens = _ready_inputs(encoder, items)
    sized = encoder.with_options(batch_size=size)
    sized.warm_up()  # its own CUDA graphs, captured as ``loupe serve`` captures them

    def bare_products() -> None:
        with torch.inference_mode(), encoder.runtime.autocast():
            image = encoder.runtime.image_vectors(pixels)
            text = torch.nn.functional.normalize(encoder.text_encoder(**tokens).float(), dim=-1)
            encoder.fusion(image, text)

    def bare_images() -> None:
        with torch.inference_mode(), encoder.runtime.autocast():
            encoder.runtime.image_vectors(pixels)

    def text_only() -> None:
        with torch.inference_mode(), encoder.runtime.autocast():
            encoder.text_encoder.encode(texts)

    try:
        full = timed(lambda: sized.encode_products(stream), sync, min_seconds) / stream_batches
        bare = timed(bare_products, sync, min_seconds)
        images_full = (
            timed(lambda: sized.encode_queries(image_stream), sync, min_seconds) / stream_batches
        )
        images_bare = timed(bare_images, sync, min_seconds)
        text_time = timed(text_only, sync, min_seconds)
    finally:
        sized.close()
    return {
        "batch": size,
        "products_per_s_full": size / full,
        "products_per_s_bare": size / bare,
        "full_over_bare": bare / full,
        "images_per_s_full": size / images_full,
        "images_per_s_bare": size / images_bare,
        "texts_per_s": size / text_time,
    }


def stage_profile(
    encoder: FusedEncoder, items: list[EncodeInput], repeats: int = 5
) -> dict[str, float]:
    """Milliseconds per stage of one micro-batch, each stage run alone and synchronised (the
    pipeline overlaps them; this shows which one bounds it). Medians of ``repeats``."""
    device, sync = encoder.device, syncer(encoder.device)
    pre = encoder.preprocessor
    data = [item.image for item in items]
    texts = [item.text or "" for item in items]
    headers = [plain_jpeg_header(d, pre.limits) for d in data]
    pixels, tokens = _ready_inputs(encoder, items)
    stages: dict[str, Callable[[], object]] = {
        "header parse": lambda: [plain_jpeg_header(d, pre.limits) for d in data],
    }
    if pre.decoder is not None:
        decoded: list = []

        def decode() -> None:
            decoded[:] = pre.decoder.decode(data)

        def fit() -> None:
            fit_batch(
                [
                    orient(t, h.orientation)
                    for t, h in zip(decoded, headers, strict=True)
                    if t is not None  # the decoder failed it: Pillow's, timed apart
                ],
                pre.side,
                pre.fit,
            )

        stages[f"decode ({pre.decoder.name})"] = decode
        stages["orient + fit (batched)"] = fit
    photos = [Photo(d) for d in data]
    stages[f"decode + fit (Pillow, {pre.decode_workers} threads)"] = lambda: list(
        pre._pool.map(pre.one, photos)
    )
    stages["tokenize"] = lambda: encoder.text_encoder.tokenize(texts, device)

    def towers(part: str) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), encoder.runtime.autocast():
                if part == "image":
                    return encoder.runtime.image_vectors(pixels)
                return torch.nn.functional.normalize(encoder.text_encoder(**tokens).float(), dim=-1)

        return run

    stages["image tower"] = towers("image")
    stages["text tower"] = towers("text")
    with torch.inference_mode():
        image_vecs, text_vecs = towers("image")(), towers("text")()

    def heads() -> object:
        with torch.inference_mode(), encoder.runtime.autocast():
            return (
                encoder.fusion(image_vecs, text_vecs),
                encoder.fusion.image(image_vecs),
                encoder.fusion.text(text_vecs),
            )

    stages["fusion + heads"] = heads
    stages["vectors to host"] = lambda: [v.float().cpu().numpy() for v in heads()]
    result = {}
    for name, fn in stages.items():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times) * 1e3
    return result


def query_latency(
    encoder: FusedEncoder, item: EncodeInput, repeats: int = 50
) -> dict[str, dict[str, float]]:
    """Milliseconds from bytes/text in to vectors on the host, for one query of each kind
    (p50 and p90 of ``repeats``)."""
    sync = syncer(encoder.device)
    kinds = {
        "photo": EncodeInput(image=item.image, media_type=item.media_type),
        "text": EncodeInput(text="gold hoop earrings with small diamonds"),
        "photo+text": EncodeInput(
            image=item.image, media_type=item.media_type, text="gold hoop earrings"
        ),
    }
    result = {}
    for kind, query in kinds.items():
        for _ in range(5):
            encoder.encode_queries([query])
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder.encode_queries([query])  # returns numpy: already synchronised
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        result[kind] = {"p50": times[len(times) // 2], "p90": times[int(len(times) * 0.9)]}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default by device)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma-separated: auto, fp32, bf16, fp16; each batch size runs each in turn",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated: torch, onnxruntime (the image tower's runtime); each precision "
        "runs on each (default: the device's own)",
    )
    parser.add_argument("--stream-batches", type=int, default=8, help="micro-batches per call")
    parser.add_argument("--stages", action="store_true", help="stage breakdown of one batch")
    parser.add_argument("--latency", action="store_true", help="one query of each kind")
    parser.add_argument(
        "--random-text-weights",
        action="store_true",
        help="the text tower's architecture with random weights (where its weights are absent)",
    )
    parser.add_argument("--json", help="also write results to this file")
    args = parser.parse_args(argv)
    text = RANDOM_TEXT if args.random_text_weights else {}

    catalog = load_catalog()
    base = FusedEncoder.from_profile(ModelProfile(device=args.device, batch_size=1024, **text))
    device = base.device
    backends = args.backends.split(",") if args.backends else [None]
    encoders = {  # one set of towers, one encoder per precision and backend
        f"{precision}/{backend}" if backend else precision: base.with_options(
            acceleration=Acceleration.for_device(device, precision), backend=backend
        )
        for precision in args.precisions.split(",")
        for backend in backends
    }
    encoder = next(iter(encoders.values()))
    sizes = (
        [int(s) for s in args.batch_sizes.split(",")]
        if args.batch_sizes
        else ([1, 8, 32, 128, 256] if device.type == "cuda" else [1, 8, 32])
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"device {device} ({name}), torch threads {torch.get_num_threads()}, "
        f"model {encoder.model_version}"
    )
    print(
        f"{'precision':<18} {'batch':>5} {'products/s full':>16} {'products/s bare':>16} "
        f"{'full/bare':>9} {'images/s full':>14} {'images/s bare':>14} {'texts/s':>8}"
    )
    report: dict = {"device": str(device), "model_version": encoder.model_version, "rows": []}
    for size in sizes:
        items = [encode_input(catalog[i % len(catalog)]) for i in range(size)]
        for precision, encoder in encoders.items():
            row = measure(encoder, items, args.min_seconds, args.stream_batches)
            row["precision"] = precision
            row["acceleration"] = encoder.acceleration.describe()
            row["backend"] = encoder.backend
            report["rows"].append(row)
            print(
                f"{precision:<18} {size:>5} {row['products_per_s_full']:>16.1f} "
                f"{row['products_per_s_bare']:>16.1f} "
                f"{row['full_over_bare']:>9.2f} {row['images_per_s_full']:>14.1f} "
                f"{row['images_per_s_bare']:>14.1f} {row['texts_per_s']:>8.1f}"
            )
    print("acceleration:", encoder.acceleration.describe())
    if args.stages:
        size = max(sizes)
        items = [encode_input(catalog[i % len(catalog)]) for i in range(size)]
        report["stages"] = stage_profile(encoder, items)
        print(f"stages of one batch of {size} ({encoder.acceleration.describe()}), ms:")
        for stage, ms in report["stages"].items():
            print(f"  {stage:<32} {ms:8.2f}")
    if args.latency:
        encoder.warm_up()
        report["latency_ms"] = query_latency(encoder, encode_input(catalog[0]))
        for kind, ms in report["latency_ms"].items():
            print(f"batch-1 {kind:<10} p50 {ms['p50']:6.2f} ms  p90 {ms['p90']:6.2f} ms")
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {report['peak_rss_mib']:.0f} MiB", end="")
    if device.type == "cuda":
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f", peak GPU memory {report['peak_gpu_mib']:.0f} MiB", end="")
    print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    for encoder in [base, *encoders.values()]:
        encoder.close()
    return report


def variant(encoder: FusedEncoder, **changes) -> FusedEncoder:
    """The same encoder with some acceleration steps changed (``bench.device_check``)."""
    return encoder.with_options(acceleration=dataclasses.replace(encoder.acceleration, **changes))


if __name__ == "__main__":
    main()
