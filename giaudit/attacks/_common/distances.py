"""Gradient distances and image regularisers.

- squared L2 summed over layers (DLG, Zhu et al. 2019);
- negative cosine over the concatenated layers, returned as 1 - cos (Geiping et al. 2020);
- optional per-layer weights for either (DiffULA's window, GGL's layer weights);
- total variation as in Geiping et al. (mean absolute neighbour differences).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def l2_distance(trial: Sequence[Tensor], target: Sequence[Tensor],
                weights: Sequence[float] | None = None) -> Tensor:
    total = trial[0].new_zeros(())
    for i, (a, b) in enumerate(zip(trial, target)):
        w = 1.0 if weights is None else weights[i]
        if w:
            total = total + w * (a - b).pow(2).sum()
    return total


def cosine_distance(trial: Sequence[Tensor], target: Sequence[Tensor],
                    weights: Sequence[float] | None = None) -> Tensor:
    dot = trial[0].new_zeros(())
    na = trial[0].new_zeros(())
    nb = trial[0].new_zeros(())
    for i, (a, b) in enumerate(zip(trial, target)):
        w = 1.0 if weights is None else weights[i]
        if w:
            dot = dot + w * (a * b).sum()
            na = na + w * a.pow(2).sum()
            nb = nb + w * b.pow(2).sum()
    return 1.0 - dot / (na.sqrt() * nb.sqrt()).clamp_min(1e-12)


DISTANCES = {"l2": l2_distance, "cosine": cosine_distance}


def total_variation(x: Tensor) -> Tensor:
    dx = (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean()
    dy = (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()
    return dx + dy
