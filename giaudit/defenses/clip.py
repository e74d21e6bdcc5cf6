"""Clipping of the whole update to an L2 norm bound.

The clipping half of DP-FedAvg (McMahan et al. 2018, "Learning differentially
private recurrent language models"): the client scales its update u to
u * min(1, C / ||u||) over all layers together. On its own it hides only the
update's scale; an L2-matching attack that knows C (disclosed: it is part of
the protocol) replays it on its trial update (`ClipReplay`, folded by
`giaudit.replay`).

Threat model: honest-but-curious server that knows the bound C.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.ops import clip_tensors
from giaudit.registry import check_number
from giaudit.types import ReplayFn, ReplayRule, SharedUpdate


@dataclass(frozen=True)
class ClipReplay:
    """Scale the trial to norm min(||trial||, C), with C the disclosed bound."""

    max_norm: float

    def build(self, observed: tuple[Tensor, ...], batch_size: int | None,
              kind: str) -> tuple[str, ReplayFn] | None:
        return "clip", lambda ts: clip_tensors(ts, self.max_norm)


@register("clip")
class Clip(RegisteredDefense):
    def __init__(self, *, max_norm: float) -> None:
        check_number("max_norm", max_norm, low=0.0, strict_low=True)
        self.max_norm = float(max_norm)

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        return SharedUpdate(clip_tensors(update.tensors, self.max_norm), update.kind)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"clip_norm": self.max_norm}

    def replay_rule(self) -> ReplayRule:
        return ClipReplay(self.max_norm)
