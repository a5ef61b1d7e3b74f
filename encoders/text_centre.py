"""The common direction of an anisotropic text tower, removed from its vectors.

Some text towers put every text in a narrow cone: multilingual-e5-small's cosines between
unrelated product texts all lie close to 0.85, where all-MiniLM-L6-v2's spread over most of
[0, 1]. A ranking by the text alone does not care, but the fused view adds the text's cosine to
the photo's, and a text whose cosines barely move has little say there: photo + text answers
keep to the words' category less, and training's neighbourhood targets (softmaxes over those
cosines) come out nearly flat.

The fix is the usual one for anisotropic sentence embeddings: subtract the tower's mean unit
vector and normalise again. The mean is taken over ``REFERENCE_TEXTS``, fixed short shopping
texts in several languages (each read as a query and as a passage), not over a merchant's
catalog, so that a product's vector does not depend on which other products exist. The README
("Catalogs in Chinese") has what it changes, measured.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "models" / "centres"

REFERENCE_TEXTS: tuple[str, ...] = (
    # English: jewelry, then other things shops sell, then product-title length
    "gold ring",
    "diamond engagement ring",
    "silver necklace",
    "pearl earrings",
    "charm bracelet",
    "rose gold pendant",
    "men's watch",
    "wedding band",
    "gemstone stud earrings",
    "anklet",
    "leather handbag",
    "running shoes",
    "cotton t-shirt",
    "summer dress",
    "sunglasses",
    "ceramic coffee mug",
    "wooden chair",
    "wireless headphones",
    "phone case",
    "backpack",
    "18k yellow gold solitaire ring with a round brilliant diamond",
    "sterling silver chain necklace with a heart pendant",
    "handmade beaded bracelet in blue and white",
    "classic stainless steel wristwatch with a black dial",
    # Chinese: the same
    "金戒指",
    "钻石订婚戒指",
    "银项链",
    "珍珠耳环",
    "手链",
    "玫瑰金吊坠",
    "男士手表",
    "结婚对戒",
    "宝石耳钉",
    "脚链",
    "皮革手提包",
    "跑步鞋",
    "纯棉T恤",
    "夏季连衣裙",
    "太阳镜",
    "陶瓷咖啡杯",
    "18K黄金单钻戒指，圆形明亮式切割钻石",  # noqa: RUF001 (Chinese text takes the full-width comma)
    "925银心形吊坠项链",
    "手工串珠手链，蓝白色",  # noqa: RUF001
    "经典不锈钢腕表，黑色表盘",  # noqa: RUF001
    # Spanish, French, German, Japanese, Hindi
    "anillo de oro",
    "collar de plata",
    "bague en diamant",
    "boucles d'oreilles en perles",
    "Goldring",
    "Silberkette",
    "金の指輪",
    "真珠のネックレス",
    "सोने की अंगूठी",
    "चांदी का हार",
)


def reference_id(texts: tuple[str, ...] = REFERENCE_TEXTS) -> str:
    """A short hash of the reference texts: part of the text tower's identity (another list
    is another centre, so other vectors and another collection)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:6]


@torch.inference_mode()
def mean_direction(text_encoder, texts: tuple[str, ...] = REFERENCE_TEXTS) -> torch.Tensor:
    """``(D,)`` float32: the mean of the tower's unit vectors of ``texts``, each read as a
    shopper's query and as a product's text (a tower with prefixes reads the two apart).
    ``text_encoder`` is a ``TextEncoder`` without a centre yet; runs where its weights are."""
    device = next(text_encoder.model.parameters()).device
    vectors = [
        F.normalize(
            text_encoder(**text_encoder.tokenize(texts, device, [query] * len(texts))).float(),
            dim=-1,
        )
        for query in (True, False)
    ]
    return torch.cat(vectors).mean(dim=0)


def cached_mean_direction(
    text_encoder, key: str, cache_dir: Path = DEFAULT_CACHE_DIR
) -> torch.Tensor:
    """``mean_direction(text_encoder)``, computed on a tower's first start and read back on
    the later ones (a second's encoding saved at every start). ``key`` names the tower, its
    weights' fingerprint, the reference texts and anything else that moves the centre, so that
    another model never reads this one's. A file that cannot be read or written is only a cost:
    the centre is computed."""
    path = cache_dir / f"{key}.pt"
    try:
        centre = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(centre, torch.Tensor) and centre.shape == (text_encoder.dim,):
            return centre.to(next(text_encoder.model.parameters()).device)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        pass  # missing, torn or foreign: computed again below
    centre = mean_direction(text_encoder)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.partial")
        torch.save(centre.detach().cpu(), staging)
        staging.replace(path)  # atomic: a reader sees a whole file or none
    except OSError:
        pass
    return centre
