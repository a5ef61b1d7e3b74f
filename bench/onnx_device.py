"""The image tower on ONNX Runtime's accelerator providers against PyTorch on the same device:
images per second per batch size, and the smallest cosine to PyTorch fp32 on the same pixels.

The service runs the ONNX graph on CPUs only (``LOUPE_ENCODER_BACKEND``); on a GPU it keeps
PyTorch (fp16, CUDA graphs) until this measures a win. ONNX Runtime's CUDA and TensorRT
providers come with the ``onnxruntime-gpu`` package, not with ``onnxruntime``: where they are
missing, the report says so and measures nothing for them. On a CPU the same comparison runs
with the CPU provider, so the code path is exercised anywhere.

    .venv/bin/python -m bench.onnx_device --device cuda   # also a section of bench.device_check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.cli import summary

# In order of preference, per device kind: what ONNX Runtime would be asked for.
PROVIDERS = {
    "cuda": (
        ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        ("CUDAExecutionProvider", "CPUExecutionProvider"),
    ),
    "cpu": (("CPUExecutionProvider",),),
}


def _rate(fn, images: int, min_seconds: float) -> float:
    fn()  # warm: allocations, kernel choice, TensorRT's engine build
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or done == 0:
        fn()
        done += images
    return done / (time.perf_counter() - started)


def measure_providers(
    tower, device: torch.device, batch_sizes: list[int], min_seconds: float = 1.0
) -> dict:
    """``tower``: the image tower (``ImageEncoder``) on ``device``."""
    import onnxruntime as ort

    from loupe.encoders.onnx_tower import OnnxImageTower, OnnxUnavailable, probe_photos

    available = ort.get_available_providers()
    report: dict = {"onnxruntime": ort.__version__, "available": available, "runs": []}
    wanted = PROVIDERS.get(device.type, ())
    if not any(chain[0] in available for chain in wanted):
        report["skipped"] = (
            f"none of {[chain[0] for chain in wanted]} in onnxruntime {ort.__version__} "
            f"({', '.join(available)}): install onnxruntime-gpu to measure them"
        )
        print(report["skipped"], flush=True)
        return report
    side = tower.input_side
    largest = probe_photos(max(batch_sizes), side)
    with torch.inference_mode():
        reference = tower.encode(largest.to(device)).float().cpu()  # PyTorch fp32 on the device
    for chain in wanted:
        if chain[0] not in available:
            continue
        with tempfile.TemporaryDirectory() as cache:
            try:
                graph = OnnxImageTower.load(tower, Path(cache), providers=chain)
            except OnnxUnavailable as exc:
                report["runs"].append({"provider": chain[0], "error": str(exc)})
                print(f"{chain[0]}: {exc}", flush=True)
                continue
            used = graph.session.get_providers()
            cosine = float((reference * graph(largest)).sum(dim=1).min())
            for size in batch_sizes:
                pixels = largest[:size]
                on_device = pixels.to(device)

                def torch_fp32(on_device=on_device):
                    with torch.inference_mode():
                        tower.encode(on_device)
                        if device.type == "cuda":
                            torch.cuda.synchronize()

                def torch_fp16(on_device=on_device):
                    with torch.inference_mode(), torch.autocast(device.type, torch.float16):
                        tower.encode(on_device)
                        if device.type == "cuda":
                            torch.cuda.synchronize()

                row = {
                    "provider": chain[0],
                    "providers_used": used,
                    "batch": size,
                    "min_cosine_to_torch_fp32": cosine,
                    # ONNX Runtime takes host pixels: the copy to the device is in its time.
                    "onnx_images_per_s": _rate(lambda p=pixels, g=graph: g(p), size, min_seconds),
                    "torch_fp32_images_per_s": _rate(torch_fp32, size, min_seconds),
                }
                if device.type == "cuda":
                    row["torch_fp16_images_per_s"] = _rate(torch_fp16, size, min_seconds)
                report["runs"].append(row)
                print(
                    f"{chain[0]:<26} batch {size:>4}: onnx {row['onnx_images_per_s']:8.0f}/s, "
                    f"torch fp32 {row['torch_fp32_images_per_s']:8.0f}/s"
                    + (
                        f", torch fp16 {row['torch_fp16_images_per_s']:8.0f}/s"
                        if "torch_fp16_images_per_s" in row
                        else ""
                    )
                    + f"; min cosine {cosine:.6f}",
                    flush=True,
                )
    return report


def main() -> int:
    from loupe.encoders.fused import FusedEncoder, ModelProfile

    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    args = parser.parse_args()
    device = torch.device(args.device)
    encoder = FusedEncoder.from_profile(
        ModelProfile(device=args.device, precision="fp32", encoder_backend="torch")
    )
    try:
        sizes = [int(size) for size in args.batch_sizes.split(",")]
        report = measure_providers(encoder.image_encoder, device, sizes, args.min_seconds)
    finally:
        encoder.close()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
