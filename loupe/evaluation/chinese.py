"""The demo catalog as a Chinese merchant would list it, and Chinese shoppers' words, through a
glossary: the evaluation of the text towers on Chinese (``bench.quality --languages``).

Categories, sub-categories, metals, stones, styles and the common words of the catalog's
titles are rendered in Chinese; product names (Sheen, Varnika, ...) stay as they are, as they
do on Chinese storefronts. Attribute names stay the contract's (``category``, ``material``):
they are field names, not words a shopper types. The English description is left out: a
Chinese listing would have its own.

A glossary is not a translation engine: it renders the words this catalog uses, phrase first
(so "Stud Earrings" is 耳钉, not 耳钉耳环), then word by word in the English order, which is
also the Chinese order for a modifier before its noun ("Diamond Ring": 钻石戒指).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from loupe.train.queries import evaluation_query
from loupe.train.source import TrainingProduct

CATEGORIES = {
    "bangle": "手镯",
    "bracelet": "手链",
    "earring": "耳环",
    "necklace": "项链",
    "pendant": "吊坠",
    "ring": "戒指",
}

# Whole phrases first: sub-categories and materials whose words, one by one, read badly.
PHRASES = {
    "stud earrings": "耳钉",
    "hoop earrings": "圈形耳环",
    "drop earrings": "垂坠耳环",
    "band ring": "素圈戒指",
    "chain bracelet": "链条手链",
    "cocktail ring": "鸡尾酒戒指",
    "solitaire ring": "单钻戒指",
    "solitaire pendant": "单钻吊坠",
    "solitaire diamond": "单颗钻石",
    "tennis bracelet": "网球手链",
    "traditional ring": "传统戒指",
    "18k gold & diamond": "18K金镶钻石",
    "gold & gemstone": "金镶宝石",
    "gold & pearl": "金镶珍珠",
    "18k gold": "18K金",
    "22k gold": "22K金",
    "22 kt gold": "22K金",
    "22kt gold": "22K金",
    "18 kt gold": "18K金",
    "18kt gold": "18K金",
    "14 kt gold": "14K金",
    "14kt gold": "14K金",
    "gold plated 925 silver": "镀金925银",
    "multi layer": "多层",
}

WORDS = {
    **CATEGORIES,
    "bangles": "手镯",
    "bracelets": "手链",
    "earrings": "耳环",
    "rings": "戒指",
    "hoops": "圈形耳环",
    "mangalsutra": "婚链",
    "diamond": "钻石",
    "diamonds": "钻石",
    "gold": "黄金",
    "platinum": "铂金",
    "silver": "银",
    "gemstone": "宝石",
    "stone": "宝石",
    "pearl": "珍珠",
    "stud": "耳钉",
    "hoop": "圈形",
    "drop": "垂坠",
    "drops": "垂坠",
    "chain": "链条",
    "band": "素圈",
    "solitaire": "单钻",
    "cocktail": "鸡尾酒",
    "tennis": "网球",
    "traditional": "传统",
    # styles
    "contemporary": "现代",
    "heritage": "传统",
    "floral": "花卉",
    "classic": "经典",
    "minimalist": "极简",
    "geometric": "几何",
    "romantic": "浪漫",
    # common title words
    "men": "男士",
    "kids": "儿童",
    "baby": "宝宝",
    "infinity": "无限",
    "infinite": "无限",
    "mesh": "网纹",
    "alphabet": "字母",
    "sparkle": "闪耀",
    "sparkling": "闪耀",
    "cluster": "群镶",
    "leaves": "叶子",
    "leaf": "叶子",
    "pear": "梨形",
    "wavy": "波浪",
    "butterfly": "蝴蝶",
    "swirl": "漩涡",
    "dazzle": "炫目",
    "dazzling": "炫目",
    "pretty": "精美",
    "petals": "花瓣",
    "bar": "条形",
    "blossom": "花开",
    "bloom": "绽放",
    "layer": "层",
    "twisted": "扭纹",
    "hexagon": "六边形",
    "delicate": "精致",
    "flutter": "飘逸",
    "floret": "小花",
    "flora": "花卉",
    "personalised": "定制",
    "starburst": "星芒",
    "love": "爱心",
    "heart": "心形",
    "lattice": "格纹",
    "gleaming": "闪亮",
    "glittery": "闪亮",
    "shimmering": "闪烁",
    "linear": "线条",
    "forever": "永恒",
    "plated": "镀",
    "dolphin": "海豚",
    "square": "方形",
    "key": "钥匙",
    "texture": "纹理",
    "chevron": "人字纹",
    "twirl": "旋转",
    "orb": "圆球",
    "urban": "都市",
    "seven": "七",
    "triad": "三重",
    "trinity": "三位一体",
    "kt": "K",
    "for": "",
    "and": "",
    "&": "",
}

_TOKEN = re.compile(r"[A-Za-z&]+|\d+|\S")
_CJK = re.compile(r"[\u3400-\u9fff]")
_PHRASE = re.compile(
    "|".join(rf"(?<![a-z]){re.escape(p)}(?![a-z])" for p in sorted(PHRASES, key=len, reverse=True)),
    re.IGNORECASE,
)


def to_chinese(text: str) -> str:
    """``text`` rendered through the glossary (see the module); unknown words (a product's
    name) kept as they are."""
    pieces: list[str] = []
    at = 0
    for found in [*_PHRASE.finditer(text), None]:
        end = found.start() if found else len(text)
        for token in _TOKEN.findall(text[at:end]):
            pieces.append(WORDS.get(token.lower(), token))
        if found:
            pieces.append(PHRASES[found.group(0).lower()])
            at = found.end()
    return _join([p for p in pieces if p])


def _join(pieces: list[str]) -> str:
    """Chinese words run together; a Latin word or a number keeps a space on its Latin side."""
    out = ""
    for piece in pieces:
        if out and not (_CJK.search(out[-1]) and _CJK.search(piece[0])):
            out += " "
        out += piece
    return out.strip()


def chinese_product(product: TrainingProduct) -> TrainingProduct:
    """``product`` as a Chinese listing: title and attribute values in Chinese, no description,
    the same key and photo. (Its ``category`` is then Chinese: measure against the English
    product's.)"""
    return TrainingProduct(
        key=product.key,
        title=to_chinese(product.title),
        attributes=_attributes(product.attributes),
        description="",
        image=product.image,
        media_type=product.media_type,
    )


def _attributes(attributes: Mapping[str, object]) -> dict[str, object]:
    return {
        key: to_chinese(value) if isinstance(value, str) else value
        for key, value in attributes.items()
    }


def chinese_queries(product: TrainingProduct) -> list[str]:
    """What a Chinese shopper types for this product: its category (戒指) and its
    sub-category (钻石戒指)."""
    category = CATEGORIES.get(str(product.attributes.get("category", "")).lower())
    queries = [to_chinese(evaluation_query(product.title, product.attributes))]
    if category:
        queries.insert(0, category)
    return list(dict.fromkeys(queries))


def english_queries(product: TrainingProduct) -> list[str]:
    """The same two in English: the category and the sub-category."""
    category = product.attributes.get("category")
    queries = [evaluation_query(product.title, product.attributes)]
    if isinstance(category, str) and category:
        queries.insert(0, category.lower())
    return list(dict.fromkeys(queries))
