"""GIDM+: GIDM when the client's timestep `t` and noise `eps` are private (Huang et al., arXiv 2405.20380).

Threat model: honest-but-curious server that does *not* know the client's `t` and `eps` (the client drew
them locally, `threat.diffusion_noise = false`); SoK class B for FedSGD, C for FedAvg, D with a prior sampler.
If the observation happens to carry `t` and `eps`, GIDM+ ignores them.

Recipe ("triple optimisation"): the unknown data, the noise estimate `eps_hat` and the timestep are optimised
together, alternating their updates (data, then `eps_hat`, then the timestep, in turn; each update costs one
update evaluation). The timestep is a categorical distribution over a grid of K timesteps (softmax of
per-image logits); the trial update is its expectation, `sum_k w_k * update(x, t_k, eps_hat)`, computed in one
batched pass (`giaudit.fl_diffusion`), so it is differentiable in the logits. The softmax temperature is
annealed from 1 to `temperature_end` so the distribution can concentrate. As in GIDM the data block is the
sampler's initial noise `z` in phase 1 (through a differentiable DDIM sampler) and the pixels in phase 2.
The record's `extra` keeps the final timestep distribution (`t_probs`), its mode (`t_estimate`) and mean.
`screen = M` screens M latent starts as GIDM does, scoring each by the matching loss at the initial
estimates (the random `eps_hat`, uniform timestep weights). The pixel phase is Adam only: it also updates
`eps_hat` and the timestep logits, which L-BFGS's one-variable line search here does not.

Deviations: the public GIDM code picks `t` by an argmax of random logits (not differentiable) and feeds
GIDM+ the true noise; neither is done here. The paper does not give the alternation order or the timestep
parametrisation; the choices above are ours.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import DISTANCES
from giaudit.attacks.base import ATTACKS, Budget, Descent
from giaudit.attacks.gidm import GIDM, diffusion_info
from giaudit.device import placement
from giaudit.fl_diffusion import diffusion_update
from giaudit.registry import check_number
from giaudit.types import Capability, Observation


def timestep_grid(num_train_timesteps: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """K cell centres evenly covering [0, T): e.g. T=1000, K=10 -> 50, 150, ..., 950 (on `device`)."""
    return ((torch.arange(k, dtype=torch.float64, device=device) + 0.5) * num_train_timesteps / k).long().clamp(
        0, num_train_timesteps - 1)


@ATTACKS.register("gidm_plus")
class GIDMPlus(GIDM):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    display_name: ClassVar[str] = "GIDM+"
    uses_client_noise: ClassVar[bool] = False  # estimates t and eps itself

    def __init__(self, *, latent_iterations: int | None = None, pixel_iterations: int | None = None,
                 sampler: str = "global", sampler_steps: int = 5, latent_lr: float = 0.05,
                 pixel_lr: float = 0.02, distance: str = "l2", t_grid: int = 10, t_lr: float = 0.2,
                 eps_lr: float = 0.05, temperature_end: float = 0.3, alternate: bool = True, screen: int = 0) -> None:
        super().__init__(latent_iterations=latent_iterations, pixel_iterations=pixel_iterations, sampler=sampler,
                         sampler_steps=sampler_steps, latent_lr=latent_lr, pixel_lr=pixel_lr, distance=distance,
                         screen=screen)
        check_number("t_grid", t_grid, low=2)
        check_number("t_lr", t_lr, low=0.0, strict_low=True)
        check_number("eps_lr", eps_lr, low=0.0, strict_low=True)
        check_number("temperature_end", temperature_end, low=0.0, high=1.0, strict_low=True)
        self.t_grid, self.t_lr, self.eps_lr = t_grid, t_lr, eps_lr
        self.temperature_end, self.alternate = temperature_end, alternate

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        info = diffusion_info(obs, self.name)
        n = labels.numel()
        total = max(1, sum(self.phase_budgets(budget)))
        distance = DISTANCES[self.distance]
        protocol = self.protocol_for(obs)
        target = obs.update.tensors
        model, ac = obs.model, info.alphas_cumprod
        dev, dtype = placement(model)
        grid = timestep_grid(info.num_train_timesteps, self.t_grid, dev).expand(n, -1)
        eps = torch.randn((n, *obs.data_spec.shape), generator=generator, device=generator.device).to(dev, dtype)
        eps.requires_grad_(True)
        logits = torch.zeros((n, self.t_grid), device=dev, dtype=dtype, requires_grad=True)
        others = ((torch.optim.Adam([eps], lr=self.eps_lr), eps), (torch.optim.Adam([logits], lr=self.t_lr), logits))

        def weights(i: int) -> Tensor:
            tau = self.temperature_end ** (i / total)
            return torch.softmax(logits / tau, dim=1)

        def evaluate(x: Tensor, data: Tensor, i: int) -> tuple[float, dict[int, Tensor]]:
            """One update evaluation; gradients for the blocks updated this iteration (data, eps, t in turn)."""
            trial = diffusion_update(model, x, grid, eps, ac, protocol, weights=weights(i), create_graph=True)
            loss = distance(trial, target)
            which = i % 3 if self.alternate else -1
            blocks = {0: [data], 1: [eps], 2: [logits]}.get(which, [data, eps, logits])
            grads = torch.autograd.grad(loss, blocks)
            return float(loss.detach()), {id(b): g for b, g in zip(blocks, grads)}

        def score(x: Tensor) -> float:
            """The matching loss at the initial estimates (eps_hat, uniform timestep weights), no gradient."""
            with torch.no_grad():
                w = weights(0)
            trial = diffusion_update(model, x, grid, eps.detach(), ac, protocol, weights=w)
            return float(distance(trial, target))

        result = yield from self.two_phases(obs, labels, budget, generator, evaluate,
                                            {"t_eps": "private: estimated"}, others, score=score)
        with torch.no_grad():
            probs = weights(len(result.losses))
        g0 = grid[0]
        result.extra.update({"t_grid": g0.tolist(), "t_probs": probs.tolist(),
                             "t_estimate": g0[probs.argmax(1)].tolist(),
                             "t_mean": (probs * g0.float()).sum(1).tolist()})
        return result
