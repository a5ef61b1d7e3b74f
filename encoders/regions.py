"""The part of a shopper's photo where the product is: found before it is matched.

A product photographed lying on a table, a wrist or in a box fills a third to two thirds of the
frame; the rest is a surface the catalog photo never had, and the whole photo's vector hears it.
The image tower already says where the product is: its last feature maps respond most where
the photo has the structure it was trained to see (the product's stones, metal and edges), least
on a plain or even textured surface. So a photo query is encoded whole and in parts: squares of
each of the profile's ``query_region_shares`` of the model's square input around the maps'
strongest response (a small product and a large one), cut from the photo as it was decoded
(``crop_photo``: a phone photo decodes at twice the model's side or more, so a part keeps its
own detail instead of being the model's pixels enlarged) and read at the tower's full input
size. The search then ranks each product at its closest part's score, the whole photo's
included (``loupe/ranking.py``, ``best_of``), and each hit says which part of the photo
matched. docs/training.md ("Photos of scenes") has the measurements that chose the shares and
the rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loupe.encoders.images import Fit, fit_square

GEM_P = 3.0  # the image tower's pooling exponent: the heat weighs cells as the pooling does


def heat_of(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` feature maps (>= 0) to ``(B, h, w)``: each cell's share of the pooled
    vector's energy, as GeM pooling weighs it."""
    return maps.float().clamp(min=1e-6).pow(GEM_P).mean(dim=1)  # (B, h, w)


def region_boxes(heat: torch.Tensor, share: float) -> torch.Tensor:
    """``(B, h, w)`` heat to ``(B, 4)`` boxes ``(left, top, width, height)`` as shares of the
    square input: a square of side ``share`` centred on the hottest cell, moved inside."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    batch, h, w = heat.shape
    hottest = heat.reshape(batch, -1).argmax(dim=1)  # (B,)
    centre_y = ((hottest // w).float() + 0.5) / h  # (B,) in [0, 1]
    centre_x = ((hottest % w).float() + 0.5) / w
    left = (centre_x - share / 2).clamp(0.0, 1.0 - share)
    top = (centre_y - share / 2).clamp(0.0, 1.0 - share)
    side = torch.full_like(left, share)
    return torch.stack([left, top, side, side], dim=1)  # (B, 4)


def crop_regions(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` pixels and ``(B, 4)`` boxes to ``(B, 3, S, S)``: each box cut out and
    resized (bilinear) to the whole square."""
    side = pixels.shape[-1]
    crops = []
    for image, (left, top, width, height) in zip(pixels, boxes.tolist(), strict=True):
        x, y = round(left * side), round(top * side)
        cw, ch = max(1, round(width * side)), max(1, round(height * side))
        part = image[:, y : y + ch, x : x + cw].unsqueeze(0)  # (1, 3, ch, cw)
        crops.append(
            F.interpolate(part, size=(side, side), mode="bilinear", align_corners=False)
        )  # (1, 3, S, S)
    return torch.cat(crops).contiguous()


def crop_photo(
    upright: torch.Tensor, box: tuple[float, float, float, float], side: int, fit: Fit
) -> torch.Tensor | None:
    """The part of a decoded photo (``(3, H, W)`` uint8, upright) that ``box`` (shares of the
    model's square input, which ``fit`` made of it) covers, fitted to ``(3, side, side)`` as a
    photo is; None where the box holds no pixel of the photo (it lies in the square's padding).
    The part keeps the photo's resolution: measured on the scenes family (docs/training.md),
    6 points of R@1 over the same box cut from the model's pixels and enlarged."""
    height, width = upright.shape[-2:]
    left, top, box_w, box_h = photo_box(box, width, height, fit)
    x0, y0 = round(left * width), round(top * height)
    x1, y1 = round((left + box_w) * width), round((top + box_h) * height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return fit_square(upright[:, y0:y1, x0:x1], side, fit)


def photo_box(
    box: tuple[float, float, float, float], width: int, height: int, fit: str
) -> tuple[float, float, float, float]:
    """A box in shares of the model's square input to shares of the upright photo (``width``
    x ``height``) that ``fit`` made the square of, clipped to the photo."""
    left, top, box_w, box_h = box
    if fit == "pad":  # the photo centred in the square, its long side the square's
        long_side = max(width, height)
        share_w, share_h = width / long_side, height / long_side
        left, top = left - (1 - share_w) / 2, top - (1 - share_h) / 2
        left, top, box_w, box_h = left / share_w, top / share_h, box_w / share_w, box_h / share_h
    elif fit == "center_crop":  # the square is the central 0.875 of the short side
        side = 0.875 * min(width, height)
        share_w, share_h = side / width, side / height
        left, top = (1 - share_w) / 2 + left * share_w, (1 - share_h) / 2 + top * share_h
        box_w, box_h = box_w * share_w, box_h * share_h
    right, bottom = min(1.0, left + box_w), min(1.0, top + box_h)
    left, top = max(0.0, left), max(0.0, top)
    return left, top, max(0.0, right - left), max(0.0, bottom - top)
