"""What every stacked solver shares (`giaudit.attacks.batched`, `stacked_gias`, `stacked_ggl`): the problems of
K observations drawn as `Attack.reconstruct` draws them, their own parameters, buffers and observed updates
stacked in problem order, and each observation's reconstruction assembled from its problems' results as
`reconstruct` assembles it. No ground truth is read here; the threat check is each observation's own.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from giaudit.attacks.base import Attack, Budget
from giaudit.attacks.restarts import RestartResult
from giaudit.threat import check
from giaudit.types import Observation, Reconstruction, Trace

# Torch's Adam defaults, which the unbatched loops use.
BETAS, EPS = (0.9, 0.999), 1e-8

Problem = tuple[int, Tensor, int]  # (observation index, labels, restart seed)


def draw_problems(attack: Attack, observations: Sequence[Observation], budget: Budget,
              rngs: Sequence[torch.Generator | None]) -> tuple[list[Problem], list[str]]:
    """Every observation's restarts as problems, with labels and seeds drawn as `Attack.reconstruct` draws them,
    and where each observation's labels came from."""
    problems: list[Problem] = []
    label_sources: list[str] = []
    for k, (obs, rng) in enumerate(zip(observations, rngs)):
        check(attack.name, attack.requires, obs.threat)
        gen = rng if rng is not None else torch.Generator().manual_seed(0)
        labels, source = attack.labels_for(obs, gen)
        label_sources.append(source)
        seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=gen, device=gen.device)]
        problems.extend((k, labels, s) for s in seeds)
    return problems, label_sources


def stack_problems(observations: Sequence[Observation], index: Sequence[int]
                    ) -> tuple[nn.Module, list[str], dict[str, Tensor], dict[str, Tensor], tuple[Tensor, ...]]:
    """The architecture (a copy of the first model), its parameter names, and every problem's own parameters,
    buffers and observed update, stacked in problem order (`index`: each problem's observation)."""
    model = copy.deepcopy(observations[0].model)
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    own_params = [dict(obs.model.named_parameters()) for obs in observations]
    own_buffers = [dict(obs.model.named_buffers()) for obs in observations]
    with torch.no_grad():
        params = {n: torch.stack([own_params[k][n].detach() for k in index]) for n in names}
        buffers = {n: torch.stack([own_buffers[k][n] for k in index]) for n in buffer_names}
        target = tuple(torch.stack([observations[k].update.tensors[i].detach() for k in index])
                       for i in range(len(names)))
    return model, names, params, buffers, target


def records(observations: Sequence[Observation], problems: Sequence[Problem], results: Sequence[RestartResult],
             label_sources: Sequence[str], wall: float) -> list[Reconstruction]:
    """Each observation's reconstruction from its problems' results, as `Attack.reconstruct` assembles it:
    the restart with the lowest final loss (NaN last), each observation timed at its share of the solve."""
    per_obs: list[list[RestartResult]] = [[] for _ in observations]
    for (k, _lab, _seed), r in zip(problems, results):
        per_obs[k].append(r)
    out = []
    for k, obs in enumerate(observations):
        finals = [r.final_loss for r in per_obs[k]]
        best = min(range(len(finals)), key=lambda i: (math.isnan(finals[i]), finals[i]))
        r = per_obs[k][best]
        trace = Trace(losses=tuple(r.losses), restart_losses=tuple(finals), best_restart=best,
                      iterations=len(r.losses), wall_s=wall, stopped_early=r.stopped_early,
                      extra={"workers": 1, "stacked": len(problems), **r.extra})
        lo_k, hi_k = obs.data_spec.value_range
        source = r.extra.get("label_source", label_sources[k])
        out.append(Reconstruction(r.images.detach().clamp(lo_k, hi_k), r.labels.detach(), source, trace))
    return out
