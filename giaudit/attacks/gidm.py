"""GIDM: gradient inversion of a federated diffusion model (Huang, Hong, Chen, Roos, arXiv 2405.20380, 2024).

Scenario: the federated model *is* a DDPM noise predictor `eps_phi` (`scenario.model = "ddpm_unet"`); the
client shares the gradient (or FedAvg delta) of the DDPM loss on its batch with its timesteps `t` and
noise `eps` (`giaudit.fl_diffusion.diffusion_update`, the same function used here for the trial update).

Threat model: honest-but-curious server that fixed `t` and `eps` itself (`threat.diffusion_noise = true`,
the paper's GIDM setting); SoK class B for FedSGD, C for FedAvg (it unrolls the client's local steps).
Without `t` and `eps` GIDM refuses unless `assume_t` is set: it then assumes that timestep and draws its
own random noise (the naive baseline GIDM+ is compared with).

Recipe (two phases, L2 update distance):
1. Latent search: `x = Sample_phi(z)` with a deterministic DDIM sampler (eta 0, `sampler_steps` steps);
   optimise `z` with Adam, differentiating through the whole sampler, so `x`'s update matches.
2. Pixel-wise fine-tuning of `x` from phase 1's best image (Adam, clamped to the data range).
With `latent_iterations = 0` it is pixel-only inversion from uniform noise (the baseline).

Options beyond the paper (defaults keep its recipe):
- `pixel_optimiser = "lbfgs"` (default "adam"): phase 2 runs L-BFGS with a strong-Wolfe line search (as
  giaudit's DLG; history `lbfgs_history`, default 20) instead of Adam. Every line-search trial is one update
  evaluation and counts as one of the phase's iterations. Near the client's image the update-matching
  objective is smooth and small, where Adam's loss falls slowly and L-BFGS's fast; L-BFGS is unconstrained, so
  the pixels are clamped to the data range only once, at the end (their loss is the one recorded).
- `screen = M` (default 0): before phase 1, M initial noises are drawn, each sampled once without a gradient
  and scored by the attack's own matching loss of the sampled image (a single backward, no double backward);
  phase 1 starts from the best. The digit the latent phase ends on is mostly decided by where it starts, so
  this picks the basin by the objective before any descent. The M evaluations are outside the iterations;
  the record keeps their losses (`extra["screen_losses"]`).

The phases share the budget's `iterations` N (one update evaluation per iteration; `GIDM.phase_budgets`):
without options a third of N (rounded down) goes to phase 1 and the rest to phase 2; `latent_iterations` and
`pixel_iterations` fix a phase's length while the two fit in N, and when they ask for more than N both shrink
to shares of N in the ratio of the options. The two phases together never run more than N iterations.

Which sampler: `sampler = "global"` samples with the attacked global model itself (the paper: it is well
trained and the attacker has it). When the global model is untrained, a separately trained DDPM prior
stands in (`sampler = "mnist32_ddpm"` or a checkpoint path): that is surrogate data (class D, needs
`threat.surrogate_data`) and the record's parameters name the prior.

Deviations: the paper's budgets (2 500 latent + 5 000 pixel steps at 128 px on a GPU) are far beyond a
2-core CPU; the defaults here are small. L-BFGS for the pixels and the screening of starts are not the paper's
(options, off by default). Nothing here, restarts and screening included, ranks by anything but the attack's
own update-matching loss.
The trace keeps each phase's losses (`extra["phase_losses"]`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import DISTANCES
from giaudit.attacks.base import ATTACKS, Attack, Budget, Descent, RestartResult, device_of
from giaudit.device import moved, placement, to_model
from giaudit.errors import ConfigError, ThreatModelError
from giaudit.fl_diffusion import diffusion_update
from giaudit.priors.ddpm import as_ddpm, ddim_sample, from_model
from giaudit.registry import check_choice, check_number
from giaudit.types import Capability, DiffusionInfo, Observation

# The pixel phase's optimisers: Adam (the paper's), or L-BFGS with a strong-Wolfe line search (as DLG).
PIXEL_OPTIMISERS = ("adam", "lbfgs")
# L-BFGS iterations per `LBFGS.step` call: the phase pauses (yields) between calls, for halving.
LBFGS_CHUNK = 10

# One update evaluation of a phase: (images, the phase's variable, iteration) -> (value, gradients by id).
Evaluate = Callable[[Tensor, Tensor, int], tuple[float, dict[int, Tensor]]]


def diffusion_info(obs: Observation, attack: str) -> DiffusionInfo:
    if obs.diffusion is None:
        raise ConfigError(f"attacks.{attack}: {attack} inverts a federated diffusion model, and this observation "
                          "holds none (its noise schedule is missing): in a config set scenario.model = "
                          "'ddpm_unet'; on your own update use an attack for classifiers (e.g. ig)")
    return obs.diffusion


@ATTACKS.register("gidm")
class GIDM(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    display_name: ClassVar[str] = "GIDM"
    uses_client_noise: ClassVar[bool] = True   # GIDM uses the t and eps the server fixed

    def __init__(self, *, latent_iterations: int | None = None, pixel_iterations: int | None = None,
                 sampler: str = "global", sampler_steps: int = 5, latent_lr: float = 0.05,
                 pixel_lr: float = 0.02, distance: str = "l2", assume_t: int | None = None,
                 pixel_optimiser: str = "adam", lbfgs_history: int = 20, screen: int = 0) -> None:
        super().__init__()
        check_choice("distance", distance, DISTANCES)
        check_choice("pixel_optimiser", pixel_optimiser, PIXEL_OPTIMISERS)
        check_number("lbfgs_history", lbfgs_history, low=1)
        check_number("screen", screen, low=0)
        self.pixel_optimiser, self.lbfgs_history, self.screen = pixel_optimiser, lbfgs_history, screen
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
        optimiser = "Adam" if self.pixel_optimiser == "adam" else "Adam (latent), L-BFGS (pixels)"
        p: dict[str, Any] = {"optimiser": optimiser, "sampler_used": "global model" if self._prior is None else "prior"}
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
        return torch.zeros(n, dtype=torch.long, device=device_of(obs)), "none"

    def phase_budgets(self, budget: Budget) -> tuple[int, int]:
        """(latent, pixel) iterations, together never more than `budget.iterations` (N).

        Unset options share N: the latent phase gets N // 3, the pixel phase the rest. A set option is that
        phase's length while the phases fit in N (an unset one then takes what is left of N); when they ask for
        more than N, both shrink to shares of N in the ratio of the options (the latent share rounded, the pixel
        phase the rest, each phase with a positive option keeping at least one iteration while N >= 2). So a
        budget at least as large as the options runs them exactly, and a tiny budget is tiny in both phases.
        """
        n = budget.iterations
        lat_opt, pix_opt = self.latent_iterations, self.pixel_iterations
        if lat_opt is None:
            lat = n // 3
            return lat, min(n - lat, pix_opt) if pix_opt is not None else n - lat
        if pix_opt is None or lat_opt + pix_opt <= n:
            lat = min(lat_opt, n)
            return lat, (n - lat) if pix_opt is None else pix_opt
        lat = round(n * lat_opt / (lat_opt + pix_opt))
        if n >= 2:
            lat = min(max(lat, 1 if lat_opt else 0), n - (1 if pix_opt else 0))
        return lat, n - lat

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
        # The copy computes where (and in the dtype) the observation's model does.
        dev, dtype = placement(obs.model)
        unet = moved(copy.deepcopy(self._prior.unet), dev, dtype).eval().requires_grad_(False)
        return unet, self._prior.alphas_cumprod.to(dev, dtype), f"prior {self._prior.name}"

    def client_noise(self, obs: Observation, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, str]:
        """The client's (t, eps): given when the server fixed them, else assumed (t) and random (eps)."""
        info = diffusion_info(obs, self.name)
        if info.timesteps is not None and info.noise is not None:
            return info.timesteps, info.noise, "known (server fixed them)"
        if self.assume_t is None:
            raise ThreatModelError(f"attack {self.name!r} needs the client's t and eps: set threat.diffusion_noise = "
                                   f"true (the server fixes them), set attacks.{self.name}.assume_t, or use gidm_plus")
        t = torch.full((n,), min(self.assume_t, info.num_train_timesteps - 1), dtype=torch.long, device=device_of(obs))
        eps = to_model(torch.randn((n, *obs.data_spec.shape), generator=generator, device=generator.device), obs.model)
        return t, eps, f"assumed t={int(t[0])}, random eps"

    # -- the attack ----------------------------------------------------------------------------
    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        n = labels.numel()
        t, eps, source = self.client_noise(obs, n, generator)
        distance = DISTANCES[self.distance]
        protocol = self.protocol_for(obs)
        target = obs.update.tensors
        model, ac = obs.model, diffusion_info(obs, self.name).alphas_cumprod

        def evaluate(x: Tensor, data: Tensor, i: int) -> tuple[float, dict[int, Tensor]]:
            loss = distance(diffusion_update(model, x, t, eps, ac, protocol, create_graph=True), target)
            (g,) = torch.autograd.grad(loss, data)
            return float(loss.detach()), {id(data): g}

        def score(x: Tensor) -> float:
            return float(distance(diffusion_update(model, x, t, eps, ac, protocol), target))

        return (yield from self.two_phases(obs, labels, budget, generator, evaluate, {"t_eps": source}, score=score))

    def screened_latent(self, obs: Observation, n: int, generator: torch.Generator, unet: torch.nn.Module,
                        sac: Tensor, score: Callable[[Tensor], float] | None) -> tuple[Tensor, list[float]]:
        """The latent phase's start: with `screen = 0` one draw of N(0, I); with `screen = M`, M draws, each
        sampled once (no gradient) and scored by `score` (the attack's own matching loss of the sampled images,
        one update evaluation without a double backward), and the best kept. Returns (z, the M scores)."""
        shape = (n, *obs.data_spec.shape)
        if not self.screen or score is None:
            return to_model(torch.randn(shape, generator=generator, device=generator.device), obs.model), []
        draws = to_model(torch.randn((self.screen, *shape), generator=generator, device=generator.device), obs.model)
        with torch.no_grad():
            images = [from_model(ddim_sample(unet, sac, draws[k], self.sampler_steps)) for k in range(self.screen)]
        scores = [score(x) for x in images]
        return draws[min(range(self.screen), key=scores.__getitem__)], scores

    def two_phases(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                   evaluate: Evaluate, extra: dict[str, Any],
                   others: Sequence[tuple[torch.optim.Optimizer, Tensor]] = (),
                   score: Callable[[Tensor], float] | None = None) -> Descent:
        """Phase 1 (Adam on the sampler's initial noise `z`, through the DDIM sampler) then phase 2 (Adam or
        L-BFGS on the pixels, from phase 1's best image), one update evaluation per iteration.

        `evaluate(x, data, i)` scores the images `x` (made from the phase's variable `data`) at iteration `i`
        and returns (value, gradients by `id` of the variables it updates this iteration); `data` and each
        variable of `others` (optimiser, tensor) with a gradient then take one step. `score(x)` is the
        matching loss alone (no gradient), for screening latent starts (`screen`). Yields the best value so far
        after each update evaluation (pausable restarts); the trace keeps each phase's losses."""
        n = labels.numel()
        lat_iters, pix_iters = self.phase_budgets(budget)
        phase_losses: dict[str, list[float]] = {"latent": [], "pixel": []}
        x_best = self.initial_images(obs, n, generator)
        best = float("inf")
        i = 0

        def step(x: Tensor, data: Tensor, opt: torch.optim.Optimizer, phase: str) -> None:
            nonlocal best, x_best, i
            value, grads = evaluate(x, data, i)
            phase_losses[phase].append(value)
            if value < best:  # before the step moves `data` (in phase 2 it is `x` itself)
                best, x_best = value, x.detach().clone()
            for o, var in ((opt, data), *others):
                if id(var) in grads:
                    var.grad = grads[id(var)]
                    o.step()
            i += 1

        if lat_iters:
            unet, sac, desc = self.sampler_for(obs)
            extra["sampler"] = desc
            z, screened = self.screened_latent(obs, n, generator, unet, sac, score)
            if screened:
                extra["screen_losses"] = screened
            z.requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.latent_lr)
            for _ in range(lat_iters):
                step(from_model(ddim_sample(unet, sac, z, self.sampler_steps)), z, opt, "latent")
                yield best
        lo, hi = obs.data_spec.value_range
        x = x_best.clamp(lo, hi).clone().requires_grad_(True)
        floor, best = best, (float("inf") if pix_iters else best)
        if self.pixel_optimiser == "lbfgs" and pix_iters:
            if others:
                raise ConfigError(f"attacks.{self.name}.pixel_optimiser: 'lbfgs' optimises the pixels alone, and "
                                  f"{self.name} also updates other variables in its pixel phase: use 'adam'")
            for value, image in self.lbfgs_pixels(x, pix_iters, evaluate, i):
                phase_losses["pixel"].append(value)
                if value < best:
                    best, x_best = value, image
                yield min(floor, best)
        else:
            opt = torch.optim.Adam([x], lr=self.pixel_lr)
            for _ in range(pix_iters):
                step(x, x, opt, "pixel")
                with torch.no_grad():
                    x.clamp_(lo, hi)
                yield min(floor, best)  # a paused restart is ranked by the best of both phases so far
        extra["phase_losses"] = phase_losses
        return RestartResult(x_best.clamp(lo, hi), labels, phase_losses["latent"] + phase_losses["pixel"], best,
                             extra=extra)

    def lbfgs_pixels(self, x: Tensor, evaluations: int, evaluate: Evaluate,
                     first: int) -> Iterator[tuple[float, Tensor]]:
        """L-BFGS with a strong-Wolfe line search on the pixels `x` (unconstrained; the kept image is clamped to
        the data range at the end) for at most `evaluations` update evaluations, each line-search trial
        counting as one; yields (value, images) for every evaluation, in order. The objective is scaled by its
        first value (so the line search's and the curvature test's absolute tolerances mean the same at any
        loss scale); the values yielded are unscaled. A point evaluated again (the start of the next chunk of
        `LBFGS_CHUNK` iterations) is read from the last evaluation, not recomputed."""
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=LBFGS_CHUNK, max_eval=evaluations + 1,
                                history_size=self.lbfgs_history, tolerance_grad=0.0, tolerance_change=0.0,
                                line_search_fn="strong_wolfe")
        made: list[tuple[float, Tensor]] = []
        last: list[Tensor] = []   # the last evaluation: point, scaled value, scaled gradient
        scale, count = 0.0, 0

        def closure() -> Tensor:
            nonlocal scale, count
            if last and torch.equal(last[0], x):
                x.grad = last[2].clone()
                return last[1]
            if count >= evaluations:
                raise _Spent
            value, grads = evaluate(x, x, first + count)
            count += 1
            made.append((value, x.detach().clone()))
            scale = scale or (1.0 / value if value > 0 else 1.0)
            x.grad = grads[id(x)] * scale
            last[:] = [x.detach().clone(), torch.tensor(value * scale), x.grad.clone()]
            return last[1]

        while count < evaluations:
            before = count
            try:
                opt.step(closure)
            except _Spent:
                pass
            yield from made
            made.clear()
            if count == before:   # no descent direction left (a zero gradient): nothing more to do
                break


class _Spent(Exception):
    """The L-BFGS pixel phase has used its update evaluations (raised from its closure, inside a line search)."""
