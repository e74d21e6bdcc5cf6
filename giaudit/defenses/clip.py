"""Clipping of the whole update to an L2 norm bound.

The clipping half of DP-FedAvg (McMahan et al. 2018, "Learning differentially
private recurrent language models"): the client scales its update u to
u * min(1, C / ||u||) over all layers together. On its own it hides only the
update's scale; an L2-matching attack that knows C (disclosed: it is part of
the protocol) replays it on its trial update (see `adaptive.adapt_trial`).

Threat model: honest-but-curious server that knows the bound C.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from giaudit.defenses.registry import RegisteredDefense, check_finite, register
from giaudit.types import SharedUpdate


def clip_tensors(tensors: tuple[torch.Tensor, ...], max_norm: float) -> tuple[torch.Tensor, ...]:
    """Scale all tensors together so their joint L2 norm is at most `max_norm` (differentiable)."""
    norm = torch.sqrt(sum((t * t).sum() for t in tensors))
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return tuple(t * factor for t in tensors)


@register("clip")
class Clip(RegisteredDefense):
    def __init__(self, *, max_norm: float) -> None:
        check_finite("max_norm", max_norm, low=0.0, strict_low=True)
        self.max_norm = float(max_norm)

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        return SharedUpdate(clip_tensors(update.tensors, self.max_norm), update.kind)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"clip_norm": self.max_norm}
