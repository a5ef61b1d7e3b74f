"""One prepared check for a machine with an accelerator: CPU/device agreement, then speed.

1. Encodes the same catalog products on the CPU and on the device (mixed precision, channels
   last, batch JPEG decode there) and prints, per view, the minimum cosine between the two.
   Passes when every view agrees to ``--min-cosine`` (bf16/fp16 autocast: 0.99).
2. Runs ``bench.encode`` on the device (batch sizes 1 to 256).

    .venv/bin/python -m bench.device_check --device cuda
    .venv/bin/python -m bench.device_check --device cuda --image-only   # without MiniLM weights

``--image-only`` is for a device machine that cannot receive the 90 MB text weights: the text
tower then is BERT-base with random weights (the same on both devices), so the text and fused
views still compare the two code paths.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from consumers.jewelry import encode_input, load_catalog
from encoders.fused import FusedEncoder, ModelProfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--products", type=int, default=64)
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--image-only", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()

    text = (
        {"text_backbone": "bert-base-uncased", "text_weights": "random"} if args.image_only else {}
    )
    catalog = load_catalog()[: args.products]
    items = [encode_input(p) for p in catalog]
    results = {}
    for device in ("cpu", args.device):
        encoder = FusedEncoder.from_profile(ModelProfile(device=device, **text))
        encoder.encode_products(items[:4])  # warm-up (cuDNN autotuning, allocator)
        started = time.perf_counter()
        results[device] = encoder.encode_products(items)
        print(
            f"{device:>6}: {len(items) / (time.perf_counter() - started):7.1f} products/s "
            f"(model {encoder.model_version}, batch {encoder.batch_size}, "
            f"amp {encoder.amp_dtype}, batch JPEG decode {encoder.batch_jpeg_decode})"
        )
        encoder.close()
    ok = True
    for view in ("image", "text", "fused"):
        a = np.stack([r.vectors[view] for r in results["cpu"]])
        b = np.stack([r.vectors[view] for r in results[args.device]])
        cosines = (a * b).sum(axis=1)
        worst = float(cosines.min())
        ok &= worst >= args.min_cosine
        print(
            f"{view:>6}: cosine(cpu, {args.device}) min {worst:.5f} mean {cosines.mean():.5f} "
            f"max |diff| {np.abs(a - b).max():.5f}"
        )
    print("agreement:", "PASS" if ok else f"FAIL (below {args.min_cosine})")
    if not args.skip_bench:
        from bench import encode

        sys.argv = ["bench.encode", "--device", args.device]
        encode.main()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
