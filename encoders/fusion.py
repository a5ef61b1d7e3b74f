"""Fusion: weighted concatenation of the two towers, re-weighted by scaled dot-product attention.

Attention over a single vector is the identity (softmax of one score is 1), so the fused vector
is split into tokens: the image vector into ``image_dim / token_dim`` feature groups and the text
vector into ``text_dim / token_dim``. Each token attends over all of them, which lets a group of
image features be re-weighted by what the text says and vice versa.

The module starts as the identity: it is a residual ``x + W_O · attention(x)`` whose output
projection ``W_O`` starts at zero. Untrained, fused = the weighted concatenation exactly; any
training can only add to it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loupe.encoders.errors import WeightsNotFound


@dataclass(frozen=True)
class FusionConfig:
    image_dim: int = 1280  # image tower's output size
    text_dim: int = 384  # text tower's output size
    token_dim: int = 128  # features per attention token; must divide both dims
    n_heads: int = 4  # attention heads; must divide token_dim
    image_weight: float = 0.5  # share of the fused cosine that comes from the image (0..1)

    def __post_init__(self) -> None:
        for name in ("image_dim", "text_dim"):
            if getattr(self, name) % self.token_dim:
                raise ValueError(
                    f"token_dim ({self.token_dim}) must divide {name} ({getattr(self, name)})"
                )
        if self.token_dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide token_dim ({self.token_dim})")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight must be within [0, 1], got {self.image_weight}")

    @property
    def dim(self) -> int:
        return self.image_dim + self.text_dim

    @property
    def n_tokens(self) -> int:
        return self.dim // self.token_dim


class AttentionFusion(nn.Module):
    """``(B, image_dim)``, ``(B, text_dim)`` unit vectors to a ``(B, image_dim + text_dim)`` one.

    With weights ``w_I = sqrt(image_weight)`` and ``w_T = sqrt(1 - image_weight)`` the
    concatenation ``[w_I v_I; w_T v_T]`` is already unit length, and its cosine with another
    such vector is ``image_weight * cos_I + (1 - image_weight) * cos_T``.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.token_dim
        self.head_dim = d // config.n_heads
        self.position = nn.Parameter(torch.zeros(config.n_tokens, d))  # which group a token is
        # A fixed seed: the untrained module must hash the same on every start, or the model
        # version (and with it the index collection) would change on each restart.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.w_q = nn.Linear(d, d, bias=False)
            self.w_k = nn.Linear(d, d, bias=False)
            self.w_v = nn.Linear(d, d, bias=False)
            self.w_o = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.w_o.weight)  # identity at initialisation

    def concat(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The weighted concatenation, before attention: ``(B, image_dim + text_dim)``."""
        if image.shape[-1] != self.config.image_dim or text.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"expected ({self.config.image_dim}, {self.config.text_dim})-d inputs, got "
                f"({image.shape[-1]}, {text.shape[-1]})"
            )
        w_image = math.sqrt(self.config.image_weight)
        w_text = math.sqrt(1.0 - self.config.image_weight)
        image = F.normalize(image.float(), dim=-1)
        text = F.normalize(text.float(), dim=-1)
        return torch.cat([w_image * image, w_text * text], dim=-1)  # (B, D)

    def attend(self, fused: torch.Tensor) -> torch.Tensor:
        """Residual multi-head self-attention over the fused vector's feature groups."""
        batch = fused.shape[0]
        cfg = self.config
        tokens = fused.view(batch, cfg.n_tokens, cfg.token_dim)  # (B, T, d)
        keyed = tokens + self.position  # (B, T, d): position informs Q and K, not the values

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, cfg.n_tokens, cfg.n_heads, self.head_dim).transpose(1, 2)

        q = heads(self.w_q(keyed))  # (B, H, T, d_h)
        k = heads(self.w_k(keyed))  # (B, H, T, d_h)
        v = heads(self.w_v(tokens))  # (B, H, T, d_h)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d_h)
        attended = attended.transpose(1, 2).reshape(batch, cfg.n_tokens, cfg.token_dim)  # (B,T,d)
        return (tokens + self.w_o(attended)).reshape(batch, cfg.dim)  # (B, D)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.attend(self.concat(image, text)), dim=-1)  # (B, D)


_CONFIG_KEY = "loupe.fusion.config"


def save_fusion(module: AttentionFusion, path: Path) -> str:
    """Write the weights and config as safetensors; return the checkpoint's hash."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={_CONFIG_KEY: json.dumps(asdict(module.config))})
    return fusion_digest(module)


def load_fusion(path: Path) -> AttentionFusion:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"fusion checkpoint {path} does not exist")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _CONFIG_KEY not in metadata:
        raise WeightsNotFound(f"{path} is not a Loupe fusion checkpoint (no {_CONFIG_KEY})")
    module = AttentionFusion(FusionConfig(**json.loads(metadata[_CONFIG_KEY])))
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.eval()


def fusion_digest(module: AttentionFusion) -> str:
    """A short hash of the config and weights: part of the model version."""
    digest = hashlib.sha256(json.dumps(asdict(module.config), sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]
