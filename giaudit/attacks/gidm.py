"""GIDM: gradient inversion of a federated diffusion model (Huang, Hong, Chen, Roos, arXiv 2405.20380, 2024).

Scenario: the federated model *is* a DDPM noise predictor `eps_phi` (`scenario.model = "ddpm_unet"`); the
client shares the gradient (or FedAvg delta) of the DDPM loss on its batch with its timesteps `t` and
noise `eps` (`giaudit.fl_diffusion.diffusion_update`, the same function used here for the trial update).

Threat model: honest-but-curious server that fixed `t` and `eps` itself (`threat.diffusion_noise = true`,
the paper's GIDM setting); SoK class B for FedSGD, C for FedAvg (it unrolls the client's local steps).
Without `t` and `eps` GIDM refuses unless `assume_t` is set: it then assumes that timestep and draws its
own random noise (the naive baseline GIDM+ is compared with).

Recipe (two phases, separate budgets, L2 update distance):
1. Latent search: `x = Sample_phi(z)` with a deterministic DDIM sampler (eta 0, `sampler_steps` steps);
   optimise `z` with Adam, differentiating through the whole sampler, so `x`'s update matches.
2. Pixel-wise fine-tuning of `x` from phase 1's best image (Adam, clamped to the data range).
With `latent_iterations = 0` it is pixel-only inversion from uniform noise (the baseline).

Which sampler: `sampler = "global"` samples with the attacked global model itself (the paper: it is well
trained and the attacker has it). When the global model is untrained, a separately trained DDPM prior
stands in (`sampler = "mnist32_ddpm"` or a checkpoint path): that is surrogate data (class D, needs
`threat.surrogate_data`) and the record's parameters name the prior.

Deviations: the paper's budgets (2 500 latent + 5 000 pixel steps at 128 px on a GPU) are far beyond a
2-core CPU; the defaults here are small. No restart ranking by anything but the attack's own L2 loss.
The trace keeps each phase's losses (`extra["phase_losses"]`).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import DISTANCES
from giaudit.attacks.base import ATTACKS, Attack, Budget, Progress, RestartResult
from giaudit.errors import ConfigError, ThreatModelError
from giaudit.fl_diffusion import diffusion_update
from giaudit.priors.ddpm import as_ddpm, ddim_sample, from_model
from giaudit.registry import check_choice, check_number
from giaudit.types import Capability, DiffusionInfo, Observation


def diffusion_info(obs: Observation, attack: str) -> DiffusionInfo:
    if obs.diffusion is None:
        raise ConfigError(f"attack {attack!r} inverts a federated diffusion model: set scenario.model = 'ddpm_unet'")
    return obs.diffusion


@ATTACKS.register("gidm")
class GIDM(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    uses_client_noise: ClassVar[bool] = True   # GIDM uses the t and eps the server fixed

    def __init__(self, *, latent_iterations: int | None = None, pixel_iterations: int | None = None,
                 sampler: str = "global", sampler_steps: int = 5, latent_lr: float = 0.05,
                 pixel_lr: float = 0.02, distance: str = "l2", assume_t: int | None = None) -> None:
        super().__init__()
        check_choice("distance", distance, DISTANCES)
        check_number("latent_iterations", latent_iterations, low=0)
        check_number("pixel_iterations", pixel_iterations, low=0)
        check_number("sampler_steps", sampler_steps, low=1)
        check_number("latent_lr", latent_lr, low=0.0, strict_low=True)
        check_number("pixel_lr", pixel_lr, low=0.0, strict_low=True)
        check_number("assume_t", assume_t, low=0)
        self.latent_iterations, self.pixel_iterations = latent_iterations, pixel_iterations
        self.sampler, self.sampler_steps = sampler, sampler_steps
        self.latent_lr, self.pixel_lr, self.distance, self.assume_t = latent_lr, pixel_lr, distance, assume_t
        # A prior sampler is loaded once, when the attack is built (a wrong path fails at config time).
        self._prior = None if sampler == "global" else as_ddpm(sampler, where="sampler")

    def provenance(self) -> dict[str, Any]:
        p: dict[str, Any] = {"optimiser": "Adam", "sampler_used": "global model" if self._prior is None else "prior"}
        if self._prior is not None:
            p.update(self._prior.describe())
        return p

    # -- hooks ---------------------------------------------------------------------------------
    def capabilities_used(self, obs: Observation) -> set[Capability]:
        used = super().capabilities_used(obs)
        if obs.diffusion is not None and obs.diffusion.timesteps is not None and self.uses_client_noise:
            used.add(Capability.DIFFUSION_NOISE)
        if self._prior is not None and self.latent_iterations != 0:
            used.add(Capability.SURROGATE_DATA)
        return used

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        # A DDPM has no labels; the batch size is all the attack needs.
        n = obs.batch_size
        if n is None:
            raise ThreatModelError(f"attack {self.name!r} needs the batch size: set threat.batch_size = true")
        return torch.zeros(n, dtype=torch.long), "none"

    def phase_budgets(self, budget: Budget) -> tuple[int, int]:
        """(latent, pixel) iterations: the options, else a third / two thirds of `budget.iterations`."""
        lat = self.latent_iterations if self.latent_iterations is not None else budget.iterations // 3
        pix = self.pixel_iterations if self.pixel_iterations is not None else budget.iterations - lat
        return lat, max(0, pix)

    def sampler_for(self, obs: Observation) -> tuple[torch.nn.Module, Tensor, str]:
        """(frozen sampler UNet, its schedule, description). Its weights are a separate copy, so the trial
        update's gradient with respect to the global weights never flows through the sampler."""
        info = diffusion_info(obs, self.name)
        if self._prior is None:
            unet = copy.deepcopy(obs.model).eval().requires_grad_(False)
            return unet, info.alphas_cumprod, "global model"
        if not obs.threat.has(Capability.SURROGATE_DATA):
            raise ThreatModelError(f"attack {self.name!r} with sampler = {self.sampler!r} uses a DDPM prior "
                                   "trained on similar data: set threat.surrogate_data = true, or sampler = 'global'")
        unet = copy.deepcopy(self._prior.unet).eval().requires_grad_(False)
        return unet, self._prior.alphas_cumprod, f"prior {self._prior.name}"

    def client_noise(self, obs: Observation, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, str]:
        """The client's (t, eps): given when the server fixed them, else assumed (t) and random (eps)."""
        info = diffusion_info(obs, self.name)
        if info.timesteps is not None and info.noise is not None:
            return info.timesteps, info.noise, "known (server fixed them)"
        if self.assume_t is None:
            raise ThreatModelError(f"attack {self.name!r} needs the client's t and eps: set threat.diffusion_noise = "
                                   "true (the server fixes them), set attack.assume_t, or use gidm_plus")
        t = torch.full((n,), min(self.assume_t, info.num_train_timesteps - 1), dtype=torch.long)
        eps = torch.randn((n, *obs.data_spec.shape), generator=generator)
        return t, eps, f"assumed t={int(t[0])}, random eps"

    # -- the attack ----------------------------------------------------------------------------
    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        info = diffusion_info(obs, self.name)
        n = labels.numel()
        lat_iters, pix_iters = self.phase_budgets(budget)
        t, eps, source = self.client_noise(obs, n, generator)
        distance = DISTANCES[self.distance]
        protocol = self.protocol_for(obs)
        target = obs.update.tensors
        model, ac = obs.model, info.alphas_cumprod

        def match(x: Tensor) -> Tensor:
            return distance(diffusion_update(model, x, t, eps, ac, protocol, create_graph=True), target)

        phase_losses: dict[str, list[float]] = {"latent": [], "pixel": []}
        x_best = self.initial_images(obs, n, generator)
        best = float("inf")
        extra: dict[str, Any] = {"t_eps": source}
        if lat_iters:
            unet, sac, desc = self.sampler_for(obs)
            extra["sampler"] = desc
            z = torch.randn((n, *obs.data_spec.shape), generator=generator).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.latent_lr)
            for _ in range(lat_iters):
                x = from_model(ddim_sample(unet, sac, z, self.sampler_steps))
                loss = match(x)
                (g,) = torch.autograd.grad(loss, z)
                value = float(loss.detach())
                phase_losses["latent"].append(value)
                if value < best:
                    best, x_best = value, x.detach().clone()
                z.grad = g
                opt.step()
                if progress is not None:
                    progress(1)
        lo, hi = obs.data_spec.value_range
        x = x_best.clamp(lo, hi).clone().requires_grad_(True)
        best = float("inf") if pix_iters else best
        opt = torch.optim.Adam([x], lr=self.pixel_lr)
        for _ in range(pix_iters):
            loss = match(x)
            (g,) = torch.autograd.grad(loss, x)
            value = float(loss.detach())
            phase_losses["pixel"].append(value)
            if value < best:
                best, x_best = value, x.detach().clone()
            x.grad = g
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            if progress is not None:
                progress(1)
        extra["phase_losses"] = phase_losses
        losses = phase_losses["latent"] + phase_losses["pixel"]
        return RestartResult(x_best, labels, losses, best, extra=extra)
