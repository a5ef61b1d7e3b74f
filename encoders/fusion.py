"""The trainable part of the model: projection heads per view, and the attention fusion.

``FusionModel`` sits on the frozen towers' unit vectors. The ``image`` and ``text`` views pass
through light residual projection heads (``ProjectionHead``); the ``fused`` view is the weighted
concatenation of the two heads' outputs, re-weighted by scaled dot-product attention
(``AttentionFusion``). Everything starts as the identity, so an untrained model gives exactly the
towers' vectors and their weighted concatenation; ``loupe train`` fits it to a catalog.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loupe.encoders.errors import EncoderError, WeightsNotFound
from loupe.encoders.weights import tensors_digest


@dataclass(frozen=True)
class FusionConfig:
    image_dim: int = 1280  # image tower's output size
    text_dim: int = 384  # text tower's output size
    token_dim: int = 128  # features per attention token; must divide both dims
    n_heads: int = 4  # attention heads; must divide token_dim
    image_weight: float = 0.5  # share of the fused cosine that comes from the image (0..1)
    head_rank: int = 128  # rank of the residual projection heads; 0: no heads (identity views)
    # A fixed linear map of the image vector before its head (``ImageWhitening``), fitted by
    # ``loupe train``; off in the untrained model.
    image_whitening: bool = False

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
        if not 0 <= self.head_rank <= min(self.image_dim, self.text_dim):
            raise ValueError(
                f"head_rank must be within [0, {min(self.image_dim, self.text_dim)}], "
                f"got {self.head_rank}"
            )

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


class ProjectionHead(nn.Module):
    """``x + up(down(x))``: a low-rank residual map of one view, the identity at initialisation
    (``up`` starts at zero). Low rank keeps it light and hard to overfit on a small catalog."""

    def __init__(self, dim: int, rank: int, seed: int) -> None:
        super().__init__()
        self.rank = rank
        if rank:
            with torch.random.fork_rng():  # fixed: the untrained model must hash the same
                torch.manual_seed(seed)
                self.down = nn.Linear(dim, rank, bias=False)
                self.up = nn.Linear(rank, dim, bias=False)
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rank:
            return x.float()
        x = x.float()
        return x + self.up(self.down(x))  # (B, D)


class ImageWhitening(nn.Module):
    """``normalize((x - mean) @ matrix)``: the image vector with the directions in which a
    shopper's photo of a product differs from its catalog photo (crop, light, blur) shrunk, and
    the others kept. Not learnt by gradient: ``loupe train`` fits it in closed form from the
    simulated photos (``loupe.train.whitening``). Starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((x.float() - self.mean) @ self.matrix, dim=-1)  # (B, D)


class FusionModel(nn.Module):
    """The three views from the towers' vectors: ``image``, ``text`` and ``fused``, each unit
    length. This is what a fusion checkpoint holds and what ``loupe train`` fits."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.image_whitening = ImageWhitening(config.image_dim) if config.image_whitening else None
        self.image_head = ProjectionHead(config.image_dim, config.head_rank, seed=1)
        self.text_head = ProjectionHead(config.text_dim, config.head_rank, seed=2)
        self.attention = AttentionFusion(config)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The image view before its final normalisation: whitened if so fitted, then the head."""
        if self.image_whitening is not None:
            image = self.image_whitening(image)
        return self.image_head(image)  # (B, image_dim)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(image), dim=-1)  # (B, image_dim)

    def text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text), dim=-1)  # (B, text_dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The fused view of image and text vectors of the same items: ``(B, image + text)``."""
        return self.attention(self.image_features(image), self.text_head(text))


def with_image_whitening(
    model: FusionModel, mean: torch.Tensor, matrix: torch.Tensor
) -> FusionModel:
    """A copy of ``model`` whose image vectors are whitened by ``(mean, matrix)`` before its
    image head (``ImageWhitening``); its other weights are ``model``'s."""
    whitened = FusionModel(replace(model.config, image_whitening=True))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("image_whitening.")}
    state["image_whitening.mean"] = mean.detach().float().cpu()
    state["image_whitening.matrix"] = matrix.detach().float().cpu()
    whitened.load_state_dict(state, strict=True)
    return whitened


_CONFIG_KEY = "loupe.fusion.config"
_BASE_KEY = "loupe.fusion.base"  # which towers and preprocessing the heads were trained on
_TRAINING_KEY = "loupe.fusion.training"  # how it was trained and what it measured (JSON)
_FORMAT_KEY = "loupe.fusion.format"
_FORMAT = "3"  # 3: and the image tower's tuned tail; 2: FusionModel (heads + attention)
_READABLE = ("2", "3")  # 1 was the attention alone
TOWER_PREFIX = "image_tower."  # a tuned tail's tensors, under the backbone's own names


class CheckpointMismatch(EncoderError, ValueError):
    """A fusion checkpoint made for other towers or preprocessing than the configured ones.
    Policy: stop; its heads would map the wrong features, and the vectors would be wrong."""


@dataclass(frozen=True)
class FusionCheckpoint:
    """A loaded checkpoint: the model, the base it was trained on and its training record."""

    model: FusionModel
    base: str  # the towers' and preprocessing's identity (``FusedEncoder.base_version``)
    training: dict = field(default_factory=dict)
    path: Path | None = None
    # The image tower's tuned weights (``encoders.tower_tail``), for ``ImageEncoder.load_tuned``;
    # empty when only the heads were trained.
    image_tower: dict[str, torch.Tensor] = field(default_factory=dict)

    def require_base(self, base: str) -> None:
        """Refuse to use these heads on vectors of other towers or other preprocessing."""
        if self.base != base:
            raise CheckpointMismatch(
                f"the fusion checkpoint {self.path} was trained for the model base "
                f"{self.base!r}, but the configured towers and preprocessing are {base!r}; "
                "train a checkpoint for them (`loupe train`) or configure the base it was made "
                "for (LOUPE_IMAGE_BACKBONE, LOUPE_TEXT_BACKBONE, their weights, LOUPE_IMAGE_FIT, "
                "LOUPE_IMAGE_POOLING)"
            )


def save_fusion(
    module: FusionModel,
    path: Path,
    *,
    base: str,
    training: dict | None = None,
    image_tower: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write the weights (the heads', and the image tower's tuned ones if any), config, base
    and training record as safetensors; return the checkpoint's hash (``checkpoint_digest``),
    written atomically so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for name, tensor in (image_tower or {}).items():
        tensors[TOWER_PREFIX + name] = tensor.detach().cpu().contiguous()
    metadata = {
        _FORMAT_KEY: _FORMAT,
        _CONFIG_KEY: json.dumps(config_record(module.config)),
        _BASE_KEY: base,
        _TRAINING_KEY: json.dumps(training or {}, sort_keys=True),
    }
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)
    return checkpoint_digest(module, image_tower)


def load_fusion(path: Path) -> FusionCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(
            f"fusion checkpoint {path} does not exist (make one with `loupe train`, or unset "
            "LOUPE_FUSION_CHECKPOINT for the untrained fusion)"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise WeightsNotFound(f"{path} is not a readable safetensors file: {exc}") from exc
    if _CONFIG_KEY not in metadata:
        raise WeightsNotFound(f"{path} is not a Loupe fusion checkpoint (no {_CONFIG_KEY})")
    if metadata.get(_FORMAT_KEY) not in _READABLE:
        raise WeightsNotFound(
            f"{path} is a fusion checkpoint of format {metadata.get(_FORMAT_KEY, '1')}; this "
            f"Loupe reads formats {', '.join(_READABLE)}: train it again with `loupe train`"
        )
    module = FusionModel(FusionConfig(**json.loads(metadata[_CONFIG_KEY])))
    tensors = load_file(str(path))
    tower = {k[len(TOWER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(TOWER_PREFIX)}
    heads = {k: v for k, v in tensors.items() if not k.startswith(TOWER_PREFIX)}
    module.load_state_dict(heads, strict=True)
    return FusionCheckpoint(
        model=module.eval(),
        base=metadata.get(_BASE_KEY, ""),
        training=json.loads(metadata.get(_TRAINING_KEY, "{}")),
        path=path,
        image_tower=tower,
    )


def checkpoint_digest(
    module: FusionModel, image_tower: dict[str, torch.Tensor] | None = None
) -> str:
    """A checkpoint's short hash: the heads' (``fusion_digest``) when the tower was not tuned,
    else over the heads' and the tower's tuned weights. Names its file; the model version
    holds the two parts apart (the tower's in its weights' identity)."""
    if not image_tower:
        return fusion_digest(module)
    digest = hashlib.sha256(fusion_digest(module).encode())
    digest.update(tensors_digest(image_tower).encode())
    return digest.hexdigest()[:8]


def fusion_digest(module: FusionModel) -> str:
    """A short hash of the config and weights: part of the model version."""
    digest = hashlib.sha256(json.dumps(config_record(module.config), sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


# Fields added to FusionConfig after checkpoint format 2, with the value that leaves the model
# as it was: written only when set otherwise, so that the untrained model and earlier
# checkpoints keep their model versions (and their collections).
_LATER_FIELDS = {"image_whitening": False}


def config_record(config: FusionConfig) -> dict:
    """``config`` as a checkpoint and the model version record it."""
    record = asdict(config)
    for name, unchanged in _LATER_FIELDS.items():
        if record[name] == unchanged:
            del record[name]
    return record
