"""What the model is made of, and every default that describes it, without importing torch.

``ModelProfile`` is the one source of the model's defaults: ``Settings`` (``LOUPE_*``) takes its
defaults from here, and the encoder modules import their limits from here, so a default is
written once. Importing this module is cheap, so the CLI and the settings can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Fit = Literal["pad", "center_crop", "squash"]  # how a photo becomes a square
FITS: tuple[str, ...] = get_args(Fit)
Pooling = Literal["gem", "avg"]  # how the image tower's feature maps become one vector
POOLINGS: tuple[str, ...] = get_args(Pooling)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# What runs the image tower: auto is ONNX Runtime on a CPU in fp32 (encoders/onnx_tower.py),
# PyTorch elsewhere; the vectors are the same either way.
EncoderBackend = Literal["auto", "torch", "onnxruntime"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)
JpegDecoderName = Literal["auto", "nvimgcodec", "torchvision"]  # encoders/jpeg_decoders.py
JPEG_DECODERS: tuple[str, ...] = get_args(JpegDecoderName)
PRECISIONS: tuple[str, ...] = get_args(Precision)

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # a product photo is rarely above 2 MB
MAX_IMAGE_PIXELS = 40_000_000  # ~ 7,700 x 5,200; a decompression bomb declares far more
MIN_IMAGE_SIDE_PX = 8  # smaller is not a photo of anything
MAX_IMAGE_ASPECT_RATIO = 20.0  # long side / short side: a banner strip is not a product photo
MAX_TEXT_TOKENS = 128  # titles + key attributes fit; long descriptions are cut, not failed
MAX_TEXT_CHARS = 4000  # cut before tokenising: the tokenizer's cost grows with the input


# The parts of a photo query searched beside the whole (encoders/regions.py): squares of these
# shares of the model's square input, measured on the scenes and torchvision families against one
# square of 0.4, two and five (docs/training.md, "Photos of scenes").
QUERY_REGION_SHARES = (0.3, 0.4, 0.5, 0.6)
MAX_QUERY_REGIONS = 8  # a bound on the passes of the tower one photo query may cost


def check_region_shares(shares: Sequence[float]) -> tuple[float, ...]:
    """``shares`` as a tuple, each in (0, 1], one to ``MAX_QUERY_REGIONS`` of them (each is one
    more pass of the tower a photo query); raises ValueError naming what is wrong."""
    shares = tuple(float(share) for share in shares)
    if not 1 <= len(shares) <= MAX_QUERY_REGIONS:
        raise ValueError(f"1 to {MAX_QUERY_REGIONS} region shares, got {len(shares)}")
    wrong = [share for share in shares if not 0.0 < share <= 1.0]
    if wrong:
        raise ValueError(f"region shares must be in (0, 1], got {wrong}")
    return shares


@dataclass(frozen=True)
class ModelProfile:
    """Which backbones, weights and preprocessing make up the model, and how it runs.

    The fields named in ``RECIPE`` decide the vectors, and so the model version: a collection's
    card keeps them (``recipe``), so that any instance loads the same model. The others say how
    this instance runs it (device, precision, batch sizes) and stay its own."""

    image_backbone: str = "efficientnet-lite0"  # a name in IMAGE_BACKBONES
    text_backbone: str = "all-minilm-l6-v2"  # a name in TEXT_BACKBONES or a model directory
    image_weights: str | None = None  # None: the backbone's default; a path; or "random"
    text_weights: str | None = None  # None: the backbone's default; a directory; or "random"
    fusion_checkpoint: Path | None = None  # None: untrained fusion (identity attention)
    image_weight: float = 0.5  # share of the fused cosine from the image view
    fit: Fit = "pad"  # pad beat center_crop on jewelry photos (bench/preprocess.py)
    image_pooling: Pooling = "gem"  # beat avg for a shopper photo's own product (docs/training.md)
    # The square side photos are resized to for the image tower; None: the backbone's own
    # (224 for EfficientNet-Lite0). 288 keeps the fine detail that tells look-alike jewelry
    # apart (docs/training.md, "Input size"); a multiple of 32.
    image_side: int | None = 288
    max_text_tokens: int = MAX_TEXT_TOKENS
    device: str = "auto"  # auto (CUDA, MPS, CPU), cpu, cuda, cuda:1, mps
    precision: Precision = "auto"  # auto: fp16 autocast on CUDA, fp32 elsewhere
    encoder_backend: EncoderBackend = "auto"  # the image tower's runtime (ENCODER_BACKENDS)
    # A photo query is also encoded in parts around where its product is (encoders/regions.py):
    # squares of these shares of the model's square input, each one more pass of the tower.
    query_regions: bool = True
    query_region_shares: tuple[float, ...] = QUERY_REGION_SHARES
    batch_size: int | None = None  # None: 16 on a CPU (cache-bound, bench/encode.py), 128 on GPU
    # Threads decoding images with Pillow (it releases the GIL). None: 2 on a CPU, whose cores
    # the towers need; one per core, up to 16, where a GPU runs the towers.
    decode_workers: int | None = None
    jpeg_decoder: JpegDecoderName = "auto"  # CUDA: auto (nvImageCodec if installed), torchvision
    host_decode_share: float = 0.0  # on CUDA: share of JPEGs Pillow decodes beside the GPU
    cuda_graphs: bool = True  # on CUDA: replay captured graphs for small batches
    cuda_graph_max_batch: int = 16  # the largest batch a graph is captured for (power of 2)
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_download: bool = False  # never on by default: no model hub at run time

    def recipe(self) -> dict[str, Any]:
        """The fields that decide the vectors, as JSON values (a checkpoint's path resolved,
        since every instance must find the same file)."""
        recipe = {name: getattr(self, name) for name in RECIPE}
        if recipe["fusion_checkpoint"] is not None:
            recipe["fusion_checkpoint"] = str(Path(recipe["fusion_checkpoint"]).resolve())
        return recipe

    def following(self, recipe: Mapping[str, Any]) -> ModelProfile:
        """The model ``recipe`` (a card's) describes, run the way this profile runs models."""
        unknown = set(recipe) - set(RECIPE)
        if unknown:
            raise ValueError(f"not part of a model's recipe: {', '.join(sorted(unknown))}")
        values = dict(recipe)
        if "fusion_checkpoint" in values:
            checkpoint = values["fusion_checkpoint"]
            values["fusion_checkpoint"] = Path(checkpoint) if checkpoint else None
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a vector, and the size of each of its views: what a collection, a
    vectors topic and their writers need to know of a model, without holding it."""

    model_version: str
    dims: Mapping[str, int]  # view (image, text, fused) -> numbers in its vector


# The fields of ``ModelProfile`` that decide the vectors. A field added here is kept on every
# collection's card from then on; a card written before then says what it meant by its absence
# (``catalog._BEFORE_IT_EXISTED``).
RECIPE: tuple[str, ...] = (
    "image_backbone",
    "text_backbone",
    "image_weights",
    "text_weights",
    "fusion_checkpoint",
    "image_weight",
    "fit",
    "image_pooling",
    "max_text_tokens",
    "image_side",
)
