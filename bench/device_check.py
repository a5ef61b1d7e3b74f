"""One prepared check for a machine with an accelerator: CPU/device agreement, then speed.

1. Encodes the same inputs on the CPU (fp32, the reference) and on the device, once per
   precision (fp32 isolates the kernels and nvjpeg; bf16 and fp16 add autocast), with the
   device's other steps on (channels-last, pinned copies, batch JPEG decode). The inputs are
   catalog products, the same photos re-saved with each EXIF orientation, and PNG copies mixed
   into the JPEG batches (so one batch holds tensors decoded on the device and on the host).
   Prints per view and precision the minimum cosine to the CPU; passes when each precision
   meets its bound: 0.995 for fp32 and fp16 (another JPEG decoder alone costs up to 0.0004,
   cuDNN's TF32 convolutions a little more), 0.99 for bf16 (CPU autocast reached 0.9986 in
   tests/unit/test_acceleration.py). A photo encoded the wrong way up scores 0.94 to 0.986.
2. Runs ``bench.encode`` on the device for each precision (batch sizes 1 to 256).

    .venv/bin/python -m bench.device_check --device cuda
    .venv/bin/python -m bench.device_check --device cuda --image-only   # without MiniLM weights

On a lent machine with no registry, ``bench.device_bundle`` packs what it lacks first.

``--image-only`` is for a device machine that cannot receive the 90 MB text weights: the text
tower then is BERT-base with random weights (the same on both devices), so the text and fused
views still compare the two code paths.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import encode
from bench.encode import IMAGE_ONLY_TEXT
from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile

BOUNDS = {"fp32": 0.995, "fp16": 0.995, "bf16": 0.99}


def _inputs(count: int) -> list[EncodeInput]:
    """Products, then orientation-tagged and PNG copies of some of them, interleaved."""
    catalog = load_catalog()[:count]
    items = [encode_input(p) for p in catalog]
    extra = []
    for index, product in enumerate(catalog[: max(8, count // 8)]):
        photo = Image.open(product.image_path).convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = 1 + index % 8
        tagged, png = io.BytesIO(), io.BytesIO()
        photo.save(tagged, "JPEG", quality=95, exif=exif.tobytes())
        photo.save(png, "PNG")
        text = items[index].text
        extra.append(EncodeInput(image=tagged.getvalue(), media_type="image/jpeg", text=text))
        extra.append(EncodeInput(image=png.getvalue(), media_type="image/png", text=text))
    mixed = []
    for index, item in enumerate(items):
        mixed.append(item)
        if index < len(extra):
            mixed.append(extra[index])
    return mixed + extra[len(items) :]


def _encode(profile: ModelProfile, items: list[EncodeInput]) -> tuple[list, str, float]:
    encoder = FusedEncoder.from_profile(profile)
    try:
        encoder.encode_products(items[:4])  # warm-up (cuDNN autotuning, allocator)
        started = time.perf_counter()
        results = encoder.encode_products(items)
        rate = len(items) / (time.perf_counter() - started)
        return results, f"{encoder.acceleration.describe()}, batch {encoder.batch_size}", rate
    finally:
        encoder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--products", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--image-only", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="a folder for the JSON results")
    args = parser.parse_args()

    text = IMAGE_ONLY_TEXT if args.image_only else {}
    items = _inputs(args.products)
    reference, described, rate = _encode(
        ModelProfile(device="cpu", precision="fp32", **text), items
    )
    print(f"{'cpu':>12}: {rate:7.1f} products/s ({described}), {len(items)} inputs")
    report: dict = {"inputs": len(items), "agreement": {}}
    ok = True
    for precision in args.precisions.split(","):
        results, described, rate = _encode(
            ModelProfile(device=args.device, precision=precision, **text), items
        )
        print(f"{args.device + ' ' + precision:>12}: {rate:7.1f} products/s ({described})")
        failed = [i for i, r in enumerate(results) if not r.ok]
        if failed:
            ok = False
            print(f"  FAIL: items {failed} failed on the device: {results[failed[0]].error}")
            continue
        for view in ("image", "text", "fused"):
            a = np.stack([r.vectors[view] for r in reference])
            b = np.stack([r.vectors[view] for r in results])
            cosines = (a * b).sum(axis=1)
            worst = float(cosines.min())
            passed = worst >= BOUNDS.get(precision, 0.99)
            ok &= passed
            report["agreement"][f"{precision}/{view}"] = {
                "min": worst,
                "mean": float(cosines.mean()),
                "worst_item": int(cosines.argmin()),
            }
            print(
                f"  {view:>6}: cosine to cpu fp32 min {worst:.5f} (item {cosines.argmin()}) "
                f"mean {cosines.mean():.5f}{'' if passed else '  FAIL'}"
            )
    print("agreement:", "PASS" if ok else "FAIL")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_check.json").write_text(json.dumps(report, indent=2))
    if not args.skip_bench:
        sys.argv = [
            "bench.encode",
            "--device",
            args.device,
            "--precisions",
            args.precisions,
            "--min-seconds",
            str(args.bench_seconds),
        ]
        if args.out:
            sys.argv += ["--json", str(args.out / "encode.json")]
        if args.image_only:
            sys.argv.append("--image-only")
        encode.main()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
