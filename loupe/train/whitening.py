"""The image view's whitening, fitted in closed form from the simulated shopper photos.

A shopper's photo and the catalog photo of the same product differ along some directions of
the image tower's vector far more than along others: a crop, the light, blur move it one way
whatever the product. ``fit_whitening`` estimates those directions from the training products'
differences (simulated photo minus catalog photo) and returns the map that divides each by its
spread, so that a cosine weighs what tells products apart over what tells photos apart (the
learnt whitening of instance retrieval). Shrinkage toward the identity keeps the directions the
training photos measured poorly: with it, the products never trained on gain as the others do
(``bench.quality``; docs/training.md, "Whitening the image view").

It runs before the image head (``encoders.fusion.ImageWhitening``) and costs a query one
``D x D`` product, nothing beside the tower.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 256  # products whose differences are summed at once: bounded memory on any catalog


def fit_whitening(
    catalog: np.ndarray,
    views: np.ndarray,
    rows: np.ndarray,
    shrinkage: float,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, matrix)`` of the whitening fitted on products ``rows``: ``catalog`` ``(N, D)``
    their catalog photos' vectors, ``views`` ``(N, K, D)`` their simulated photos'.
    ``shrinkage`` (> 0) adds that many times the mean variance to every direction's: larger
    is closer to the identity. Float64 throughout: the spectrum spans orders of magnitude."""
    if shrinkage <= 0:
        raise ValueError(f"shrinkage must be positive, got {shrinkage}")
    if len(rows) < 2:
        raise ValueError(f"fitting the whitening needs at least 2 products, got {len(rows)}")
    device = device or torch.device("cpu")
    dim = catalog.shape[1]
    scatter = torch.zeros((dim, dim), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        anchor = torch.from_numpy(catalog[chunk]).to(device, torch.float64)  # (n, D)
        photos = torch.from_numpy(views[chunk]).to(device, torch.float64)  # (n, K, D)
        differences = (photos - anchor[:, None]).reshape(-1, dim)  # (n*K, D)
        scatter += differences.T @ differences
        count += len(differences)
    variances, directions = torch.linalg.eigh(scatter / count)  # ascending, (D,), (D, D)
    variances = variances.clamp(min=0.0)
    scale = (variances + shrinkage * variances.mean()).rsqrt()  # (D,)
    scale = scale / scale.max()  # only directions' relative weights matter (cosines)
    matrix = (directions * scale) @ directions.T  # (D, D), symmetric
    mean = torch.from_numpy(catalog[rows]).to(device, torch.float64).mean(0)  # (D,)
    return mean.float().cpu(), matrix.float().cpu()
