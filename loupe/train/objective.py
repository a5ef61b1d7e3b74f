"""What training minimises: find the product (InfoNCE), keep the neighbourhoods (KL).

Instance contrastive learning alone pulls a shopper's photo to its own product and pushes every
other product away, same category or not, so the catalog's category neighbourhoods dissolve.
The neighbourhood term keeps them: for every anchor it compares the frozen model's softmax over
its similarities to the other products with the trained model's, and penalises the
divergence. The anchor's own product is masked out of that comparison, so the two terms do not
fight: InfoNCE decides where the own product ranks, the KL term how the rest are ordered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float, own: torch.Tensor | None = None
) -> torch.Tensor:
    """Query ``j``'s positive is key ``own[j]`` (default: key ``j``); every other key in the
    batch is a negative. ``queries`` ``(Q, D)`` and ``keys`` ``(B, D)``: unit vectors."""
    logits = queries @ keys.T / temperature  # (Q, B)
    if own is None:
        own = torch.arange(len(queries), device=queries.device)
    return F.cross_entropy(logits, own)


def neighbourhood_kl(
    frozen_scores: torch.Tensor,
    scores: torch.Tensor,
    temperature: float,
    *,
    mask_own: bool = True,
    own: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(softmax(frozen / t) || softmax(trained / t))`` per row, averaged. ``(Q, N)`` cosine
    matrices; with ``mask_own`` each row's own product (column ``own[j]``, default the
    diagonal) is left out."""
    if mask_own:
        rows = torch.arange(scores.shape[0], device=scores.device)
        columns = rows if own is None else own
        mask = torch.zeros_like(scores, dtype=torch.bool)  # (Q, N)
        mask[rows, columns] = True
        frozen_scores = frozen_scores.masked_fill(mask, float("-inf"))
        scores = scores.masked_fill(mask, float("-inf"))
    target = F.softmax(frozen_scores / temperature, dim=-1)  # (B, N)
    log_predicted = F.log_softmax(scores / temperature, dim=-1)  # (B, N)
    # -inf * 0 on the masked diagonal would be NaN: only where the target has mass counts.
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_predicted), 0.0)
    return terms.sum(dim=-1).mean()
