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

Stacked: the "cma" optimizer. "bo" (Optuna's sequential trials) and "adam" run unbatched.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from giaudit.attacks.base import Budget, Plateau
from giaudit.attacks.ggl import GGL, kl_to_standard_normal
from giaudit.attacks.restarts import RestartResult, generator_for
from giaudit.device import to_model
from giaudit.fl import classification_loss, local_batches
from giaudit.priors.generator import Generator
from giaudit.replay import IDENTITY, replay_for
from giaudit.threat import check
from giaudit.types import ClientProtocol, Observation, Reconstruction, Trace


def why_not_stacked(attack: GGL, obs: Observation) -> str | None:
    """None when GGL on `obs` can join a stacked solve; else why not, in words."""
    if attack.optimizer != "cma":
        return f"optimizer {attack.optimizer!r} (stacked: cma)"
    if obs.model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in obs.model.modules()):
        return "BatchNorm in training mode"
    return None


def _update_fn(model: nn.Module, protocol: ClientProtocol) -> Callable[..., tuple[Tensor, ...]]:
    """(params, x, y) -> the client's update for batch x through `params`: `ggl.functional_update_fn` with the
    parameters an argument, so problems with different parameters can be mapped over."""
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return classification_loss(functional_call(model, (p, buffers), (x,)), y)

    g = grad(loss)

    def update(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        if protocol.name == "fedsgd":
            out = g(params, x, y)
            return tuple(out[n] for n in names)
        current = dict(params)
        for sl in local_batches(protocol, x.shape[0]):
            step = g(current, x[sl], y[sl])
            current = {n: current[n] - protocol.local_lr * step[n] for n in names}
        return tuple(current[n] - params[n] for n in names)

    return update


def solve(attack: GGL, observations: Sequence[Observation], budget: Budget,
          rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked CMA-ES solve of `observations` (one architecture, one protocol), `budget.restarts` problems
    each; the reconstructions `attack.reconstruct` would return, to the module's tolerance."""
    import cma

    for obs in observations:
        check(attack.name, attack.requires, obs.threat)
    start = time.perf_counter()
    gen = attack.generator_for(observations[0])
    # Per problem, drawn as `reconstruct` and `run_restart` draw them: labels, restart seeds, z0, the CMA seed.
    problems: list[tuple[int, Tensor, Tensor, cma.CMAEvolutionStrategy]] = []
    label_sources: list[str] = []
    setups = []
    # cma draws its samples from numpy's global generator, which its `seed` option seeds: each problem's
    # strategy gets its own generator state back around every ask and tell, so that interleaving the problems
    # draws what each would have drawn alone.
    caller_state = np.random.get_state()
    states: list[Any] = []  # numpy generator states
    for k, (obs, rng) in enumerate(zip(observations, rngs)):
        g0 = rng if rng is not None else torch.Generator().manual_seed(0)
        labels, source = attack.labels_for(obs, g0)
        label_sources.append(source)
        target = [t.detach() for t in obs.update.tensors]
        scale = torch.as_tensor(sum((t * t).sum() for t in target) / len(target), device=target[0].device)
        setups.append((replay_for(obs) if attack.adaptive else IDENTITY, target, scale.clamp_min(1e-20)))
        seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=g0, device=g0.device)]
        for s in seeds:
            g = generator_for(s)
            b = obs.batch_size or labels.numel()
            z0 = torch.randn((b, gen.config.latent_dim), generator=g, device=g.device)
            cma_seed = int(torch.randint(1, 2**31 - 1, (1,), generator=g, device=g.device))
            es = cma.CMAEvolutionStrategy(z0.reshape(-1).double().numpy(), attack.sigma0,
                                          {"popsize": attack.population, "seed": cma_seed, "verbose": -9,
                                           "maxiter": budget.iterations, "tolfun": 0, "tolx": 0,
                                           "tolfunhist": 0, "tolstagnation": budget.iterations + 1})
            problems.append((k, labels, z0, es))
            states.append(np.random.get_state())
    try:
        return _run(attack, observations, budget, gen, problems, label_sources, setups, states, start)
    finally:
        np.random.set_state(caller_state)


def _run(attack: GGL, observations: Sequence[Observation], budget: Budget, gen: Generator, problems: list,
         label_sources: list[str], setups: list, states: list[Any], start: float) -> list[Reconstruction]:
    model = observations[0].model
    protocol = attack.protocol_for(observations[0])
    names = [n for n, _ in model.named_parameters()]
    index = [k for k, _, _, _ in problems]
    with torch.no_grad():
        own = [dict(obs.model.named_parameters()) for obs in observations]
        params = {nm: torch.stack([own[k][nm].detach() for k in index]) for nm in names}
    labels_all = torch.stack([lab for _, lab, _, _ in problems])
    n = problems[0][2].shape[0]
    update = _update_fn(model, protocol)
    per_problem = vmap(vmap(update, in_dims=(None, 0, None)), in_dims=(0, 0, 0))
    total, pop = len(problems), attack.population
    shape = (n, gen.config.latent_dim)
    active = [True] * total
    plateaus = [Plateau(budget.patience, budget.min_delta) for _ in range(total)]
    losses: list[list[float]] = [[] for _ in range(total)]
    best = [math.inf] * total
    best_z = [z0.clone() for _, _, z0, _ in problems]
    stopped = [False] * total
    for _ in range(budget.iterations):
        live = [p for p in range(total) if active[p]]
        if not live:
            break
        asked = {}
        for p in live:
            np.random.set_state(states[p])
            asked[p] = problems[p][3].ask()
            states[p] = np.random.get_state()
        z = torch.from_numpy(np.asarray([asked[p] for p in live], dtype=np.float32)).reshape(len(live), pop, *shape)
        zm = to_model(z, gen)
        with torch.no_grad():
            x = gen(zm.reshape(-1, shape[-1])).reshape(len(live), pop, n, *observations[0].data_spec.shape)
            sel = torch.tensor(live, device=labels_all.device)
            trials = per_problem({nm: t.index_select(0, sel) for nm, t in params.items()}, x,
                                 labels_all.index_select(0, sel))
        for j, p in enumerate(live):
            replay, target, scale = setups[problems[p][0]]
            with torch.no_grad():
                dist = vmap(lambda *t, r=replay, tg=target, sc=scale: GGL._distance(r(t), tg, sc))(
                    *(t[j] for t in trials))
                values = dist + attack.kl_weight * kl_to_standard_normal(zm[j])
            es = problems[p][3]
            np.random.set_state(states[p])
            es.tell(asked[p], values.double().tolist())
            states[p] = np.random.get_state()
            i = int(values.argmin())
            if float(values[i]) < best[p]:
                best[p], best_z[p] = float(values[i]), z[j, i].clone()
            losses[p].append(best[p])
            plateaus[p].update(best[p])
            if plateaus[p].stalled or es.stop():
                active[p], stopped[p] = False, True
    wall = (time.perf_counter() - start) / len(observations)
    out = []
    for k, obs in enumerate(observations):
        mine = [p for p in range(total) if index[p] == k]
        finals = [best[p] for p in mine]
        keep = min(range(len(mine)), key=lambda i: (math.isnan(finals[i]), finals[i]))
        p = mine[keep]
        with torch.no_grad():
            images = gen(to_model(best_z[p].reshape(shape), gen))
        replay = setups[k][0]
        r = RestartResult(images, problems[p][1], losses[p], best[p], stopped[p],
                          {"optimizer": "cma", "adapted": list(replay.names), **attack.prior.describe(),
                           "evaluations": len(losses[p]) * pop, "population": pop})
        trace = Trace(losses=tuple(r.losses), restart_losses=tuple(finals), best_restart=keep,
                      iterations=len(r.losses), wall_s=wall, stopped_early=r.stopped_early,
                      extra={"workers": 1, "stacked": total, **r.extra})
        lo, hi = obs.data_spec.value_range
        out.append(Reconstruction(r.images.detach().clamp(lo, hi), r.labels.detach(), label_sources[k], trace))
    return out


__all__ = ["solve", "why_not_stacked"]
