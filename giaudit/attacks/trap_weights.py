"""When the Curious Abandon Honesty: trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov,
Papernot, EuroS&P 2023).

Threat model: a malicious server, SoK class F: it modifies the model and needs no data. Its server step puts
a fully connected layer of m neurons with trap weights, a ReLU and a map back onto the image (every weight
1/m, added to the input) in front of the agreed image classifier. Each neuron's weights are drawn N(0, 1) and
its positive weights scaled down by `scale` (< 1), so that on images with non-negative pixels its
pre-activation is negative for most inputs: most neurons fire for few images of a batch, many for exactly
one. A neuron that fires for one image x only gets the weight gradient g x and the bias gradient g (its
bias is 0), so x is their ratio, exactly (up to float rounding). Sums over a batch or over clients (secure
aggregation) keep the neurons apart.

The attack cannot tell a neuron fired by one image from one fired by several (a mixture), as in the paper:
it returns the ratio of every neuron whose bias gradient is not zero, one per distinct image (ratios equal
to float precision are one image), padded to the batch size with mid-range images; the metrics pair each
private image with a distinct one of them. Labels: the agreed model classifies each recovered image (label
source "classified"). Deviations: the paper modifies the first fully connected layer of the model in place
(its models start with one); a block in front works for any image classifier, convolutional ones included,
at the cost of an architecture a client can check (model_validation with check = "architecture").
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from giaudit.attacks._common.served import Prepended, agreed_part, block_gradients, classified
from giaudit.attacks.base import ATTACKS, Attack, Budget, Progress, RestartResult, device_of
from giaudit.errors import ThreatModelError
from giaudit.registry import check_number
from giaudit.types import Capability, DataSpec, Observation

# A neuron fired when its bias gradient exceeds this share of the largest one (below: float rounding).
FIRED = 1e-6
# Two recovered rows are one image when they agree to this relative precision.
SAME = 1e-4


class TrapBlock(nn.Module):
    """x -> x + back(ReLU(trap(flat x))): m neurons with trap weights (positive weights scaled down)."""

    def __init__(self, shape: tuple[int, int, int], neurons: int, scale: float, generator: torch.Generator,
                 like: Tensor) -> None:
        super().__init__()
        size = math.prod(shape)
        self.trap = nn.Linear(size, neurons, device=like.device, dtype=like.dtype)
        self.back = nn.Linear(neurons, size, device=like.device, dtype=like.dtype)
        w = torch.randn(neurons, size, generator=generator, device=generator.device)
        w = torch.where(w > 0, w * scale, w)
        with torch.no_grad():
            self.trap.weight.copy_(w.to(like))
            self.trap.bias.zero_()
            self.back.weight.fill_(1.0 / neurons)
            self.back.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.back(torch.relu(self.trap(x.flatten(1)))).view_as(x)


def find_trap(model: nn.Module) -> TrapBlock | None:
    return next((m for m in model.modules() if isinstance(m, TrapBlock)), None)


def recover(weight_grad: Tensor, bias_grad: Tensor) -> Tensor:
    """One row per distinct image among the ratios of the fired neurons (largest bias gradient first)."""
    scale = bias_grad.abs().max()
    if scale == 0:
        return weight_grad.new_zeros((0, weight_grad.shape[1]))
    fired = (bias_grad.abs() > FIRED * scale).nonzero().flatten()
    fired = fired[bias_grad[fired].abs().argsort(descending=True)]
    rows = weight_grad[fired] / bias_grad[fired, None]
    kept: list[Tensor] = []
    for r in rows:
        if not any(float((r - k).abs().max()) <= SAME * max(float(k.abs().max()), 1e-12) for k in kept):
            kept.append(r)
    return torch.stack(kept) if kept else rows[:0]


@ATTACKS.register("trap_weights")
class TrapWeights(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE, Capability.MODIFIES_MODEL})
    sok_class: ClassVar[str] = "F"
    display_name: ClassVar[str] = "Trap weights (Boenisch et al.)"
    analytic: ClassVar[bool] = True

    def __init__(self, *, neurons: int = 500, scale: float = 0.8) -> None:
        super().__init__()
        check_number("neurons", neurons, low=1)
        check_number("scale", scale, low=0.0, strict_low=True, high=1.0)
        self.neurons, self.scale = int(neurons), float(scale)

    def modify(self, model: nn.Module, data_spec: DataSpec, surrogate: Tensor | None,
               generator: torch.Generator) -> nn.Module:
        like = next(model.parameters())
        return Prepended(TrapBlock(data_spec.shape, self.neurons, self.scale, generator, like), model)

    def modification(self, model: nn.Module) -> dict[str, Any]:
        block = find_trap(model)
        if block is None:
            return {}
        return {"block": "trap-weight", "neurons": block.trap.out_features, "scale": self.scale,
                "placed": f"in front of {type(agreed_part(model)).__name__}",
                "parameters_added": sum(p.numel() for p in block.parameters())}

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        # The server classifies the recovered images itself (run_restart): no label recovery from the update.
        return torch.zeros(0, dtype=torch.long, device=device_of(obs)), "classified"

    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        block = find_trap(obs.model)
        if block is None:
            raise ThreatModelError(f"attack {self.name!r}: the observed model holds no trap-weight block; the "
                                   "update was not computed on the model this attack's server step sends")
        flat = recover(*block_gradients(obs, block.trap))
        images, predicted = classified(obs, flat)
        return RestartResult(images, predicted, [], 0.0,
                             extra={"label_source": "classified", "distinct_images": int(flat.shape[0]),
                                    "neurons": block.trap.out_features})
