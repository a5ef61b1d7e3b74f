"""``loupe embed``: show what the model makes of some photos and/or text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from consumers.settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    embed = commands.add_parser(
        "embed",
        help="print the vectors the model makes for image files and/or text",
        description="Encode photos and/or text with the configured model (LOUPE_* settings) and "
        "print, per input, each view's size, norm and first values. With --image and --text "
        "together, each image is paired with the text (image, text and fused views).",
    )
    embed.add_argument("--image", type=Path, action="append", default=[], help="an image file")
    embed.add_argument("--text", help="query or product text")
    embed.add_argument("--values", type=int, default=6, help="how many leading values to show")
    embed.add_argument("--json", action="store_true", help="print full vectors as JSON lines")
    embed.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from encoders.fused import EncodeInput, FusedEncoder

    if not args.image and not args.text:
        print("loupe embed: give --image PATH and/or --text TEXT", file=sys.stderr)
        return 2
    items, labels = [], []
    for path in args.image:
        if not path.is_file():
            print(f"loupe embed: no such file: {path}", file=sys.stderr)
            return 2
        items.append(EncodeInput(image=path.read_bytes(), text=args.text))
        labels.append(str(path) + (f" + {args.text!r}" if args.text else ""))
    if not args.image:
        items.append(EncodeInput(text=args.text))
        labels.append(repr(args.text))
    encoder = FusedEncoder.from_profile(settings.model_profile())
    try:
        results = encoder.encode_queries(items)
    finally:
        encoder.close()
    if not args.json:
        print(f"model version: {encoder.model_version}")
        print(f"device:        {encoder.device} ({encoder.acceleration.describe()})")
    failed = 0
    for label, result in zip(labels, results, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "input": label,
                        "model_version": encoder.model_version,
                        "error": None
                        if result.ok
                        else {"code": result.error.code, "message": str(result.error)},
                        "vectors": {view: vec.tolist() for view, vec in result.vectors.items()},
                    }
                )
            )
        else:
            print(f"\n{label}")
            if not result.ok:
                print(f"  error {result.error.code}: {result.error}")
            for view, vector in result.vectors.items():
                head = ", ".join(f"{v:+.4f}" for v in vector[: args.values])
                norm = float((vector**2).sum()) ** 0.5
                print(f"  {view:<6} dim {vector.shape[0]:>5}  norm {norm:.4f}  [{head}, ...]")
        failed += not result.ok
    return 1 if failed else 0
