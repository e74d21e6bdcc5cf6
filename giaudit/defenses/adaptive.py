"""Defense-aware matching: replay the deterministic part of a disclosed defense on a trial update.

GGL's adaptive attack (Li et al. 2022, seed 004), available to every
gradient-matching attack: when the server knows (or estimates) the defense, the
attack passes its own trial update through the same deterministic operations
before comparing it with the observed one, so it matches like with like.

- DP-SGD at batch size 1 (`dpsgd`, disclosed `dp_max_grad_norm`), FedSGD
  only: per-sample clipping of one sample is clipping of the whole gradient.
  It happens while the client computes its update, so it is replayed first,
  whatever the chain order. Larger batches (per-sample trial gradients) and
  FedAvg (clipping inside every local step) are not replayed.
- Clipping (`clip`): scale the trial to norm min(||trial||, C), with C the
  disclosed bound; GGL's estimate, the observed update's norm, when the bound
  is withheld (`clip_norm` disclosed as None) or, with no clip in the chain,
  when `clip_estimate` is set (then it is applied last: the observed norm is
  the bound only if nothing after the clip changed it).
- Sparsification (`sparsify`): when the observed mask is visible, keep only the
  entries the observed update kept (exact for top-k and random masks alike, a
  constant mask); when noise added later hid the mask, apply the same top-k to
  the trial (per layer, or one global threshold for `topk_global`) at the
  disclosed level (`sparsify_k` if disclosed, else `sparsity`). A hidden random
  mask cannot be replayed.

Noise, quantisation and aggregation are random or non-differentiable and are
left alone. Operations are replayed in chain order (`disclosed["defenses"]`,
written by `registry.DefenseChain`); without it: clip, then sparsify.

One implementation serves every attack: `Replay.build` decides everything from
the observation once (masks, bounds, top-k counts, the step list), and
`Replay.__call__` is plain tensor algebra with no data-dependent Python control
flow and no `.item()`, so it is differentiable and can run inside
`torch.func.vmap` (GGL's population). `replay_for(obs)` caches the Replay per
observation; `adapt_trial` is the one-shot functional form.

Where the two former implementations (this module's `adapt_trial` and GGL's
own `Adapter`) differed, the more correct behaviour was kept:
- mask visible or hidden: `adapt_trial` always used the observed zeros (after
  noise there are none, so nothing was replayed); GGL's `Adapter` switched to
  top-k unless some layer was more than half zeros (so below 50 % sparsity a
  visible random mask was ignored). Now: the mask is visible when the observed
  update has at least half the zeros the disclosed level implies.
- top-k count: GGL used only `sparsity`; a defense configured with `k` discloses
  the observed zero fraction as `sparsity` (about 0 after noise), so `sparsify_k`
  now takes precedence.
- DP-SGD at batch 1 (only `adapt_trial` had it) is kept, and is now always
  first, since the per-sample clip precedes every update transform.
- an estimated bound: both triggers are kept (`clip_norm` None, `clip_estimate`).

Threat model: the attacker's (B-class) knowledge plus the disclosed defense
parameters; it never sees the private batch.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from giaudit.defenses.clip import clip_tensors
from giaudit.types import Observation

REPLAYED = ("dpsgd", "clip", "sparsify")
_KEYS = {"clip": "clip_norm", "sparsify": "sparsify", "dpsgd": "dp_max_grad_norm"}


def _norm(tensors: Sequence[Tensor]) -> float:
    with torch.no_grad():
        return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def _keep(n: int, sparsity: float | None, k: int | None) -> int:
    # The count Sparsify keeps: k when configured with k, else round(n (1 - sparsity)), at least 1.
    if k is not None:
        return max(1, min(int(k), n))
    return max(1, min(n, int(round(n * (1.0 - float(sparsity or 0.0))))))


def _keep_largest(tensors: Sequence[Tensor], k: int) -> tuple[Tensor, ...]:
    # The k largest magnitudes over `tensors` together, by a threshold rather than scattered
    # indices: differentiable in the kept entries (the mask is a constant) and vmap-compatible
    # (topk of a fixed size k; ties at the threshold keep a few more).
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    thr = flat.topk(k).values[-1]
    return tuple(t * (t.abs() >= thr).to(t.dtype) for t in tensors)


class Replay:
    """The disclosed defenses' deterministic operations, decided once from an observation.

    `steps` is a tuple of (name, payload): ("clip", bound), ("mask", masks per tensor),
    ("topk", k per tensor), ("topk_global", k). `names` describes them for traces.
    """

    def __init__(self, steps: Sequence[tuple[str, Any]] = (), names: Sequence[str] = (),
                 n_tensors: int | None = None) -> None:
        self.steps = tuple(steps)
        self.names = tuple(names)
        self.n_tensors = n_tensors

    @classmethod
    def build(cls, disclosed: Mapping[str, Any], observed: Sequence[Tensor], batch_size: int | None = None,
              kind: str = "gradient") -> "Replay":
        observed = tuple(t.detach() for t in observed)
        names = list(disclosed.get("defenses") or [n for n in REPLAYED if _KEYS[n] in disclosed])
        steps: list[tuple[str, Any]] = []
        labels: list[str] = []
        dp_bound = disclosed.get("dp_max_grad_norm")
        if ("dpsgd" in names and batch_size == 1 and kind == "gradient" and dp_bound is not None
                and math.isfinite(float(dp_bound))):
            steps.append(("clip", float(dp_bound)))
            labels.append("dpsgd_clip")
        for name in names:
            if name == "clip" and "clip_norm" in disclosed:
                bound = disclosed["clip_norm"]
                steps.append(("clip", float(bound) if bound is not None else _norm(observed)))
                labels.append("clip" if bound is not None else "clip_estimated")
            elif name == "sparsify" and "sparsify" in disclosed:
                step = _sparsify_step(disclosed, observed)
                if step is not None:
                    steps.append(step[0])
                    labels.append(step[1])
        if ("clip" not in names and "clip_norm" not in disclosed and disclosed.get("clip_estimate")):
            steps.append(("clip", _norm(observed)))
            labels.append("clip_estimated")
        return cls(steps, labels, len(observed))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, trial: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The trial update after the replayed operations (differentiable, vmap-safe)."""
        if self.n_tensors is not None and len(trial) != self.n_tensors:
            raise ValueError(f"trial has {len(trial)} tensors, the observed update {self.n_tensors}")
        out = tuple(trial)
        for op, arg in self.steps:
            if op == "clip":
                out = clip_tensors(out, arg)
            elif op == "mask":
                out = tuple(t * m for t, m in zip(out, arg))
            elif op == "topk":
                out = tuple(_keep_largest((t,), k)[0] for t, k in zip(out, arg))
            elif op == "topk_global":
                out = _keep_largest(out, arg)
        return out


def _sparsify_step(disclosed: Mapping[str, Any], observed: tuple[Tensor, ...]) -> tuple[tuple[str, Any], str] | None:
    mode = disclosed.get("sparsify", "topk")
    sparsity, k = disclosed.get("sparsity"), disclosed.get("sparsify_k")
    sizes = [t.numel() for t in observed]
    total = sum(sizes) or 1
    if k is not None:
        kept = int(k) if mode == "topk_global" else sum(min(int(k), n) for n in sizes)
        expected = 1.0 - kept / total
    else:
        expected = float(sparsity) if sparsity is not None else 0.0
    zeros = sum(int((t == 0).sum()) for t in observed) / total
    level = f"k{int(k)}" if k is not None else f"{float(sparsity or 0.0):g}"
    if zeros > 0 and zeros >= 0.5 * expected:
        # The mask is visible: compare only the entries the client sent.
        return ("mask", tuple((t != 0).to(t.dtype) for t in observed)), "observed_mask"
    if mode == "topk":
        # Noise hid the mask: apply the same per-layer top-k to the trial.
        return ("topk", tuple(_keep(n, sparsity, k) for n in sizes)), f"topk_{level}"
    if mode == "topk_global":
        return ("topk_global", _keep(total, sparsity, k)), f"topk_global_{level}"
    return None  # a hidden random mask cannot be replayed


IDENTITY = Replay()

# One Replay per live observation, dropped with it (Observation holds a dict, so it is
# not hashable: keyed by id and checked against a weak reference).
_CACHE: dict[int, tuple[weakref.ref, Replay]] = {}


def replay_for(obs: Observation) -> Replay:
    """The Replay of `obs` (its disclosure, update, batch size and kind), built once per observation."""
    key = id(obs)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is obs:
        return hit[1]
    replay = Replay.build(obs.disclosed, obs.update.tensors, obs.batch_size, obs.update.kind)
    def drop(ref: weakref.ref, key: int = key) -> None:
        if _CACHE.get(key, (None,))[0] is ref:
            del _CACHE[key]

    try:
        ref = weakref.ref(obs, drop)
    except TypeError:  # not weak-referenceable: do not cache
        return replay
    _CACHE[key] = (ref, replay)
    return replay


def adapt_trial(trial: tuple[Tensor, ...], disclosed: Mapping[str, Any],
                observed: tuple[Tensor, ...], batch_size: int | None = None,
                kind: str = "gradient") -> tuple[Tensor, ...]:
    """The trial update after the disclosed defenses' deterministic operations (differentiable in `trial`).

    `batch_size` and `kind` (the observation's `batch_size` and `update.kind`) enable the DP-SGD replay,
    exact only for one sample's FedSGD gradient. Builds a `Replay` each call: loops use `replay_for`.
    """
    return Replay.build(disclosed, observed, batch_size, kind)(trial)
