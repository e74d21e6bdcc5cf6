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

Deviations: the public GIDM code picks `t` by an argmax of random logits (not differentiable) and feeds
GIDM+ the true noise; neither is done here. The paper does not give the alternation order or the timestep
parametrisation; the choices above are ours.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import DISTANCES
from giaudit.attacks.base import ATTACKS, Budget, Progress, RestartResult
from giaudit.attacks.gidm import GIDM, diffusion_info
from giaudit.fl_diffusion import diffusion_update
from giaudit.priors.ddpm import ddim_sample, from_model
from giaudit.registry import check_number
from giaudit.types import Capability, Observation


def timestep_grid(num_train_timesteps: int, k: int) -> Tensor:
    """K cell centres evenly covering [0, T): e.g. T=1000, K=10 -> 50, 150, ..., 950."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long().clamp(
        0, num_train_timesteps - 1)


@ATTACKS.register("gidm_plus")
class GIDMPlus(GIDM):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    uses_client_noise: ClassVar[bool] = False  # estimates t and eps itself

    def __init__(self, *, latent_iterations: int | None = None, pixel_iterations: int | None = None,
                 sampler: str = "global", sampler_steps: int = 5, latent_lr: float = 0.05,
                 pixel_lr: float = 0.02, distance: str = "l2", t_grid: int = 10, t_lr: float = 0.2,
                 eps_lr: float = 0.05, temperature_end: float = 0.3, alternate: bool = True) -> None:
        super().__init__(latent_iterations=latent_iterations, pixel_iterations=pixel_iterations, sampler=sampler,
                         sampler_steps=sampler_steps, latent_lr=latent_lr, pixel_lr=pixel_lr, distance=distance)
        check_number("t_grid", t_grid, low=2)
        check_number("t_lr", t_lr, low=0.0, strict_low=True)
        check_number("eps_lr", eps_lr, low=0.0, strict_low=True)
        check_number("temperature_end", temperature_end, low=0.0, high=1.0, strict_low=True)
        self.t_grid, self.t_lr, self.eps_lr = t_grid, t_lr, eps_lr
        self.temperature_end, self.alternate = temperature_end, alternate

    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        info = diffusion_info(obs, self.name)
        n = labels.numel()
        lat_iters, pix_iters = self.phase_budgets(budget)
        total = max(1, lat_iters + pix_iters)
        distance = DISTANCES[self.distance]
        protocol = self.protocol_for(obs)
        target = obs.update.tensors
        model, ac = obs.model, info.alphas_cumprod
        grid = timestep_grid(info.num_train_timesteps, self.t_grid).expand(n, -1)
        eps = torch.randn((n, *obs.data_spec.shape), generator=generator).requires_grad_(True)
        logits = torch.zeros((n, self.t_grid), requires_grad=True)
        opt_eps = torch.optim.Adam([eps], lr=self.eps_lr)
        opt_t = torch.optim.Adam([logits], lr=self.t_lr)
        step = 0

        def weights() -> Tensor:
            tau = self.temperature_end ** (step / total)
            return torch.softmax(logits / tau, dim=1)

        def evaluate(x: Tensor, data: Tensor) -> tuple[float, Tensor | None, Tensor | None, Tensor | None]:
            """One update evaluation; gradients for the blocks updated this iteration."""
            trial = diffusion_update(model, x, grid, eps, ac, protocol, weights=weights(), create_graph=True)
            loss = distance(trial, target)
            which = step % 3 if self.alternate else -1
            blocks = {0: [data], 1: [eps], 2: [logits]}.get(which, [data, eps, logits])
            grads = torch.autograd.grad(loss, blocks)
            out: dict[int, Tensor] = {id(b): g for b, g in zip(blocks, grads)}
            return float(loss.detach()), out.get(id(data)), out.get(id(eps)), out.get(id(logits))

        def apply(opt_data: torch.optim.Optimizer, data: Tensor, gd: Tensor | None, ge: Tensor | None,
                  gt: Tensor | None) -> None:
            for opt, var, g in ((opt_data, data, gd), (opt_eps, eps, ge), (opt_t, logits, gt)):
                if g is not None:
                    var.grad = g
                    opt.step()

        phase_losses: dict[str, list[float]] = {"latent": [], "pixel": []}
        x_best = self.initial_images(obs, n, generator)
        best = float("inf")
        extra: dict[str, Any] = {"t_eps": "private: estimated"}
        if lat_iters:
            unet, sac, desc = self.sampler_for(obs)
            extra["sampler"] = desc
            z = torch.randn((n, *obs.data_spec.shape), generator=generator).requires_grad_(True)
            opt_z = torch.optim.Adam([z], lr=self.latent_lr)
            for _ in range(lat_iters):
                x = from_model(ddim_sample(unet, sac, z, self.sampler_steps))
                value, gd, ge, gt = evaluate(x, z)
                phase_losses["latent"].append(value)
                if value < best:
                    best, x_best = value, x.detach().clone()
                apply(opt_z, z, gd, ge, gt)
                step += 1
                if progress is not None:
                    progress(1)
        lo, hi = obs.data_spec.value_range
        x = x_best.clamp(lo, hi).clone().requires_grad_(True)
        best = float("inf") if pix_iters else best
        opt_x = torch.optim.Adam([x], lr=self.pixel_lr)
        for _ in range(pix_iters):
            value, gd, ge, gt = evaluate(x, x)
            phase_losses["pixel"].append(value)
            if value < best:
                best, x_best = value, x.detach().clone()
            apply(opt_x, x, gd, ge, gt)
            with torch.no_grad():
                x.clamp_(lo, hi)
            step += 1
            if progress is not None:
                progress(1)
        with torch.no_grad():
            probs = weights()
        g0 = grid[0]
        extra.update({"phase_losses": phase_losses, "t_grid": g0.tolist(), "t_probs": probs.tolist(),
                      "t_estimate": g0[probs.argmax(1)].tolist(),
                      "t_mean": (probs * g0.float()).sum(1).tolist()})
        return RestartResult(x_best, labels, phase_losses["latent"] + phase_losses["pixel"], best, extra=extra)
