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

import torch
import torch.nn.functional as F

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
