"""Quantisation of the update: sign (signSGD) or k-bit uniform.

- sign: Bernstein et al. 2018 (signSGD); each entry becomes +-1, times the
  layer's mean magnitude when `scaled` (EF-signSGD's scaled sign, Karimireddy
  et al. 2019) so FedAvg steps keep their size.
- k-bit: per-layer symmetric uniform quantisation to 2^(bits-1) - 1 levels on
  each side of zero, scale max|u| (QSGD-like, Alistarh et al. 2017); rounding
  to nearest, or stochastic (unbiased) rounding with `stochastic = true`.

Cheap communication compression that also coarsens what an attacker matches.
Threat model: honest-but-curious server that knows the scheme (disclosed).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.errors import ParamError
from giaudit.types import SharedUpdate


@register("quantize")
class Quantize(RegisteredDefense):
    def __init__(self, *, mode: Literal["sign", "kbit"] = "sign", bits: int = 8, scaled: bool = True,
                 stochastic: bool = False) -> None:
        if mode == "kbit" and not 2 <= bits <= 16:
            raise ParamError("bits", "must be between 2 and 16")
        self.mode, self.bits, self.scaled, self.stochastic = mode, int(bits), scaled, stochastic

    def quantize(self, t: Tensor, rng: torch.Generator) -> Tensor:
        if self.mode == "sign":
            s = torch.sign(t)
            return s * t.abs().mean() if self.scaled else s
        levels = 2 ** (self.bits - 1) - 1
        scale = t.abs().max()
        if scale == 0:
            return t.clone()
        y = t / scale * levels
        if self.stochastic:
            low = torch.floor(y)
            y = low + (torch.rand(t.shape, generator=rng, device=rng.device).to(t.device) < (y - low)).to(t.dtype)
        else:
            y = torch.round(y)
        return y / levels * scale

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        return SharedUpdate(tuple(self.quantize(t, rng) for t in update.tensors), update.kind)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"quantize": self.mode, "quantize_bits": 1 if self.mode == "sign" else self.bits}
