"""DP-SGD on the client, through Opacus.

Abadi et al. 2016 ("Deep learning with differential privacy"): each sample's
gradient is clipped to L2 norm `max_grad_norm` (C), the clipped gradients are
summed, Gaussian noise N(0, (noise_multiplier * C)^2) is added and the sum is
divided by the batch size. Everything is done by Opacus's own machinery, not
re-implemented: `GradSampleModule` computes the per-sample gradients and
`DPOptimizer` clips, noises and averages them (`pre_step` for a FedSGD
gradient; full optimiser steps for FedAvg's local epochs, whose weight
difference is then shared: DP-FedAvg at the sample level).

Accounting: epsilon at `delta` comes from Opacus's accountants (RDP, Mironov
2017, or PRV, Gopi et al. 2021) for `rounds` rounds of the client, each with
`local_steps x mini-batches` DP steps at sampling rate
(mini-batch size) / (pool size). Opacus's analysis assumes Poisson sampling;
the client draws fixed-size batches uniformly without replacement, the usual
approximation. `epsilon = ...` (with `delta`) asks Opacus's
`get_noise_multiplier` for the noise that reaches that budget.

BatchNorm mixes samples, so Opacus's `ModuleValidator` rejects it; the error
carries Opacus's explanation. With `convert_batchnorm = true` the model is
converted with `ModuleValidator.fix` (BatchNorm -> GroupNorm). That changes
the global model itself, so the converted model is put in
`ClientStep.context["model"]`: the scenario trains it and sends it to the
attacker (the client and server run the converted architecture).

Threat model: honest-but-curious server that knows C, the noise multiplier
and epsilon (disclosed), not the noise draw. An adaptive attacker replays the
clip exactly where it is exact (`DPClipReplay`): one sample's FedSGD gradient,
whose per-sample clip is a clip of the whole gradient. It happens while the
client computes, so it is replayed before every transform of the chain.
Larger batches (per-sample trial gradients) and FedAvg (clipping inside every
local step) are not replayed.
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, RngTap, register
from giaudit.device import placement
from giaudit.errors import ConfigError, ParamError
from giaudit.fl import classification_loss, local_batches, minibatches
from giaudit.ops import clip_tensors
from giaudit.registry import check_number
from giaudit.types import ClientProtocol, ReplayFn, ReplayRule, SharedUpdate


def opacus_problems(model: nn.Module) -> list[str]:
    """Opacus's validator messages for `model` (training mode assumed: the client trains it)."""
    from opacus.validators import ModuleValidator

    probe = copy.deepcopy(model).train()
    return [str(e) for e in ModuleValidator.validate(probe, strict=False)]


def convert_model(model: nn.Module) -> nn.Module:
    """Opacus's fix (BatchNorm -> GroupNorm) on a copy, keeping the train/eval mode, device and dtype."""
    from opacus.validators import ModuleValidator

    device, dtype = placement(model)
    with torch.device(device):  # the new GroupNorm layers are made where the model is
        fixed = ModuleValidator.fix(copy.deepcopy(model)).to(device, dtype)
    fixed.train(model.training)
    return fixed


@lru_cache(maxsize=256)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
             accountant: str) -> tuple[float, bool]:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps = float(acc.get_epsilon(delta=delta))
    loose = any("largest alpha" in str(w.message) for w in caught)
    return eps, loose


@lru_cache(maxsize=64)
def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier Opacus finds for (epsilon, delta) after `steps` steps at `sample_rate`."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # Opacus warns on every RDP evaluation of its search whose optimal order is the largest alpha;
        # `accounting` reports that once, as a note, for the final noise.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


def _on_model_device(generator: torch.Generator | None, params: list[nn.Parameter]) -> torch.Generator | None:
    """Opacus draws its noise on the parameters' device, with a generator of that device: on the CPU the
    caller's generator itself; elsewhere a generator of that device seeded from it (reproducible per device)."""
    if generator is None or not params or params[0].device == generator.device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=params[0].device).manual_seed(seed)


def dp_update(model: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol, *, noise_multiplier: float,
              max_grad_norm: float, generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """The client's DP update, computed by Opacus (GradSampleModule + DPOptimizer) on a copy of `model`.

    FedSGD: the privatised mean gradient (DPOptimizer.pre_step leaves it in p.grad).
    FedAvg: w_after - w_before of DP-SGD local steps over the ordered mini-batches.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net = copy.deepcopy(model)
    params = list(net.parameters())
    generator = _on_model_device(generator, params)
    # Opacus computes the noise std as noise_multiplier * max_grad_norm: an infinite bound with zero noise
    # would give 0 * inf = nan, so "no clipping" is passed as the largest float (a clip factor of exactly 1).
    bound = max_grad_norm if math.isfinite(max_grad_norm) else sys.float_info.max
    gsm = GradSampleModule(net, loss_reduction="mean")
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    # Opacus's hooks fire on the first layer whose input needs no gradient; torch warns about it, harmlessly.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        if protocol.name == "fedsgd":
            opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=noise_multiplier,
                              max_grad_norm=bound, expected_batch_size=x.shape[0], generator=generator)
            opt.zero_grad(set_to_none=True)
            classification_loss(gsm(x), y).backward()
            opt.pre_step()
            return tuple(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params)
        start = [p.detach().clone() for p in params]
        opt = DPOptimizer(torch.optim.SGD(params, lr=protocol.local_lr), noise_multiplier=noise_multiplier,
                          max_grad_norm=bound, expected_batch_size=x.shape[0], generator=generator)
        for sl in local_batches(protocol, x.shape[0]):
            opt.expected_batch_size = x[sl].shape[0]
            opt.zero_grad(set_to_none=True)
            classification_loss(gsm(x[sl]), y[sl]).backward()
            opt.step()
        return tuple(p.detach() - s for p, s in zip(params, start))
    finally:
        gsm._close()
        catcher.__exit__(None, None, None)


@dataclass(frozen=True)
class DPClipReplay:
    max_grad_norm: float

    def build(self, observed: tuple[Tensor, ...], batch_size: int | None,
              kind: str) -> tuple[str, ReplayFn] | None:
        if batch_size != 1 or kind != "gradient" or not math.isfinite(self.max_grad_norm):
            return None
        return "dpsgd_clip", lambda ts: clip_tensors(ts, self.max_grad_norm)


@register("dpsgd")
class DPSGD(RegisteredDefense):
    replay_stage = "compute"
    changes_step = True

    def __init__(self, *, max_grad_norm: float = 1.0, noise_multiplier: float | None = None,
                 epsilon: float | None = None, delta: float | None = None, rounds: int = 100,
                 accountant: Literal["rdp", "prv"] = "rdp", convert_batchnorm: bool = False) -> None:
        check_number("max_grad_norm", max_grad_norm, low=0.0, strict_low=True, allow_inf=True)
        check_number("noise_multiplier", noise_multiplier, low=0.0)
        check_number("epsilon", epsilon, low=0.0, strict_low=True)
        check_number("delta", delta, low=0.0, strict_low=True, high=1.0)
        if epsilon is not None and delta is None:
            raise ParamError("delta", "required when epsilon is set (epsilon is defined at a delta, e.g. 1e-5)")
        if (noise_multiplier is None) == (epsilon is None):
            raise ParamError("noise_multiplier", "set exactly one of noise_multiplier or epsilon (with delta)")
        if not math.isfinite(max_grad_norm) and (epsilon is not None or (noise_multiplier or 0) > 0):
            raise ParamError("max_grad_norm", "must be finite when noise is added (noise std = multiplier x bound)")
        if rounds < 1:
            raise ParamError("rounds", "must be >= 1")
        self.max_grad_norm, self.noise_multiplier, self.epsilon = float(max_grad_norm), noise_multiplier, epsilon
        self.delta, self.rounds, self.accountant = delta, int(rounds), accountant
        self.convert_batchnorm = convert_batchnorm
        self._accounting: dict[str, Any] = {}

    def accounting(self, step: ClientStep) -> dict[str, Any]:
        """Sampling rate, steps, noise multiplier and epsilon for this client step."""
        pool = step.context.get("pool")
        if pool is None:
            raise self.fail("epsilon", "accounting needs the client's data pool (ClientStep.context['pool'])")
        proto = step.protocol
        if proto.name == "fedsgd":
            per_round, mb = 1, step.batch_size
        else:
            batches = minibatches(step.batch_size, proto.local_batch_size)
            per_round, mb = proto.local_steps * len(batches), batches[0].stop - batches[0].start
        rate, steps = min(1.0, mb / len(pool)), self.rounds * per_round
        if self.epsilon is not None:
            try:
                sigma = noise_for(self.epsilon, float(self.delta or 0.0), rate, steps, self.accountant)
            except ValueError as exc:  # Opacus: "The privacy budget is too low."
                raise self.fail("epsilon", f"{exc} (sampling rate {rate:.3g}, {steps} steps)") from None
        else:
            sigma = float(self.noise_multiplier or 0.0)
        out: dict[str, Any] = {"dp_sample_rate": rate, "dp_steps": steps, "dp_noise_multiplier": sigma,
                               "epsilon": None}
        if self.delta and sigma > 0:
            eps, loose = _epsilon(sigma, rate, steps, float(self.delta), self.accountant)
            out["epsilon"] = eps
            if loose:
                out["dp_note"] = ("RDP's optimal order is its largest alpha: this epsilon is a loose upper bound; "
                                  "accountant = 'prv' is tighter")
        elif self.delta:
            out["epsilon"] = math.inf
        return out

    def configure(self, step: ClientStep) -> ClientStep:
        model = step.context.get("model")
        context = dict(step.context)
        if model is not None:
            problems = opacus_problems(model)
            if problems and not self.convert_batchnorm:
                raise ConfigError(f"{self.where}: Opacus cannot train this model with DP-SGD: "
                                  f"{' '.join(problems)} Set convert_batchnorm = true in this table to replace "
                                  "BatchNorm by GroupNorm (the attacker then sees the converted model too).")
            if problems:
                model = convert_model(model)
                left = opacus_problems(model)
                if left:
                    raise ConfigError(f"{self.where}: even after conversion Opacus rejects the model: {' '.join(left)}")
                context["model"] = model
        self._accounting = self.accounting(step)
        sigma, bound, convert = self._accounting["dp_noise_multiplier"], self.max_grad_norm, self.convert_batchnorm
        tap = RngTap(step)

        def compute(net: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol) -> tuple[Tensor, ...]:
            if convert and opacus_problems(net):
                net = convert_model(net)  # a scenario that ignores context["model"] still trains the right model
            return dp_update(net, x, y, protocol, noise_multiplier=sigma, max_grad_norm=bound,
                             generator=tap.generator())

        return step.with_(sampler=tap.sampler, compute=compute, context=context)

    def replay_rule(self) -> ReplayRule:
        return DPClipReplay(self.max_grad_norm)

    def spent(self, rounds: int) -> Mapping[str, Any]:
        """Opacus's accountant for exactly `rounds` rounds of this (configured) client: the epsilon a training
        of that length spends at the noise and sampling rate the client step uses."""
        acc = self._accounting
        if not acc:
            return {}
        per_round = acc["dp_steps"] // self.rounds
        steps, sigma, rate = rounds * per_round, acc["dp_noise_multiplier"], acc["dp_sample_rate"]
        out: dict[str, Any] = {"dp_sample_rate": rate, "dp_steps": steps, "dp_noise_multiplier": sigma,
                               "delta": self.delta, "dp_accountant": self.accountant, "epsilon": None}
        if self.delta and sigma > 0 and steps > 0:
            out["epsilon"] = _epsilon(sigma, rate, steps, float(self.delta), self.accountant)[0]
        elif self.delta:
            out["epsilon"] = 0.0 if steps == 0 else math.inf
        return out

    @classmethod
    def over_rounds(cls, table: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        """Accounted over `rounds` rounds: the length of the training."""
        return {**table, "rounds": rounds}

    @classmethod
    def as_trained(cls, table: Mapping[str, Any], spent: Mapping[str, Any]) -> dict[str, Any]:
        """A target epsilon replaced by the noise multiplier the training found for it."""
        if "epsilon" not in table or spent.get("dp_noise_multiplier") is None:
            return dict(table)
        out = {k: v for k, v in table.items() if k != "epsilon"}
        out["noise_multiplier"] = float(spent["dp_noise_multiplier"])
        return out

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"dp_max_grad_norm": self.max_grad_norm, "delta": self.delta, "dp_accountant": self.accountant,
                "dp_rounds": self.rounds, **self._accounting}
