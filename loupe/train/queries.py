"""Short shopper query texts derived from a product's own title and attributes.

A shopper types "diamond ring" or "gold hoops", not the merchant's 200-word description, so the
model learns to match short phrases to products. Training draws from several templates; the
evaluation uses one template that training never draws (the ``subcategory``-like attribute, or
the title's last two words), so the measured gain is not the memory of an exact phrase.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

MAX_PHRASE_WORDS = 3  # an attribute value longer than this is a description, not a query
EVAL_ATTRIBUTE = "subcategory"
_WORD = re.compile(r"\w[\w'-]*", re.UNICODE)


def _words(text: str) -> list[str]:
    # "18K" and "9KT" are words a shopper types; a bare number or a SKU-like code is not.
    return [
        w.lower()
        for w in _WORD.findall(text)
        if not w.isdigit() and sum(c.isdigit() for c in w) <= 2
    ]


def _phrases(attributes: Mapping[str, object]) -> list[str]:
    """Attribute values short enough to be typed as a query, lower-cased."""
    phrases = []
    for key, value in attributes.items():
        if key == EVAL_ATTRIBUTE or not isinstance(value, str):
            continue
        words = _words(value)
        if 0 < len(words) <= MAX_PHRASE_WORDS:
            phrases.append(" ".join(words))
    return phrases


def training_queries(
    title: str, attributes: Mapping[str, object], count: int, rng: random.Random
) -> list[str]:
    """``count`` short queries for one product: attribute values, alone or before the title's
    last word (its noun, as in "rose gold ring"), and pairs of consecutive title words."""
    words = _words(title)
    noun = words[-1] if words else ""
    phrases = _phrases(attributes)
    candidates: list[str] = []
    candidates += phrases
    candidates += [f"{p} {noun}" for p in phrases if noun and noun not in p.split()]
    candidates += [" ".join(words[i : i + 2]) for i in range(max(0, len(words) - 1))]
    held_back = evaluation_query(title, attributes)
    candidates = [c for c in dict.fromkeys(candidates) if c and c != held_back]
    if not candidates:
        candidates = [" ".join(words) or title.strip().lower() or "product"]
    return [rng.choice(candidates) for _ in range(count)]


def evaluation_query(title: str, attributes: Mapping[str, object]) -> str:
    """The one held-back template: the ``subcategory`` attribute if the product has one (for
    jewelry, "diamond ring", "hoop earrings"), else the title's last two words."""
    value = attributes.get(EVAL_ATTRIBUTE)
    if isinstance(value, str) and _words(value):
        return " ".join(_words(value))
    words = _words(title)
    return " ".join(words[-2:]) if words else title.strip().lower()
