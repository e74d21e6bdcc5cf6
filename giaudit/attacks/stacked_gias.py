"""Many GIAS reconstructions as one: K latent searches, then K parameter searches, stacked.

GIAS (Jeon et al., NeurIPS 2021; threat class D, as `giaudit.attacks.gias`) on K observations that share the
attack's options, the prior and a model architecture (the seeds of a sweep, the clients of a round, the
restarts of each) is K independent optimisations with the same arithmetic. Here each phase runs once for all:

1. GI-z: the objective of one problem (its latent z through the frozen generator, the trial update of those
   images through its own model parameters, the distance to its own observed update, total variation, the
   optional latent L2) is mapped over the problems with `torch.func.vmap` of its gradient in z;
2. GI-z+theta: every image of every problem has its own copy of the generator weights (stacked K x B), the
   images are rendered by `vmap` over problems and images, and the same objective is differentiated in those
   copies.

Nothing is summed across problems: the gradient of problem k is that of problem k's objective alone. Adam is
elementwise (the stacked optimiser is K optimisers with torch's Adam arithmetic), the step schedule (x0.1 at
3/8, 5/8, 7/8 of each phase) is the same for all, each problem keeps its own best state by its own matching
loss, restarts are further problems and each observation keeps its restart with the lowest loss, as
`Attack.reconstruct` does. Labels and starts are drawn exactly as `reconstruct` draws them.

Tolerance: the stacked kernels round differently from one problem's (last bits); Adam's normalised steps keep
that small, and the reconstructions agree to 1e-4 in the images over short runs and to the quality over long
ones (tests state both).

Stacked (`giaudit.attacks.batched.why_not_batched`): FedSGD updates, no adaptive replay, no plateau stop
(`Budget.patience` hands a stalled latent search to the parameter search early, which would desynchronise the
phases), no successive halving, models without BatchNorm or dropout in training mode; anything else runs
unbatched. `giaudit.attacks.batched.reconstruct_many` chooses.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from giaudit.attacks._common.distances import DISTANCES, total_variation
from giaudit.attacks._common.optimise import milestones
from giaudit.attacks._common.stacking import BETAS, EPS, draw_problems, records, stack_problems
from giaudit.attacks.base import Budget
from giaudit.attacks.gias import GIAS
from giaudit.attacks.restarts import RestartResult, generator_for
from giaudit.device import to_model
from giaudit.fl import classification_loss
from giaudit.types import Observation, Reconstruction


class StackedAdam:
    """Adam over a stack of K problems (leading dimension), torch's arithmetic, the same rate for all."""

    def __init__(self, x: Tensor, lr: float) -> None:
        self.m, self.v, self.t, self.lr = torch.zeros_like(x), torch.zeros_like(x), 0, lr

    def step(self, x: Tensor, g: Tensor) -> Tensor:
        self.t += 1
        self.m.lerp_(g, 1 - BETAS[0])
        self.v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        c1, c2 = 1 - BETAS[0] ** self.t, 1 - BETAS[1] ** self.t
        denom = (self.v.sqrt() / math.sqrt(c2)).add_(EPS)
        return x.addcdiv(self.m, denom, value=-self.lr / c1)


def solve(attack: GIAS, observations: Sequence[Observation], budget: Budget,
          rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked GIAS solve of `observations` (one architecture), `budget.restarts` problems each; the
    reconstructions `attack.reconstruct` would return, to the module's tolerance."""
    start = time.perf_counter()
    problems, sources = draw_problems(attack, observations, budget, rngs)
    index = [k for k, _, _ in problems]
    labels_of = [lab for _, lab, _ in problems]
    model, names, params, buffers, target = stack_problems(observations, index)
    gen = attack.generator_for(observations[0])
    gen_names = [n for n, _ in gen.named_parameters()]
    gen_params = {n: p.detach() for n, p in gen.named_parameters()}
    gen_buffers = {n: b.detach() for n, b in gen.named_buffers()}
    z0s = []  # drawn as `descend` draws them, from each restart's own generator
    for k, labels, seed in problems:
        g = generator_for(seed)
        z0s.append(to_model(torch.randn((labels.numel(), gen.config.latent_dim), generator=g, device=g.device),
                            observations[k].model))
    y = torch.stack(labels_of)
    distance = DISTANCES[attack.distance]
    tv, l2 = attack.tv_weight, attack.z_l2

    def match_of(x: Tensor, pk: dict[str, Tensor], bk: dict[str, Tensor], tk: tuple[Tensor, ...],
                 yk: Tensor) -> tuple[Tensor, Tensor]:
        def client_loss(p: dict[str, Tensor]) -> Tensor:
            return classification_loss(functional_call(model, {**p, **bk}, (x,)), yk)

        trial = grad(client_loss)(pk)
        match = distance(tuple(trial[nm] for nm in names), tk)
        return match, (match + tv * total_variation(x) if tv else match)

    def latent_objective(z: Tensor, pk: dict[str, Tensor], bk: dict[str, Tensor], tk: tuple[Tensor, ...],
                         yk: Tensor) -> tuple[Tensor, Tensor]:
        match, loss = match_of(functional_call(gen, {**gen_params, **gen_buffers}, (z,)), pk, bk, tk, yk)
        return (loss + l2 * z.pow(2).mean() if l2 else loss), match

    def render_one(theta: dict[str, Tensor], zi: Tensor) -> Tensor:
        return functional_call(gen, {**theta, **gen_buffers}, (zi[None],))[0]

    def render(theta: dict[str, Tensor], z: Tensor) -> Tensor:  # one problem: B images, B weight copies
        return vmap(render_one)(theta, z)

    def parameter_objective(theta: dict[str, Tensor], z: Tensor, pk: dict[str, Tensor], bk: dict[str, Tensor],
                            tk: tuple[Tensor, ...], yk: Tensor) -> tuple[Tensor, Tensor]:
        match, loss = match_of(render(theta, z), pk, bk, tk, yk)
        return loss, match

    total = len(index)
    iters = budget.iterations
    n_z = iters if attack.mode == "z" else max(1, int(round(iters * attack.z_fraction)))
    losses: list[list[float]] = [[] for _ in range(total)]
    # GI-z
    z = torch.stack(z0s)
    best_z, z_best = z.clone(), [math.inf] * total
    step = vmap(grad(latent_objective, has_aux=True))
    opt = StackedAdam(z, attack.lr_z)
    marks = milestones(n_z)
    for it in range(n_z):
        g, match = step(z, params, buffers, target, y)
        values = match.detach().tolist()
        with torch.no_grad():
            for p, v in enumerate(values):
                if v < z_best[p]:
                    z_best[p] = v
                    best_z[p] = z[p]
                losses[p].append(v)
            z = opt.step(z, g)
        if it + 1 in marks:
            opt.lr *= 0.1
    z_fixed = best_z.detach()
    with torch.no_grad():
        z_images = vmap(lambda zz: functional_call(gen, {**gen_params, **gen_buffers}, (zz,)))(z_fixed)
    final_images, final_loss = z_images, list(z_best)
    extra_theta: list[int] = [0] * total
    if attack.mode != "z":
        n_t = iters - n_z
        b = z_fixed.shape[1]
        theta = {nm: p[None, None].expand(total, b, *p.shape).clone() for nm, p in gen_params.items()}
        t_best = [math.inf] * total
        best_x = z_images.clone()
        pstep = vmap(grad(parameter_objective, has_aux=True))
        opts = {nm: StackedAdam(t, attack.lr_theta) for nm, t in theta.items()}
        marks = milestones(n_t)
        for it in range(n_t):
            g, match = pstep(theta, z_fixed, params, buffers, target, y)
            values = match.detach().tolist()
            with torch.no_grad():
                x_now = vmap(render)(theta, z_fixed)
                for p, v in enumerate(values):
                    if v < t_best[p]:
                        t_best[p] = v
                        best_x[p] = x_now[p]
                    losses[p].append(v)
                theta = {nm: opts[nm].step(theta[nm], g[nm]) for nm in gen_names}
            if it + 1 in marks:
                for o in opts.values():
                    o.lr *= 0.1
        for p in range(total):
            extra_theta[p] = n_t
            if t_best[p] < z_best[p]:  # else the parameter search never beat its starting point
                final_images[p] = best_x[p]
            final_loss[p] = min(z_best[p], t_best[p])
    results = []
    for p in range(total):
        extra: dict[str, Any] = {"mode": attack.mode, "z_iterations": n_z, "z_phase_loss": z_best[p],
                                 **attack.prior.describe()}
        if attack.mode != "z":
            extra["theta_iterations"] = extra_theta[p]
        results.append(RestartResult(final_images[p], labels_of[p], losses[p], final_loss[p], False, extra))
    return records(observations, problems, results, sources, (time.perf_counter() - start) / len(observations))


__all__ = ["StackedAdam", "solve"]
