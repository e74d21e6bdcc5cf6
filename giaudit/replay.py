"""Defense-aware matching: fold the disclosed defenses' replay rules into one trial transform.

GGL's adaptive attack (Li et al. 2022, CVPR), available to every
gradient-matching attack: when the server knows (or estimates) the defense,
the attack passes its own trial update through the same deterministic
operations before comparing it with the observed one, so it matches like with
like. Threat model: the attacker's knowledge plus the disclosed defense
parameters; it never sees the private batch.

Each defense owns its replay rule (`Disclosure.replay`, see the defense's own
module); this module only orders and folds them: rules of the "compute" stage
(DP-SGD's per-sample clip happens while the client computes) first, then the
"transform" ones in chain order, so `clip 0.5 -> noise -> clip 2.0` replays
both clips in that order. Noise, quantisation and aggregation have no rule:
they are random or non-differentiable.

`Replay.build` decides everything from the observation once (masks, bounds,
top-k counts); `Replay.__call__` is plain tensor algebra with no
data-dependent Python control flow and no `.item()`, so it is differentiable
and can run inside `torch.func.vmap` (GGL's population). `replay_for(obs)`
caches the Replay per observation.

`estimate_clip` is GGL's own option for an undisclosed clipping bound: clip
the trial to the observed update's norm, last (the observed norm is the bound
only if nothing after the clip changed it).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial

from torch import Tensor

from giaudit.ops import clip_tensors, global_norm
from giaudit.types import Disclosure, Observation, ReplayFn


class Replay:
    """The disclosed defenses' deterministic operations, decided once from an observation."""

    def __init__(self, steps: Sequence[ReplayFn] = (), names: Sequence[str] = (),
                 n_tensors: int | None = None) -> None:
        self.steps = tuple(steps)
        self.names = tuple(names)
        self.n_tensors = n_tensors

    @classmethod
    def build(cls, disclosed: Sequence[Disclosure], observed: Sequence[Tensor], batch_size: int | None = None,
              kind: str = "gradient", *, estimate_clip: bool = False) -> Replay:
        observed = tuple(t.detach() for t in observed)
        ordered = sorted(disclosed, key=lambda d: (d.stage != "compute", d.position))
        steps: list[ReplayFn] = []
        names: list[str] = []
        for d in ordered:
            built = d.replay.build(observed, batch_size, kind) if d.replay is not None else None
            if built is not None:
                names.append(f"{d.key}:{built[0]}")
                steps.append(built[1])
        if estimate_clip and not any(d.name == "clip" for d in disclosed):
            bound = global_norm(observed)
            names.append("clip_estimated")
            steps.append(partial(clip_tensors, max_norm=bound))
        return cls(steps, names, len(observed))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, trial: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The trial update after the replayed operations (differentiable, vmap-safe)."""
        if self.n_tensors is not None and len(trial) != self.n_tensors:
            raise ValueError(f"trial has {len(trial)} tensors, the observed update {self.n_tensors}")
        out = tuple(trial)
        for step in self.steps:
            out = step(out)
        return out


IDENTITY = Replay()

# One Replay per live observation, dropped with it (Observation holds tensors, so it is
# keyed by id and checked against a weak reference).
_CACHE: dict[tuple[int, bool], tuple[weakref.ref, Replay]] = {}


def replay_for(obs: Observation, *, estimate_clip: bool = False) -> Replay:
    """The Replay of `obs` (its disclosures, update, batch size and kind), built once per observation."""
    key = (id(obs), estimate_clip)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is obs:
        return hit[1]
    replay = Replay.build(obs.disclosed, obs.update.tensors, obs.batch_size, obs.update.kind,
                          estimate_clip=estimate_clip)

    def drop(ref: weakref.ref, key: tuple[int, bool] = key) -> None:
        if _CACHE.get(key, (None,))[0] is ref:
            del _CACHE[key]

    _CACHE[key] = (weakref.ref(obs, drop), replay)
    return replay


def adapt_trial(trial: Sequence[Tensor], disclosed: Sequence[Disclosure], observed: Sequence[Tensor],
                batch_size: int | None = None, kind: str = "gradient") -> tuple[Tensor, ...]:
    """One-shot form of `Replay.build(...)(trial)`; loops use `replay_for`."""
    return Replay.build(disclosed, observed, batch_size, kind)(trial)
