"""Pairing reconstructed images with the private images they came from.

A batch attack returns its images in no particular order, so before any
per-image metric the evaluator pairs them with the ground truth by the
assignment that minimises total pixel MSE (Hungarian algorithm, Kuhn 1955;
scipy's ``linear_sum_assignment``). This is standard in the gradient-inversion
literature (e.g. Geiping et al. 2020; Carletti et al.'s SoK) and is the most
favourable pairing for the attacker, hence the conservative one for an audit.
Only the evaluator runs it: it needs the ground truth, which no attack sees.

A malicious server's attack (e.g. the imprint of Robbing the Fed) recovers a
set of images from an aggregate of many users, which may hold more images than
the audited client's batch: each private image is then paired with a distinct
one of them (the same assignment, rectangular). Fewer reconstructions than
private images cannot be paired.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def pairwise_mse(a: Tensor, b: Tensor) -> Tensor:
    """N x M matrix of per-image MSE between every a[i] and every b[j] (float64).

    Uses |a|^2 + |b|^2 - 2 a.b so the N*M*D difference tensor is never built;
    float64 keeps the cancellation error far below any real MSE gap.
    """
    fa = a.detach().to(torch.float64).flatten(1)
    fb = b.detach().to(torch.float64).flatten(1)
    d = fa.shape[1]
    sq = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2.0 * fa @ fb.T
    return sq.clamp_min(0.0) / d


def match(reconstruction: Tensor, original: Tensor) -> torch.LongTensor:
    """Indices `perm` such that ``reconstruction[perm[i]]`` pairs with ``original[i]`` (distinct rows; a
    permutation when both batches have the same size).

    Raises ValueError when there are fewer reconstructions than originals or the image shapes differ, naming
    both, since a one-to-one pairing is then undefined.
    """
    if reconstruction.dim() != 4 or original.dim() != 4:
        raise ValueError(
            f"match takes N,C,H,W batches; got reconstruction {tuple(reconstruction.shape)} "
            f"and original {tuple(original.shape)}")
    n_rec, n_org = reconstruction.shape[0], original.shape[0]
    if n_rec < n_org:
        raise ValueError(
            f"cannot pair {n_rec} reconstructed images with {n_org} original images one-to-one; "
            "the attack must return at least as many images as the client's batch")
    if reconstruction.shape[1:] != original.shape[1:]:
        raise ValueError(
            f"reconstructed images have shape {tuple(reconstruction.shape[1:])} but originals "
            f"{tuple(original.shape[1:])}")
    if n_org == 0:
        return torch.zeros(0, dtype=torch.long, device="cpu")  # type: ignore[return-value]
    cost = pairwise_mse(original, reconstruction).numpy()  # rows: originals, cols: reconstructions
    if not np.isfinite(cost).all():
        raise ValueError("cannot pair images: the reconstruction contains NaN or infinite pixel values")
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(n_org, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)  # type: ignore[return-value]
