"""Additive noise on the shared update (Gaussian or Laplace).

The "noisy gradients" defense evaluated by Zhu et al. 2019 (DLG, section 5)
and by Jeon et al. 2021 (GIAS, NeurIPS, appendix F): i.i.d. noise with
standard deviation `sigma` is added to every entry of the update the client
sends. For Laplace, `sigma` is also the standard deviation (scale
b = sigma / sqrt(2)), so the two distributions are compared at equal noise
power. No clipping is applied, so this is not differential privacy on its own
(see `dpsgd` for that).

Threat model: an honest-but-curious server that knows the noise scale
(disclosed) but not the noise draw.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.registry import check_number
from giaudit.types import SharedUpdate


@register("noise")
class AdditiveNoise(RegisteredDefense):
    def __init__(self, *, sigma: float, distribution: Literal["gaussian", "laplace"] = "gaussian") -> None:
        check_number("sigma", sigma, low=0.0)
        self.sigma, self.distribution = float(sigma), distribution

    def sample(self, like: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Noise shaped like `like`, drawn from the (CPU) generator `rng` and moved to `like`'s device."""
        if self.distribution == "gaussian":
            return (torch.randn(like.shape, generator=rng, dtype=like.dtype, device=rng.device) * self.sigma).to(
                like.device)
        # Laplace(b) is the difference of two Exp(1/b) draws; exponential_ takes a generator.
        b = self.sigma / math.sqrt(2.0)
        e1 = torch.empty(like.shape, dtype=like.dtype, device=rng.device).exponential_(generator=rng)
        e2 = torch.empty(like.shape, dtype=like.dtype, device=rng.device).exponential_(generator=rng)
        return ((e1 - e2) * b).to(like.device)

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        if self.sigma == 0:
            return update
        return SharedUpdate(tuple(t + self.sample(t, rng) for t in update.tensors), update.kind)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"noise": self.distribution, "noise_sigma": self.sigma}
