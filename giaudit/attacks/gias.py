"""GIAS: gradient inversion in alternative spaces (Jeon, Kim, Kim, Ok, Song; NeurIPS 2021).

Threat model: honest-but-curious server, SoK class D: besides the model, the
update and the batch size it holds a generator `G_theta` trained on the same
or a similar distribution as the client's data (a "surrogate data" prior).

Recipe:
1. latent search, GI-z: ``z* = argmin_z D(grad_w L(G(z), y), g*) + tv * TV(G(z))``,
   negative-cosine D, Adam, learning rate x0.1 at 3/8, 5/8, 7/8 of the phase;
2. parameter search, GI-z+theta: from z* (fixed), one copy of the generator
   weights per image, optimised on the same objective.
Latent first, then parameters; `mode = "z"` stops after step 1, so a report
can show GI-x (the `ig` attack), GI-z (`gias_z`) and GI-z+theta (`gias`) side
by side. In "z+theta" mode the iteration budget is split: `z_fraction` of it
for the latent search, the rest for the parameters (so GIAS and IG get the
same number of iterations).

Deviations: the generator runs in eval mode (BatchNorm as a fixed affine map,
so images of one batch stay independent, as per-image copies require); with
`budget.patience`, a stalled latent search hands over to the parameter search
early instead of stopping. Restarts are ranked by the final matching loss.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from giaudit.attacks._common.distances import DISTANCES, total_variation
from giaudit.attacks._common.optimise import PhaseSteps, adam_steps, at_most
from giaudit.attacks.base import ATTACKS, LABEL_DIM, Attack, Budget, Descent, Dim, Progress, RestartResult, drive
from giaudit.device import placement, to_model
from giaudit.errors import ConfigError, ParamError
from giaudit.priors.generator import Generator
from giaudit.priors.io import Prior, as_prior
from giaudit.registry import check_choice, check_number
from giaudit.types import Capability, Observation

MODES = ("z", "z+theta")


def check_prior_matches(prior: Prior, obs: Observation, attack: str) -> None:
    c = prior.config
    want = obs.data_spec.shape
    if (c.channels, c.size, c.size) != tuple(want):
        raise ConfigError(f"attacks.{attack}.prior: the prior {prior.name!r} makes {c.channels}x{c.size}x{c.size} "
                          f"images but the data is {want[0]}x{want[1]}x{want[2]}; train a matching prior with "
                          f"`giaudit prior train --data ... --size {want[1]}`")


def gan_prior(spec: Any, key: str, attack: str) -> Prior:
    """The GAN prior `spec` names (loaded now, so a bad one fails naming `key` before any data loads)."""
    prior = as_prior(spec, where=key)
    if not isinstance(prior, Prior):
        raise ParamError(key, f"{prior.name!r} is a {prior.kind} prior; {attack} needs a GAN prior such as mnist32")
    return prior


def frozen_copy(gen: Generator) -> Generator:
    """An eval-mode copy whose weights need no gradient (latent search only moves z)."""
    g = copy.deepcopy(gen).eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g


class PriorAttack(Attack):
    """An attack that holds a generative prior (GIAS, GIML, GGL): a shipped name, a path or a `Prior`.

    The prior is loaded when the attack is configured (small safetensors files), so a bad name,
    a missing, truncated or non-safetensors checkpoint fails naming the key or the file before
    any data is loaded, not mid-audit.
    """

    def _set_prior(self, prior: Any) -> None:
        self.prior_spec = prior
        self._prior = gan_prior(prior, "prior", self.name)

    @property
    def prior(self) -> Prior:
        return self._prior

    def provenance(self) -> dict[str, Any]:
        """The prior's provenance for `params()` (its training data, steps, ...) and the spec as configured."""
        spec = self.prior_spec if isinstance(self.prior_spec, (str, os.PathLike)) else self.prior.name
        return {**self.prior.describe(), "prior_spec": str(spec)}

    def generator_for(self, obs: Observation) -> Generator:
        """A frozen eval-mode copy of the prior's generator, after checking it makes the data's image shape."""
        prior = self.prior
        check_prior_matches(prior, obs, self.name)
        return frozen_copy(prior.generator).to(*placement(obs.model))


@ATTACKS.register("gias")
class GIAS(PriorAttack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE, Capability.SURROGATE_DATA})
    sok_class: ClassVar[str] = "D"
    display_name: ClassVar[str] = "GIAS"
    search_space: ClassVar[Mapping[str, Dim]] = {
        "lr_z": Dim("log", 1e-3, 0.3), "lr_theta": Dim("log", 1e-5, 1e-2), "tv_weight": Dim("log", 1e-7, 1e-1),
        "z_fraction": Dim("float", 0.1, 0.9), "labels": LABEL_DIM}
    default_mode: ClassVar[str] = "z+theta"

    def __init__(self, *, labels: str = "auto", prior: Any = "mnist32", mode: str | None = None,
                 lr_z: float = 0.03, lr_theta: float = 1e-3, tv_weight: float = 1e-4, distance: str = "cosine",
                 z_fraction: float = 0.5, z_l2: float = 0.0, adaptive: bool = False) -> None:
        # adaptive: defense-aware matching; `objective` goes through `trial_update`, which replays it.
        super().__init__(labels=labels, adaptive=adaptive)
        mode = mode if mode is not None else self.default_mode
        check_choice("mode", mode, MODES)
        check_choice("distance", distance, DISTANCES)
        check_number("lr_z", lr_z, low=0.0, strict_low=True)
        check_number("lr_theta", lr_theta, low=0.0, strict_low=True)
        check_number("z_fraction", z_fraction, low=0.0, strict_low=True, high=1.0)
        check_number("tv_weight", tv_weight, low=0.0)
        check_number("z_l2", z_l2, low=0.0)
        self._set_prior(prior)
        self.mode, self.lr_z, self.lr_theta, self.tv_weight = mode, lr_z, lr_theta, tv_weight
        self.distance, self.z_fraction, self.z_l2 = distance, z_fraction, z_l2

    # -- objective ---------------------------------------------------------------------------
    def objective(self, obs: Observation, labels: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(matching loss, full loss) of candidate images `x`, differentiable in `x`."""
        trial = self.trial_update(obs, obs.model, x, labels)
        match = DISTANCES[self.distance](trial, obs.update.tensors)
        loss = match + self.tv_weight * total_variation(x) if self.tv_weight else match
        return match, loss

    # -- the two phases (GIML reuses them) ---------------------------------------------------
    def latent_search(self, obs: Observation, labels: Tensor, gen: nn.Module, z0: Tensor, iters: int,
                      budget: Budget, progress: Progress | None, losses: list[float],
                      z_l2: float | None = None) -> tuple[Tensor, float, bool]:
        """GI-z: Adam on z with `gen` fixed. Returns (best z, its matching loss, stalled early)."""
        return drive(self.latent_steps(obs, labels, gen, z0, iters, budget, losses, z_l2), progress)

    def latent_steps(self, obs: Observation, labels: Tensor, gen: nn.Module, z0: Tensor, iters: int,
                     budget: Budget, losses: list[float],
                     z_l2: float | None = None) -> PhaseSteps:
        """`latent_search` as a generator (one yield per step), so a restart can be paused."""
        z = z0.clone().requires_grad_(True)
        l2 = self.z_l2 if z_l2 is None else z_l2

        def step() -> tuple[Tensor, Tensor, Tensor]:
            match, loss = self.objective(obs, labels, gen(z))
            if l2:
                loss = loss + l2 * z.pow(2).mean()
            return match, loss, z

        return (yield from adam_steps([z], step, lr=self.lr_z, iterations=iters, budget=budget, losses=losses,
                                      start=z.detach().clone()))

    def parameter_steps(self, obs: Observation, labels: Tensor, gen: nn.Module, z: Tensor, iters: int,
                        budget: Budget, losses: list[float]) -> PhaseSteps:
        """GI-z+theta: one copy of the generator weights per image, z fixed; a generator (one yield per step)
        that returns (best images, loss, stalled)."""
        names = [n for n, _ in gen.named_parameters()]
        buffers = dict(gen.named_buffers())
        copies = [[p.detach().clone().requires_grad_(True) for p in gen.parameters()] for _ in range(z.shape[0])]

        def render() -> Tensor:
            return torch.cat([functional_call(gen, {**dict(zip(names, c)), **buffers}, (z[i:i + 1],))
                              for i, c in enumerate(copies)])

        def step() -> tuple[Tensor, Tensor, Tensor]:
            x = render()
            match, loss = self.objective(obs, labels, x)
            return match, loss, x

        with torch.no_grad():
            start = render()
        return (yield from adam_steps([p for c in copies for p in c], step, lr=self.lr_theta, iterations=iters,
                                      budget=budget, losses=losses, start=start))

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        n = obs.batch_size or labels.numel()
        gen = self.generator_for(obs)
        z0 = to_model(torch.randn((n, gen.config.latent_dim), generator=generator, device=generator.device), obs.model)
        iters = budget.iterations
        n_z = iters if self.mode == "z" else max(1, int(round(iters * self.z_fraction)))
        losses: list[float] = []
        z, z_loss, stalled = yield from self.latent_steps(obs, labels, gen, z0, n_z, budget, losses)
        used_z = len(losses)
        extra: dict[str, Any] = {"mode": self.mode, "z_iterations": used_z, "z_phase_loss": z_loss,
                                 **self.prior.describe()}
        if self.mode == "z":
            with torch.no_grad():
                x = gen(z)
            return RestartResult(x, labels, losses, z_loss, stalled, extra)
        # Iterations the latent search left unused (plateau) go to the parameter search.
        n_t = iters - used_z
        # What a paused restart is ranked by: the best of both phases so far.
        x, t_loss, stalled = yield from at_most(self.parameter_steps(obs, labels, gen, z, n_t, budget, losses), z_loss)
        if z_loss <= t_loss:  # the parameter search never beat its starting point
            with torch.no_grad():
                x = gen(z)
        extra["theta_iterations"] = len(losses) - used_z
        return RestartResult(x, labels, losses, min(z_loss, t_loss), stalled, extra)


@ATTACKS.register("gias_z")
class GIASLatent(GIAS):
    """GI-z: GIAS's latent search only (a separate name so one report shows it beside `gias` and `ig`)."""

    display_name: ClassVar[str] = "GIAS (latent only)"
    default_mode: ClassVar[str] = "z"
