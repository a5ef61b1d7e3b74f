"""``loupe embed`` and ``loupe models``: what the model is and what it makes of an input."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loupe.cli.common import global_options, settings, settings_epilog
from loupe.consumers.errors import ModelRejected

MODEL_SETTINGS = (
    "image_backbone",
    "text_backbone",
    "fusion_checkpoint",
    "image_fit",
    "image_pooling",
    "device",
    "precision",
    "encoder_backend",
)


@click.command(epilog=settings_epilog(*MODEL_SETTINGS))
@click.option(
    "--image",
    "images",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="An image file; repeatable.",
)
@click.option("--text", help="Query or product text (paired with each image if both).")
@click.option("--values", type=click.IntRange(0, 10_000), default=6, help="Leading values shown.")
@click.option("--json", "as_json", is_flag=True, help="Full vectors as JSON lines.")
@global_options
def embed(images: tuple[Path, ...], text: str | None, values: int, as_json: bool) -> int:
    """Print the vectors the configured model makes for photos and/or text.

    Per input: each view's size, norm and first values. With --image and --text together each
    image is paired with the text (image, text and fused views). Exits 1 if an input failed.
    """
    if not images and not text:
        raise click.UsageError("give --image PATH and/or --text TEXT")
    from loupe.encoders.fused import EncodeInput, FusedEncoder

    items, labels = [], []
    for path in images:
        items.append(EncodeInput(image=path.read_bytes(), text=text))
        labels.append(str(path) + (f" + {text!r}" if text else ""))
    if not images:
        items.append(EncodeInput(text=text))
        labels.append(repr(text))
    encoder = FusedEncoder.from_profile(settings().model_profile())
    try:
        results = encoder.encode_queries(items)
    finally:
        encoder.close()
    if not as_json:
        click.echo(f"model version: {encoder.model_version}")
        click.echo(f"device:        {encoder.device} ({encoder.acceleration.describe()})")
        click.echo(f"image tower:   {encoder.backend}")
    failed = 0
    for label, result in zip(labels, results, strict=True):
        # In the contract's words, as the service would dead-letter or answer it.
        rejected = None if result.ok else ModelRejected(result.error)
        if as_json:
            error = None if rejected is None else {"code": rejected.code, "message": str(rejected)}
            vectors = {view: vec.tolist() for view, vec in result.vectors.items()}
            click.echo(
                json.dumps(
                    {
                        "input": label,
                        "model_version": encoder.model_version,
                        "error": error,
                        "vectors": vectors,
                    }
                )
            )
        else:
            click.echo(f"\n{label}")
            if rejected is not None:
                click.echo(f"  error {rejected.code}: {rejected}")
            for view, vector in result.vectors.items():
                head = ", ".join(f"{v:+.4f}" for v in vector[:values])
                norm = float((vector**2).sum()) ** 0.5
                click.echo(f"  {view:<6} dim {vector.shape[0]:>5}  norm {norm:.4f}  [{head}, ...]")
        failed += not result.ok
    return 1 if failed else 0


@click.command(
    epilog=settings_epilog(
        "image_backbone",
        "text_backbone",
        "allow_model_download",
        "device",
        "encoder_backend",
        "query_regions",
        "query_region_shares",
    )
)
@global_options
def models() -> int:
    """List the backbones Loupe knows, their dimensions, and where their weights come from.

    `installed` means the weights are on this machine now (no download needed).
    """
    from loupe.encoders.errors import WeightsNotFound
    from loupe.encoders.image_towers import IMAGE_BACKBONES
    from loupe.encoders.text_towers import TEXT_BACKBONES

    config = settings()

    def status(locate) -> str:
        try:
            found = locate(False)
        except WeightsNotFound:
            return "not installed"
        if Path(str(found)).exists():
            return "installed"
        from huggingface_hub import try_to_load_from_cache  # a hub id: is it in the local cache?

        return (
            "installed"
            if isinstance(try_to_load_from_cache(found, "config.json"), str)
            else ("not cached")
        )

    rows = [("tower", "name", "dim", "weights", "text in", "from")]
    for name, spec in IMAGE_BACKBONES.items():
        mark = "*" if name == config.image_backbone else " "
        rows.append(
            (
                f"{mark}image",
                name,
                str(spec.dim),
                status(spec.default_weights),
                "-",
                spec.weights_from,
            )
        )
    for name, spec in TEXT_BACKBONES.items():
        mark = "*" if name == config.text_backbone else " "
        found = status(spec.installed or spec.source)
        rows.append((f"{mark}text", name, str(spec.dim), found, spec.languages, spec.weights_from))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[5]]).rstrip())
    click.echo(
        "\n* the configured backbones (LOUPE_IMAGE_BACKBONE, LOUPE_TEXT_BACKBONE); a local model "
        "directory also works as LOUPE_TEXT_BACKBONE."
    )
    click.echo(f"\nfusion: {_fusion_summary(config.fusion_checkpoint)}")
    click.echo(f"image tower runs on: {_backend_summary(config)}")
    click.echo(f"a photo query: {query_parts_summary(config)}")
    return 0


def query_parts_summary(config) -> str:
    """How a photo query is read (LOUPE_QUERY_REGIONS, LOUPE_QUERY_REGION_SHARES), in one line:
    what each photo query costs in passes of the image tower."""
    if not config.query_regions:
        return "the whole photo, one pass of the image tower (LOUPE_QUERY_REGIONS=false)"
    shares = config.query_region_shares
    sizes = ", ".join(f"{share:g}" for share in shares)
    parts = "one part" if len(shares) == 1 else f"{len(shares)} parts"
    return (
        f"the whole photo and {parts} around its product ({sizes} of its square), "
        f"{1 + len(shares)} passes of the image tower (LOUPE_QUERY_REGION_SHARES)"
    )


def _backend_summary(config) -> str:
    """What will run the image tower (LOUPE_ENCODER_BACKEND on this machine's device), in one
    line, without loading the model."""
    from loupe.encoders.device import Acceleration, pick_device, use_onnxruntime

    device = pick_device(config.device)
    plan = Acceleration.for_device(device, config.precision)
    setting = f"LOUPE_ENCODER_BACKEND={config.encoder_backend}"
    if not use_onnxruntime(config.encoder_backend, device, plan):
        return f"PyTorch on {device} ({setting})"
    try:
        import onnxruntime
    except ImportError:
        return f"PyTorch on {device}: onnxruntime is not installed ({setting})"
    return (
        f"ONNX Runtime {onnxruntime.__version__} on the CPU ({setting}; its graph is exported "
        "on first use into ~/.cache/loupe/models/onnx)"
    )


def _fusion_summary(path: Path | None) -> str:
    """What LOUPE_FUSION_CHECKPOINT holds, in one line (read from its metadata only)."""
    if path is None:
        return "untrained (identity heads); `loupe train` fits it to a catalog"
    from loupe.encoders.fusion import load_fusion

    checkpoint = load_fusion(path)
    record = checkpoint.training
    held = record.get("after", {}).get("held_out", {}).get("photo", {})
    measured = f", held-out photo R@1 {held['recall_at_1']:.3f}" if held.get("recall_at_1") else ""
    tuned = ", the image tower's last block tuned" if checkpoint.image_tower else ""
    whitened = ", the image view whitened" if checkpoint.model.config.image_whitening else ""
    return (
        f"{path} (base {checkpoint.base}; trained on {record.get('products', '?')} products"
        f"{tuned}{whitened}{measured})"
    )


COMMANDS = [embed, models]
