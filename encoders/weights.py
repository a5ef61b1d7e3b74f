"""Fingerprints of weight files, so the model version changes whenever the weights do."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def file_digest(path: Path, chunk_bytes: int = 4 * 1024 * 1024) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, bytes), hex."""
    return tensors_digest(module.state_dict())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (names, shapes, bytes), hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
