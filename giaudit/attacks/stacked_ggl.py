"""Many GGL reconstructions as one: every problem's CMA-ES population evaluated in one stacked computation.

GGL (Li et al., CVPR 2022; threat class D, as `giaudit.attacks.ggl`) with CMA-ES asks each problem's
evolution strategy for a population of latent vectors per generation and scores every candidate by the
distance of its trial update to the observed one. One problem's population is already one batched computation
(`GGL.evaluate_population`); for K problems (the seeds of a sweep, the clients of a round, the restarts of
each) that share the attack's options, the prior and a model architecture, this module evaluates all K
populations in one: the generator renders every candidate of every problem in one batch, and the trial updates
come from `torch.func.vmap` over the problems (each through its own model parameters) of `vmap` over its
candidates. The adaptive replay of each problem's disclosed defenses, its distance to its own observed update
and the KL term are then applied problem by problem (elementwise, cheap). Each problem keeps its own
evolution strategy (`cma`'s ask and tell, seeded as the unbatched run seeds it), its own plateau stop and its
own best candidate; restarts are further problems, and each observation keeps the restart with the lowest
loss, as `Attack.reconstruct` does.

Tolerance: the stacked products round differently from one problem's (last bits), and CMA-ES's sampling
follows the values it is told, so late generations can differ; the losses agree to 1e-5 relative in the first
generations and the reconstructions to the quality (tests state both).

Stacked (`giaudit.attacks.batched.why_not_batched`): the "cma" optimizer, no successive halving, models
without BatchNorm or dropout in training mode; "bo" (Optuna's sequential trials) and "adam" run unbatched.
`giaudit.attacks.batched.reconstruct_many` chooses.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from giaudit.attacks._common.stacking import Problem, draw_problems, records, stack_problems
from giaudit.attacks.base import Budget, Plateau
from giaudit.attacks.ggl import GGL, kl_to_standard_normal, parametrised_update_fn
from giaudit.attacks.restarts import RestartResult, generator_for
from giaudit.device import to_model
from giaudit.priors.generator import Generator
from giaudit.types import Observation, Reconstruction


def solve(attack: GGL, observations: Sequence[Observation], budget: Budget,
          rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked CMA-ES solve of `observations` (one architecture, one protocol), `budget.restarts` problems
    each; the reconstructions `attack.reconstruct` would return, to the module's tolerance."""
    import cma

    start = time.perf_counter()
    problems, label_sources = draw_problems(attack, observations, budget, rngs)
    gen = attack.generator_for(observations[0])
    # Each observation's replay, observed update and scale, as the unbatched run sets them up.
    setups = [attack._setup(obs)[1:] for obs in observations]
    # cma draws its samples from numpy's global generator, which its `seed` option seeds: each problem's
    # strategy gets its own generator state back around every ask and tell, so that interleaving the problems
    # draws what each would have drawn alone.
    caller_state = np.random.get_state()
    starts: list[Tensor] = []
    strategies: list[cma.CMAEvolutionStrategy] = []
    states: list[Any] = []  # numpy generator states
    for _k, labels, seed in problems:  # z0 and the CMA seed, drawn as `run_restart` and `_cma` draw them
        g = generator_for(seed)
        z0 = torch.randn((labels.numel(), gen.config.latent_dim), generator=g, device=g.device)
        cma_seed = int(torch.randint(1, 2**31 - 1, (1,), generator=g, device=g.device))
        strategies.append(cma.CMAEvolutionStrategy(z0.reshape(-1).double().numpy(), attack.sigma0,
                                                   {"popsize": attack.population, "seed": cma_seed, "verbose": -9,
                                                    "maxiter": budget.iterations, "tolfun": 0, "tolx": 0,
                                                    "tolfunhist": 0, "tolstagnation": budget.iterations + 1}))
        starts.append(z0)
        states.append(np.random.get_state())
    try:
        results = _run(attack, observations, budget, gen, problems, starts, strategies, setups, states)
    finally:
        np.random.set_state(caller_state)
    return records(observations, problems, results, label_sources, (time.perf_counter() - start) / len(observations))


def _run(attack: GGL, observations: Sequence[Observation], budget: Budget, gen: Generator,
         problems: Sequence[Problem], starts: list[Tensor], strategies: list, setups: list,
         states: list[Any]) -> list[RestartResult]:
    index = [k for k, _, _ in problems]
    model, _names, params, buffers, _target = stack_problems(observations, index)
    labels_all = torch.stack([lab for _, lab, _ in problems])
    n = starts[0].shape[0]
    update, _own, _own_buffers = parametrised_update_fn(model, attack.protocol_for(observations[0]))
    per_problem = vmap(vmap(update, in_dims=(None, None, 0, None)), in_dims=(0, 0, 0, 0))
    total, pop = len(problems), attack.population
    shape = (n, gen.config.latent_dim)
    active = [True] * total
    plateaus = [Plateau(budget.patience, budget.min_delta) for _ in range(total)]
    losses: list[list[float]] = [[] for _ in range(total)]
    best = [math.inf] * total
    best_z = [z0.clone() for z0 in starts]
    stopped = [False] * total
    for _ in range(budget.iterations):
        live = [p for p in range(total) if active[p]]
        if not live:
            break
        asked = {}
        for p in live:
            np.random.set_state(states[p])
            asked[p] = strategies[p].ask()
            states[p] = np.random.get_state()
        z = torch.from_numpy(np.asarray([asked[p] for p in live], dtype=np.float32)).reshape(len(live), pop, *shape)
        zm = to_model(z, gen)
        with torch.no_grad():
            x = gen(zm.reshape(-1, shape[-1])).reshape(len(live), pop, n, *observations[0].data_spec.shape)
            sel = torch.tensor(live, device=labels_all.device)
            trials = per_problem({nm: t.index_select(0, sel) for nm, t in params.items()},
                                 {nm: t.index_select(0, sel) for nm, t in buffers.items()}, x,
                                 labels_all.index_select(0, sel))
        for j, p in enumerate(live):
            replay, target, scale = setups[problems[p][0]]
            with torch.no_grad():
                dist = vmap(lambda *t, r=replay, tg=target, sc=scale: GGL._distance(r(t), tg, sc))(
                    *(t[j] for t in trials))
                values = dist + attack.kl_weight * kl_to_standard_normal(zm[j])
            np.random.set_state(states[p])
            strategies[p].tell(asked[p], values.double().tolist())
            states[p] = np.random.get_state()
            i = int(values.argmin())
            if float(values[i]) < best[p]:
                best[p], best_z[p] = float(values[i]), z[j, i].clone()
            losses[p].append(best[p])
            plateaus[p].update(best[p])
            if plateaus[p].stalled or strategies[p].stop():
                active[p], stopped[p] = False, True
    results = []
    for p, (k, labels, _seed) in enumerate(problems):
        with torch.no_grad():
            images = gen(to_model(best_z[p].reshape(shape), gen))
        results.append(RestartResult(images, labels, losses[p], best[p], stopped[p],
                                     {"optimizer": "cma", "adapted": list(setups[k][0].names),
                                      **attack.prior.describe(), "evaluations": len(losses[p]) * pop,
                                      "population": pop}))
    return results


__all__ = ["solve"]
