"""Tensor operations on whole updates, shared by defenses and the attacks that replay them.

A defense applies them to what the client sends; an adaptive attack (GGL,
Li et al. 2022) applies the same operations to its trial update. Living one
floor below both, they are written once and neither side imports the other.
Every function here is differentiable in its inputs where that makes sense
and has no data-dependent Python control flow, so it runs under
`torch.func.vmap` (GGL's population).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def global_norm(tensors: Sequence[Tensor]) -> float:
    """The joint L2 norm of `tensors` (a number, in float64, detached)."""
    with torch.no_grad():
        return float(torch.stack([(t.detach().double() ** 2).sum() for t in tensors]).sum().sqrt())


def clip_tensors(tensors: Sequence[Tensor], max_norm: float) -> tuple[Tensor, ...]:
    """Scale all tensors together so their joint L2 norm is at most `max_norm` (differentiable)."""
    norm = torch.stack([(t * t).sum() for t in tensors]).sum().sqrt()
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return tuple(t * factor for t in tensors)


def keep_count(n: int, sparsity: float | None, k: int | None) -> int:
    """How many of `n` entries a top-k sparsifier keeps: `k` when given, else round(n (1 - sparsity)), >= 1."""
    if k is not None:
        return max(1, min(int(k), n))
    return max(1, min(n, int(round(n * (1.0 - float(sparsity or 0.0))))))


def keep_largest(tensors: Sequence[Tensor], k: int) -> tuple[Tensor, ...]:
    """Zero all but the `k` largest magnitudes over `tensors` together.

    By a threshold rather than scattered indices: differentiable in the kept
    entries (the mask is a constant) and vmap-compatible (topk of a fixed size
    k); ties at the threshold keep a few more.
    """
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    thr = flat.topk(k).values[-1]
    return tuple(t * (t.abs() >= thr).to(t.dtype) for t in tensors)
