"""The image tower split in two for ``loupe train``: a frozen trunk and a tunable tail.

The heads that ``loupe train`` fits read the tower's pooled vector, and what the pooling has
already lost (the detail of a product half cut by a shopper's crop) no head brings back. So
training may also tune the tower's last block and its head convolution (EfficientNet-Lite:
about 1 M of its 3.4 M parameters): ``trunk`` runs a photo up to that block once (its maps are
cached), ``TowerTail`` runs the rest, the service's pooling included, and is what training
moves. Its tensors are named as in the backbone's own state dict, so a checkpoint carries them
and ``ImageEncoder.load_tuned`` puts them back into the served tower.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from loupe.encoders.errors import EncoderError
from loupe.encoders.image_towers import ImageEncoder, pool


class TowerTuningUnsupported(EncoderError, ValueError):
    """The configured image tower has no tunable tail (only EfficientNet-Lite has one)."""


def tail_start(image: ImageEncoder) -> int:
    """The index of the first tuned block: the tower's last one."""
    blocks = getattr(image.backbone, "_blocks", None)
    if blocks is None or not hasattr(image.backbone, "_conv_head"):
        raise TowerTuningUnsupported(
            f"tuning the image tower needs an EfficientNet-Lite tower, not {image.name}; "
            "train the heads alone (--tower-steps 0)"
        )
    return len(blocks) - 1


@torch.inference_mode()
def trunk(image: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` pixels in [0, 1] to the maps the tail reads, ``(B, C, S/32, S/32)``."""
    backbone = image.backbone
    x = (pixels - image.mean) / image.std
    x = backbone._swish(backbone._bn0(backbone._conv_stem(x)))
    for block in backbone._blocks[: tail_start(image)]:
        x = block(x)
    return x


class TowerTail(nn.Module):
    """The tower from its last block on, a copy (tuning it leaves the served tower as it is):
    ``forward(maps)`` gives the unit vectors the whole tower would."""

    def __init__(self, image: ImageEncoder) -> None:
        super().__init__()
        self.start = tail_start(image)
        backbone = image.backbone
        self.block = copy.deepcopy(backbone._blocks[self.start])
        self.conv_head = copy.deepcopy(backbone._conv_head)
        self.bn = copy.deepcopy(backbone._bn1)
        self.swish = backbone._swish
        self.pooling = image.pooling

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.block(maps.float())
        x = self.swish(self.bn(self.conv_head(x)))
        return F.normalize(pool(x, self.pooling), dim=-1)

    def train(self, mode: bool = True) -> TowerTail:
        """BatchNorm keeps ImageNet's statistics: a training batch of a few dozen products'
        photos would estimate worse ones, and the served tower runs in eval mode."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def tower_tensors(self) -> dict[str, torch.Tensor]:
        """The tail's weights and BatchNorm buffers under the backbone's own names."""
        names = {"block": f"_blocks.{self.start}", "conv_head": "_conv_head", "bn": "_bn1"}
        return {
            f"{names[key.split('.', 1)[0]]}.{key.split('.', 1)[1]}": value.detach().cpu().clone()
            for key, value in self.state_dict().items()
        }
