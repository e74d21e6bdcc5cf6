"""Defense-aware matching: replay the deterministic part of a disclosed defense on a trial update.

GGL's adaptive attack (Li et al. 2022, seed 004): when the server knows (or
estimates) the defense, a gradient-matching attack passes its own trial
update through the same deterministic operations before comparing it with
the observed one, so it matches like with like:

- clipping (`clip`): scale the trial to norm min(||trial||, C), with C the
  disclosed bound, or the observed update's norm when C is not disclosed;
- sparsification (`sparsify`): keep only the entries the observed update kept
  (its non-zero mask): exact for top-k and random masks alike, and
  differentiable (a constant mask);
- DP-SGD at batch size 1 (`dpsgd`, disclosed `dp_max_grad_norm`): per-sample
  clipping of one sample is clipping of the whole gradient. For larger batches
  per-sample clipping needs per-sample trial gradients and is not replayed.

Noise, quantisation and aggregation are random or non-differentiable and are
left alone. Operations are replayed in chain order (`disclosed["defenses"]`,
written by `registry.DefenseChain`); without it, clipping comes first.

Threat model: the attacker's (B-class) knowledge plus the disclosed defense
parameters; it never sees the private batch.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from giaudit.defenses.clip import clip_tensors

REPLAYED = ("dpsgd", "clip", "sparsify")


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.detach() * t.detach()).sum() for t in tensors))


def adapt_trial(trial: tuple[Tensor, ...], disclosed: Mapping[str, Any],
                observed: tuple[Tensor, ...], batch_size: int | None = None,
                kind: str = "gradient") -> tuple[Tensor, ...]:
    """The trial update after the disclosed defenses' deterministic operations (differentiable in `trial`).

    `batch_size` and `kind` (the observation's `batch_size` and `update.kind`) enable the DP-SGD replay,
    exact only for one sample's FedSGD gradient.
    """
    if len(trial) != len(observed):
        raise ValueError(f"trial has {len(trial)} tensors, the observed update {len(observed)}")
    order = list(disclosed.get("defenses") or [n for n in REPLAYED if _present(n, disclosed)])
    out = tuple(trial)
    for name in order:
        if name == "clip" and "clip_norm" in disclosed:
            bound = disclosed.get("clip_norm")
            # GGL estimates the bound as the observed norm when it is not disclosed.
            bound = float(bound) if bound is not None else float(_norm(observed))
            out = clip_tensors(out, bound)
        elif name == "sparsify" and "sparsify" in disclosed:
            out = tuple(t * (o != 0).to(t.dtype) for t, o in zip(out, observed))
        elif name == "dpsgd" and batch_size == 1 and kind == "gradient":
            bound = disclosed.get("dp_max_grad_norm")
            if bound is not None and math.isfinite(float(bound)):
                out = clip_tensors(out, float(bound))
    return out


def _present(name: str, disclosed: Mapping[str, Any]) -> bool:
    key = {"clip": "clip_norm", "sparsify": "sparsify", "dpsgd": "dp_max_grad_norm"}[name]
    return key in disclosed
