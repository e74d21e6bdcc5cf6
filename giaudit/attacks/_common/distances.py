"""Gradient distances and image regularisers.

- squared L2 summed over layers (DLG, Zhu et al. 2019);
- negative cosine over the concatenated layers, returned as 1 - cos (Geiping et al. 2020);
- optional per-layer weights for either (DiffULA's window, GGL's layer weights);
- total variation as in Geiping et al. (mean absolute neighbour differences).

With `stacked=True` every tensor carries a leading problem axis K (the stacked solvers' K independent
problems) and each function returns the K problems' values, (K,), each reduced over its own problem's
entries only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _total(t: Tensor, stacked: bool) -> Tensor:
    """The sum of `t`'s entries, or of each problem's (a leading axis K) when `stacked`."""
    return t.reshape(t.shape[0], -1).sum(1) if stacked else t.sum()


def l2_distance(trial: Sequence[Tensor], target: Sequence[Tensor],
                weights: Sequence[float] | None = None, stacked: bool = False) -> Tensor:
    total = trial[0].new_zeros(trial[0].shape[:1] if stacked else ())
    for i, (a, b) in enumerate(zip(trial, target)):
        w = 1.0 if weights is None else weights[i]
        if w:
            total = total + w * _total((a - b).pow(2), stacked)
    return total


def _cosine_plain(trial: Sequence[Tensor], target: Sequence[Tensor],
                  weights: Sequence[float] | None = None, stacked: bool = False) -> Tensor:
    dot = trial[0].new_zeros(trial[0].shape[:1] if stacked else ())
    na = dot.clone()
    nb = dot.clone()
    for i, (a, b) in enumerate(zip(trial, target)):
        w = 1.0 if weights is None else weights[i]
        if w:
            dot = dot + w * _total(a * b, stacked)
            na = na + w * _total(a.pow(2), stacked)
            nb = nb + w * _total(b.pow(2), stacked)
    return 1.0 - dot / (na.sqrt() * nb.sqrt()).clamp_min(1e-12)


class _CosineDistance(torch.autograd.Function):
    """1 - cos(trial, target) with a hand-written, once-differentiable backward.

    The matching loss is differentiated only once (its second derivative is
    never needed: the double backward of an inversion attack runs through the
    network's graph, not through the distance), so the backward can write each
    layer's gradient in one fused expression instead of autograd's chain of
    temporaries. On ResNet-18 (11 M parameters) this halves the distance's
    cost (benchmarks/ig_speed.py). The target is constant: no gradient for it.
    """

    @staticmethod
    def forward(ctx, weights, *tensors):
        n = len(tensors) // 2
        trial, target = tensors[:n], tensors[n:]
        w = [1.0] * n if weights is None else [float(v) for v in weights]
        dot = trial[0].new_zeros((), dtype=torch.float64)
        na2 = dot.clone()
        nb2 = dot.clone()
        for wi, a, b in zip(w, trial, target):
            if wi:
                fa, fb = a.reshape(-1), b.reshape(-1)
                dot += wi * torch.dot(fa, fb).double()
                na2 += wi * torch.dot(fa, fa).double()
                nb2 += wi * torch.dot(fb, fb).double()
        denom = (na2.sqrt() * nb2.sqrt()).clamp_min(1e-12)
        ctx.save_for_backward(*trial, *target)
        ctx.stats = (w, dot, na2, nb2, denom)
        return (1.0 - dot / denom).to(trial[0].dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        saved = ctx.saved_tensors
        n = len(saved) // 2
        trial, target = saved[:n], saved[n:]
        w, dot, na2, nb2, denom = ctx.stats
        # d(1 - dot/(|a||b|))/da_i = w_i * (-b_i/(|a||b|) + dot * a_i / (|a|^3 |b|))
        c_b = float(-g / denom)
        c_a = float(g * dot / (denom * na2.clamp_min(1e-24)))
        grads = [None if not wi else wi * (c_b * b + c_a * a) for wi, a, b in zip(w, trial, target)]
        return (None, *grads, *([None] * n))


def cosine_distance(trial: Sequence[Tensor], target: Sequence[Tensor],
                    weights: Sequence[float] | None = None, stacked: bool = False) -> Tensor:
    """Negative cosine similarity over the concatenated (optionally weighted) layers, as 1 - cos."""
    if stacked:
        return _cosine_plain(trial, target, weights, stacked=True)
    if any(t.requires_grad for t in target) or torch._C._functorch.is_functorch_wrapped_tensor(trial[0]):
        # A differentiable target (meta-learning) or a functorch transform: the plain autograd form.
        return _cosine_plain(trial, target, weights)
    return _CosineDistance.apply(weights, *trial, *target)


DISTANCES = {"l2": l2_distance, "cosine": cosine_distance}


def total_variation(x: Tensor, stacked: bool = False) -> Tensor:
    dx = (x[..., :-1] - x[..., 1:]).abs()
    dy = (x[..., :-1, :] - x[..., 1:, :]).abs()
    if stacked:
        return dx.reshape(x.shape[0], -1).mean(1) + dy.reshape(x.shape[0], -1).mean(1)
    return dx.mean() + dy.mean()
