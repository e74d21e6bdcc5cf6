"""Many Inverting Gradients reconstructions solved as one: K independent problems stacked in one computation.

Inverting Gradients (Geiping et al., NeurIPS 2020; threat class B, as `giaudit.attacks.ig`) on K observations
that share a model architecture and the attack's options (the seeds of a sweep, the clients of a round, the
restarts of each) is K independent optimisations whose arithmetic is the same. On a CPU a small model's
iteration is dominated by per-operation overhead, not by arithmetic, so stacking the K problems and running
each operation once for all of them is several times faster per problem-iteration (`benchmarks/batched_ig.py`).

How the problems stay independent: each problem's objective (the trial update of its own candidate images
through its own model parameters, its cosine distance to its own observed update, plus total variation) is
written for one problem and mapped over the stack with `torch.func.vmap`; the matching gradient of problem k
is the gradient of problem k's objective alone (nothing is summed across the stack). Adam is elementwise, so
the stacked optimiser is K optimisers; the paper's step schedule (x0.1 at 3/8, 5/8 and 7/8 of the budget)
drops every problem's rate at the same iterations; a plateau stop (`Budget.patience`) freezes that problem
alone (its images, its optimiser state and its loss history stop). Each problem keeps its own best iterate
by its own matching loss; restarts are further problems in the stack and each observation keeps its restart
with the lowest matching loss, as `reconstruct` does. Labels and starts are drawn exactly as `reconstruct`
draws them (the same generator sequence), so problem k starts where its unbatched run starts.

Tolerance: the stacked kernels round differently from the unbatched ones (last-bit differences in a batched
matrix product), and a signed-gradient descent can turn those into different late trajectories. The stacked
run equals the unbatched one to 1e-4 in the images after tens of iterations, and over full runs to the
reconstruction quality (mean |ΔPSNR| well under 0.5 dB; tests and the benchmark state both).

What is batched (`why_not_batched` says why anything else is not): IG with the "steps" or "constant"
schedule, FedSGD gradients (no FedAvg unrolling), no BatchNorm prior, no adaptive replay, no successive
halving, and models with no BatchNorm layer (its running statistics would move in place) or dropout in
training mode.
Everything else runs through `Attack.reconstruct`, unbatched, with the same result as before.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from giaudit.attacks._common.distances import DISTANCES, total_variation
from giaudit.attacks.base import Attack, Budget, Plateau
from giaudit.attacks.ig import InvertingGradients
from giaudit.attacks.restarts import RestartResult, generator_for
from giaudit.fl import classification_loss
from giaudit.threat import check
from giaudit.types import Observation, Reconstruction, Trace

# Torch's Adam defaults, which IG's unbatched loop uses.
_BETAS, _EPS = (0.9, 0.999), 1e-8


def stacks(attack_class: type) -> bool:
    """The attack class whose runs can be stacked: Inverting Gradients itself (not its subclasses, which change
    the update they match)."""
    return attack_class is InvertingGradients


def why_not_batched(attack: object, obs: Observation, budget: Budget) -> str | None:
    """None when `attack` on `obs` within `budget` can join a stacked solve; else why not, in words."""
    if not stacks(type(attack)) or not isinstance(attack, InvertingGradients):
        return f"{getattr(attack, 'name', type(attack).__name__)} is not batched (only ig is)"
    if attack.schedule not in ("steps", "constant"):
        return f"schedule {attack.schedule!r} (batched: steps, constant)"
    if attack.bn_weight > 0 or attack.adaptive:
        return "the BatchNorm prior or adaptive replay"
    if budget.halving is not None and budget.restarts > 1:
        return "successive halving"
    if obs.update.kind != "gradient":
        return "a FedAvg update (local steps are unrolled one problem at a time)"
    if obs.model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in obs.model.modules()):
        return "BatchNorm in training mode (its running statistics move in place)"
    if obs.model.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                                  for m in obs.model.modules()):
        return "dropout in training mode (random masks drawn per problem)"
    return None


def _signature(obs: Observation) -> tuple:
    """What problems must share to be stacked: architecture (parameter and buffer names and shapes), batch."""
    model = obs.model
    return (type(model).__qualname__, tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in model.named_buffers()), obs.batch_size, obs.data_spec.shape,
            obs.data_spec.value_range, next(model.parameters()).device)


def reconstruct_many(attack: Attack, observations: Sequence[Observation], *,
                     budget: Budget = Budget(), rngs: Sequence[torch.Generator | None] | None = None,
                     max_stack: int | None = None) -> list[Reconstruction]:
    """`attack.reconstruct(obs, budget=budget, rng=rng)` for every observation, the batchable ones stacked
    (groups of the same architecture, at most `max_stack` problems each, restarts included)."""
    rngs = list(rngs) if rngs is not None else [None] * len(observations)
    if len(rngs) != len(observations):
        raise ValueError(f"{len(observations)} observations but {len(rngs)} generators")
    out: list[Reconstruction | None] = [None] * len(observations)
    groups: dict[tuple, list[int]] = {}
    for i, obs in enumerate(observations):
        if why_not_batched(attack, obs, budget) is None:
            groups.setdefault(_signature(obs), []).append(i)
        else:
            out[i] = attack.reconstruct(obs, budget=budget, rng=rngs[i])
    per = max(1, (max_stack or 1 << 30) // max(1, budget.restarts))
    for members in groups.values():
        for j in range(0, len(members), per):
            chunk = members[j:j + per]
            for i, rec in zip(chunk, _solve(cast(InvertingGradients, attack), [observations[i] for i in chunk], budget,
                                            [rngs[i] for i in chunk])):
                out[i] = rec
    return [r for r in out if r is not None]


def _solve(attack: InvertingGradients, observations: Sequence[Observation], budget: Budget,
           rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked solve of `observations` (same signature), `budget.restarts` problems each."""
    for obs in observations:
        check(attack.name, attack.requires, obs.threat)
    start = time.perf_counter()
    model = copy.deepcopy(observations[0].model)  # the architecture; every problem brings its own parameters
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    problems: list[tuple[int, Tensor, Tensor]] = []  # (observation index, labels, start images)
    label_sources: list[str] = []
    for k, (obs, rng) in enumerate(zip(observations, rngs)):
        gen = rng if rng is not None else torch.Generator().manual_seed(0)
        labels, source = attack.labels_for(obs, gen)
        label_sources.append(source)
        seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=gen, device=gen.device)]
        n = obs.batch_size or labels.numel()
        for s in seeds:
            problems.append((k, labels, attack.initial_images(obs, n, generator_for(s)).detach()))
    index = [k for k, _, _ in problems]
    own_params = [dict(obs.model.named_parameters()) for obs in observations]
    own_buffers = [dict(obs.model.named_buffers()) for obs in observations]
    with torch.no_grad():
        params = {n: torch.stack([own_params[k][n].detach() for k in index]) for n in names}
        buffers = {n: torch.stack([own_buffers[k][n] for k in index]) for n in buffer_names}
        target = tuple(torch.stack([observations[k].update.tensors[i].detach() for k in index])
                       for i in range(len(names)))
    labels = torch.stack([lab for _, lab, _ in problems])
    x = torch.stack([img for _, _, img in problems])
    distance = DISTANCES[attack.distance]
    tv_weight = attack.tv_weight

    def objective(xk: Tensor, pk: dict[str, Tensor], bk: dict[str, Tensor], tk: tuple[Tensor, ...],
                  yk: Tensor) -> tuple[Tensor, Tensor]:
        def client_loss(p: dict[str, Tensor]) -> Tensor:
            return classification_loss(functional_call(model, {**p, **bk}, (xk,)), yk)

        trial_dict = grad(client_loss)(pk)
        match = distance(tuple(trial_dict[n] for n in names), tk)
        loss = match + tv_weight * total_variation(xk) if tv_weight else match
        return loss, match

    step_fn = vmap(grad(objective, has_aux=True))
    lo, hi = observations[0].data_spec.value_range
    iters = budget.iterations
    milestones = {int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)} if attack.schedule == "steps" else set()
    total = len(problems)
    m_state, v_state = torch.zeros_like(x), torch.zeros_like(x)
    steps = torch.zeros(total, dtype=x.dtype, device=x.device)
    lr = attack.lr
    active = [True] * total
    plateaus = [Plateau(budget.patience, budget.min_delta) for _ in range(total)]
    losses: list[list[float]] = [[] for _ in range(total)]
    best_loss = [math.inf] * total
    best_x = x.clone()
    stopped = [False] * total
    shape = (total,) + (1,) * (x.ndim - 1)
    for it in range(iters):
        if not any(active):
            break
        g, match = step_fn(x, params, buffers, target, labels)
        values = match.detach().tolist()
        mask = torch.tensor(active, device=x.device).reshape(shape)
        with torch.no_grad():
            for k in range(total):
                if active[k]:
                    if values[k] < best_loss[k]:
                        best_loss[k] = values[k]
                        best_x[k] = x[k]
                    losses[k].append(values[k])
            # Adam on the signed gradient, one optimiser per problem (elementwise: stacking changes nothing).
            s = g.sign()
            steps += mask.reshape(-1).to(steps.dtype)
            m_new = _BETAS[0] * m_state + (1 - _BETAS[0]) * s
            v_new = _BETAS[1] * v_state + (1 - _BETAS[1]) * s * s
            t = steps.clamp_min(1).reshape(shape)
            c1, c2 = 1 - _BETAS[0] ** t, 1 - _BETAS[1] ** t
            x_new = (x - (lr / c1) * m_new / (v_new.sqrt() / c2.sqrt() + _EPS)).clamp(lo, hi)
            x = torch.where(mask, x_new, x)
            m_state = torch.where(mask, m_new, m_state)
            v_state = torch.where(mask, v_new, v_state)
        for k in range(total):
            if not active[k]:
                continue
            plateaus[k].update(values[k])
            if it + 1 in milestones:
                continue
            if plateaus[k].stalled:
                active[k], stopped[k] = False, True
        if it + 1 in milestones:
            lr *= 0.1
    wall = (time.perf_counter() - start) / len(observations)  # each observation's share of the stacked solve
    results: list[list[tuple[int, RestartResult]]] = [[] for _ in observations]
    for p, (k, lab, _img) in enumerate(problems):
        results[k].append((p, RestartResult(best_x[p].clone(), lab, losses[p], best_loss[p], stopped[p])))
    out = []
    for k, obs in enumerate(observations):
        finals = [r.final_loss for _, r in results[k]]
        best = min(range(len(finals)), key=lambda i: (math.isnan(finals[i]), finals[i]))
        r = results[k][best][1]
        trace = Trace(losses=tuple(r.losses), restart_losses=tuple(finals), best_restart=best,
                      iterations=len(r.losses), wall_s=wall, stopped_early=r.stopped_early,
                      extra={"workers": 1, "stacked": total})
        lo_k, hi_k = obs.data_spec.value_range
        out.append(Reconstruction(r.images.detach().clamp(lo_k, hi_k), r.labels.detach(), label_sources[k], trace))
    return out


__all__ = ["reconstruct_many", "stacks", "why_not_batched"]
