"""Many reconstructions solved as one: K independent Inverting Gradients, DLG, GIAS or GGL problems stacked in one
computation.

Inverting Gradients (Geiping et al., NeurIPS 2020; threat class B, as `giaudit.attacks.ig`) and DLG / iDLG
(Zhu et al., NeurIPS 2019; Zhao et al. 2020; as `giaudit.attacks.dlg`) on K observations that share a model
architecture and the attack's options (the seeds of a sweep, the clients of a round, the restarts of each)
are K independent optimisations whose arithmetic is the same. On a CPU a small model's iteration is dominated
by per-operation overhead, not by arithmetic, so stacking the K problems and running each operation once for
all of them is several times faster per problem-iteration (`benchmarks/batched_ig.py`,
`benchmarks/batched_dlg.py`).

How the problems stay independent: each problem's objective (the trial update of its own candidate images
through its own model parameters, its distance to its own observed update) is that problem's alone. For IG
and DLG the K models run as one stacked forward of block-diagonal operations (`stacked_forward`: each
convolution one unfold and one batched matrix product with each problem's own kernel), differentiated by
plain autograd: problem k's slice of every operation reads only problem k's inputs and parameters, so the
gradient of the sum of the K objectives with respect to problem k's images is that of problem k's objective
alone, and the distances reduce each problem's own entries (`stacked=True`). A model the rewrite does not
cover (and GIAS's and GGL's objectives) is written for one problem and mapped over the stack with
`torch.func.vmap` instead, which pays functorch's dispatch on every operation (LeNet, 16 px, K = 8, 1 thread:
the stacked forward is 2-3x faster per iteration than vmap, `benchmarks/batched_ig.py`). Labels and starts
are drawn exactly as `reconstruct` draws them (the same generator sequence), so problem k starts where its
unbatched run starts. Restarts are further problems in the stack and each observation keeps its restart
with the lowest matching loss, as `reconstruct` does.

Inverting Gradients: the cosine distance plus total variation. Adam is elementwise, so the stacked optimiser
is K optimisers; the paper's step schedule (x0.1 at 3/8, 5/8 and 7/8 of the budget) drops every problem's
rate at the same iterations; a plateau stop (`Budget.patience`) freezes that problem alone (its images, its
optimiser state and its loss history stop). Each problem keeps its own best iterate by its own matching loss.

DLG: L-BFGS keeps a curvature history and takes one line-searched step length per problem, so one optimiser
over the stack would mix the problems. The problems instead run torch's L-BFGS with the strong-Wolfe line
search each for itself, written for K problems at once (`giaudit.attacks._common.lbfgs`: every problem's own
history, step lengths, line-search state and stopping tests, the same decisions as `torch.optim.LBFGS`; the
vector work of a round done for all problems together): in each round every unfinished problem asks for one
point, and the squared L2 distance of every asked point and its gradient (images, and label logits when
optimised) is computed in one stacked call. Each problem keeps its steps, its best iterate and its plateau
stop as `DLG.solve` keeps them (`giaudit.attacks.dlg.Steps`).

Tolerance: the stacked kernels round differently from the unbatched ones (last-bit differences in a batched
matrix product). For Inverting Gradients a signed-gradient descent can turn those into different late
trajectories: the stacked run equals the unbatched one to 1e-4 in the images after tens of iterations, and
over full runs to the reconstruction quality (mean |ΔPSNR| well under 0.5 dB; tests and
`benchmarks/batched_ig.py` state both). For DLG the line search and the curvature history amplify any
last-bit difference, in the unbatched run itself as much: over its first L-BFGS steps the stacked run equals
the unbatched one to 1e-3 in the images and the losses (tests), but over a full run a problem may take
another trajectory, so single records differ by up to several dB and 5 iterations on 32 digits give a mean
|ΔPSNR| of about 1 dB; moving the unbatched run's image gradient by one float step at every evaluation
changes its records by as much (`benchmarks/batched_dlg.py --reference`). Stacked DLG agrees with unbatched
DLG in distribution (the mean PSNR over problems, within the spread of that reference), not record by record.
One problem's results do not depend on the others in its stack, to the bit: on the CPU a problem's slice of
a stacked call is the same whichever others share it, except in a stack of one, so a problem left alone is
evaluated in a pair with itself.

What is batched (`why_not_batched` says why anything else is not): IG with the "steps" or "constant"
schedule and no BatchNorm prior; DLG with recovered or optimised labels; GIAS (`giaudit.attacks.stacked_gias`)
without a plateau stop; GGL with CMA-ES (`giaudit.attacks.stacked_ggl`), FedAvg updates included; for IG, DLG
and GIAS FedSGD gradients (no FedAvg unrolling) and no adaptive replay; for all, no successive halving and
models with no BatchNorm layer in training mode (its running statistics would move in place) or dropout in
training mode. Problems are stacked only with problems of the same architecture, batch, data shape, device and
client protocol.
Everything else runs through `Attack.reconstruct`, unbatched, with the same result as before.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from giaudit.attacks import stacked_ggl, stacked_gias
from giaudit.attacks._common import lbfgs
from giaudit.attacks._common.distances import DISTANCES, l2_distance, total_variation
from giaudit.attacks._common.stacked_model import stacked_forward
from giaudit.attacks._common.stacking import BETAS, EPS, draw_problems, records, stack_problems
from giaudit.attacks.base import Attack, Budget, Plateau
from giaudit.attacks.dlg import DLG, Steps
from giaudit.attacks.ggl import GGL
from giaudit.attacks.gias import GIAS
from giaudit.attacks.ig import InvertingGradients
from giaudit.attacks.restarts import RestartResult, generator_for
from giaudit.fl import classification_loss, classification_losses
from giaudit.types import Observation, Reconstruction


def _ig_dlg_options(attack: Attack, budget: Budget) -> str | None:
    if isinstance(attack, InvertingGradients):
        if attack.schedule not in ("steps", "constant"):
            return f"schedule {attack.schedule!r} (batched: steps, constant)"
        if attack.bn_weight > 0:
            return "the BatchNorm prior"
    return None


def _gias_options(attack: Attack, budget: Budget) -> str | None:
    if budget.patience is not None:
        return "a plateau stop (it hands each latent search over at its own iteration)"
    return None


def _gias_bytes(attack: Attack, one: int, batch: int) -> int:
    """GIAS's parameter search: per image a copy of the generator, its gradient and Adam's two moments."""
    gias = cast(GIAS, attack)
    return one + (0 if gias.mode == "z" else 16 * batch * sum(p.numel() for p in gias.prior.generator.parameters()))


def _ggl_options(attack: Attack, budget: Budget) -> str | None:
    optimizer = cast(GGL, attack).optimizer
    return None if optimizer == "cma" else f"optimizer {optimizer!r} (stacked: cma)"


Solve = Callable[[Attack, Sequence[Observation], Budget, Sequence[torch.Generator | None]], list[Reconstruction]]


@dataclass(frozen=True)
class _Stacking:
    """How one attack class is stacked: what its options must be (`options`: None or why not), its solver,
    whether FedAvg updates and adaptive replay stack (GGL's stacked update function unrolls the client's local
    steps and replays each problem's disclosed defenses), and one problem's bytes from IG's (`problem_bytes`)."""

    options: Callable[[Attack, Budget], str | None]
    solve: Solve
    fedavg: bool = False
    adaptive: bool = False
    memory: Callable[[Attack, int, int], int] = lambda _attack, one, _batch: one  # (attack, IG's bytes, batch)


def problem_bytes(attack: Attack, model: nn.Module, shape: tuple[int, ...], batch: int) -> int:
    """An estimate of what one problem of a stacked solve of `attack` holds for `model` and a batch of `batch`
    images of `shape`: float32 parameters four times (its own copy, its observed update, the trial update and
    its gradient) and eight times the activations of one forward of its batch (measured by one forward pass):
    what the forward, the first backward's graph and the second backward keep, calibrated on IG through ConvNet
    at 32 px mapped with vmap (158 MB per problem measured at K = 8, 159 MB estimated); plus twice each
    convolution's unfolded input, which the stacked forward (`stacked_forward`) keeps and differentiates. GGL
    evaluates its whole population at once (that many times); GIAS's parameter search adds a copy of the
    generator per image with its gradient and Adam's two moments."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() if torch.is_tensor(out) else 0))
             for m in model.modules() if not list(m.children())]
    # The stacked forward (`stacked_forward`) unfolds each convolution's input: its columns (kh kw times the
    # input per output position) are kept for the backward and have a gradient of their size.
    hooks += [m.register_forward_hook(lambda m, i, out: sizes.append(
        2 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * out.shape[0] * out.shape[-2] * out.shape[-1]))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros((batch, *shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    one = 4 * (4 * params + 8 * sum(sizes))
    return _STACKED[type(attack)].memory(attack, one, batch) if stacks(type(attack)) else one


def stacks(attack_class: type) -> bool:
    """The attack class whose runs can be stacked: Inverting Gradients, DLG, GIAS or GGL itself (not a
    subclass)."""
    return attack_class in _STACKED


def why_not_stacked(attack: object, budget: Budget) -> str | None:
    """The part of `why_not_batched` that the attack's options and budget decide, before any observation: None
    when they allow a stacked solve; else why not, in words."""
    if not stacks(type(attack)) or not isinstance(attack, Attack):
        return (f"{getattr(attack, 'name', type(attack).__name__)} is not batched "
                f"(only {', '.join(sorted(getattr(c, 'name', c.__name__) for c in _STACKED))} are)")
    if budget.halving is not None and budget.restarts > 1:
        return "successive halving"
    if attack.adaptive and not _STACKED[type(attack)].adaptive:
        return "adaptive replay (the replayed defense runs per problem)"
    return _STACKED[type(attack)].options(attack, budget)


def why_not_batched(attack: object, obs: Observation, budget: Budget) -> str | None:
    """None when `attack` on `obs` within `budget` can join a stacked solve; else why not, in words."""
    reason = why_not_stacked(attack, budget)
    if reason is not None:
        return reason
    if obs.update.kind != "gradient" and not _STACKED[type(attack)].fedavg:
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
            obs.data_spec.value_range, next(model.parameters()).device, obs.update.kind, obs.protocol)


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
    solve = _STACKED[type(attack)].solve
    for members in groups.values():
        for j in range(0, len(members), per):
            chunk = members[j:j + per]
            for i, rec in zip(chunk, solve(attack, [observations[i] for i in chunk], budget,
                                           [rngs[i] for i in chunk])):
                out[i] = rec
    return [r for r in out if r is not None]


# -- Inverting Gradients ---------------------------------------------------------------------------------------
# Each problem's trial update at its own images (K, B, ...) and labels through its own parameters (leaves that
# require grad) and buffers, differentiable in the images and labels: a stacked-model forward.
Trial = Callable[[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, ...]]


def _trial_updates(model: nn.Module, names: Sequence[str], sample: tuple[int, ...]) -> Trial | None:
    """The FedSGD trial update of every problem in one stacked forward and backward (`stacked_forward`:
    block-diagonal operations, so problem k's update is the gradient of problem k's loss alone), or None when
    the model is not rewritten (the caller maps its objective with vmap instead)."""
    forward = stacked_forward(model, sample)
    if forward is None:
        return None

    def trial(x: Tensor, y: Tensor, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> tuple[Tensor, ...]:
        loss = classification_losses(forward(x, params, buffers), y).mean(-1).sum()
        return tuple(torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                         materialize_grads=True))

    return trial


def _leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: v.detach().requires_grad_(True) for n, v in params.items()}


def _solve(attack: Attack, observations: Sequence[Observation], budget: Budget,
           rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked IG solve of `observations` (same signature), `budget.restarts` problems each."""
    attack = cast(InvertingGradients, attack)
    start = time.perf_counter()
    problems, label_sources = draw_problems(attack, observations, budget, rngs)
    index = [k for k, _, _ in problems]
    model, names, params, buffers, target = stack_problems(observations, index)
    labels = torch.stack([lab for _, lab, _ in problems])
    x = torch.stack([attack.initial_images(observations[k], observations[k].batch_size or lab.numel(),
                                           generator_for(s)).detach() for k, lab, s in problems])
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

    step_fn: Callable[..., tuple[Tensor, Tensor]] = vmap(grad(objective, has_aux=True))
    trial = _trial_updates(model, names, tuple(x.shape[1:]))
    if trial is not None:
        leaves = _leaves(params)

        def stacked_step(x: Tensor, _p: dict, b: dict, t: tuple[Tensor, ...], y: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                match = distance(trial(xg, y, leaves, b), t, stacked=True)
                loss = match + tv_weight * total_variation(xg, stacked=True) if tv_weight else match
                return torch.autograd.grad(loss.sum(), xg)[0], match.detach()

        step_fn = stacked_step
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
            m_new = BETAS[0] * m_state + (1 - BETAS[0]) * s
            v_new = BETAS[1] * v_state + (1 - BETAS[1]) * s * s
            t = steps.clamp_min(1).reshape(shape)
            c1, c2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
            x_new = (x - (lr / c1) * m_new / (v_new.sqrt() / c2.sqrt() + EPS)).clamp(lo, hi)
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
    results = [RestartResult(best_x[p].clone(), lab, losses[p], best_loss[p], stopped[p])
               for p, (_k, lab, _s) in enumerate(problems)]
    return records(observations, problems, results, label_sources,
                    (time.perf_counter() - start) / len(observations))


# -- DLG -------------------------------------------------------------------------------------------------------
def _solve_dlg(attack: Attack, observations: Sequence[Observation], budget: Budget,
               rngs: Sequence[torch.Generator | None]) -> list[Reconstruction]:
    """One stacked DLG solve of `observations` (same signature), `budget.restarts` problems each: each problem's
    start, steps and best iterate as `DLG.solve` keeps them, its L-BFGS steps those of torch's optimiser taken
    for all problems at once (`giaudit.attacks._common.lbfgs`), every objective evaluated in stacked rounds."""
    attack = cast(DLG, attack)
    start = time.perf_counter()
    problems, label_sources = draw_problems(attack, observations, budget, rngs)
    index = [k for k, _, _ in problems]
    model, names, params, buffers, target = stack_problems(observations, index)
    labels = torch.stack([lab for _, lab, _ in problems])
    optimise = attack.optimise_labels

    def objective(variables: tuple[Tensor, ...], pk: dict[str, Tensor], bk: dict[str, Tensor],
                  tk: tuple[Tensor, ...], yk: Tensor) -> Tensor:
        xk = variables[0]
        y = torch.softmax(variables[1], -1) if optimise else yk

        def client_loss(p: dict[str, Tensor]) -> Tensor:
            return classification_loss(functional_call(model, {**p, **bk}, (xk,)), y)

        trial = grad(client_loss)(pk)
        return l2_distance(tuple(trial[n] for n in names), tk)

    step_fn: Callable[..., tuple] = vmap(grad_and_value(objective))
    sample = (observations[0].batch_size or labels.shape[1], *observations[0].data_spec.shape)
    trial = _trial_updates(model, names, sample)
    if trial is not None:

        def stacked_step(variables: tuple[Tensor, ...], p: dict, b: dict, t: tuple[Tensor, ...], y: Tensor
                         ) -> tuple[tuple[Tensor, ...], Tensor]:
            with torch.enable_grad():
                vs = tuple(v.detach().requires_grad_(True) for v in variables)
                value = l2_distance(trial(vs[0], torch.softmax(vs[1], -1) if optimise else y, p, b), t, stacked=True)
                return torch.autograd.grad(value.sum(), vs), value.detach()

        step_fn = stacked_step
    cache: dict[tuple[int, ...], tuple] = {}
    starts = [attack.start(observations[k], lab, generator_for(s)) for k, lab, s in problems]
    shapes = [v.shape for v in starts[0]]
    sizes = [v.numel() for v in starts[0]]

    def evaluate(order: list[int], points: Tensor) -> tuple[list[float], Tensor]:
        rows = order if len(order) > 1 else order * 2  # a stack of one rounds differently: pair it with itself
        flat = points if len(order) > 1 else points.expand(2, -1)
        key = tuple(rows)
        if key not in cache:
            cache.clear()
            at = torch.tensor(rows, device=labels.device)
            cache[key] = (_leaves({n: v.index_select(0, at) for n, v in params.items()}),
                          {n: v.index_select(0, at) for n, v in buffers.items()},
                          tuple(t.index_select(0, at) for t in target), labels.index_select(0, at))
        p_rows, b_rows, t_rows, y_rows = cache[key]
        variables = tuple(part.reshape(len(rows), *shape)
                          for part, shape in zip(flat.split(sizes, 1), shapes))
        grads, values = step_fn(variables, p_rows, b_rows, t_rows, y_rows)
        flat_grads = torch.cat([gr.reshape(len(rows), -1) for gr in grads], 1)
        return values[:len(order)].tolist(), flat_grads[:len(order)]

    steps = [Steps(budget, v[0]) for v in starts]

    def on_step(p: int, loss: float, x: Tensor) -> bool:
        return steps[p].update(loss, x[:sizes[0]].reshape(shapes[0]))

    x0 = torch.stack([torch.cat([v.reshape(-1) for v in vs]) for vs in starts])
    final = lbfgs.minimise(evaluate, x0, steps=budget.iterations, lr=attack.lr, max_iter=attack.max_eval,
                           history_size=attack.history_size, on_step=on_step)
    results = [steps[p].result(lab, final[p, sizes[0]:].reshape(shapes[1]) if optimise else None)
               for p, (_k, lab, _s) in enumerate(problems)]
    return records(observations, problems, results, label_sources,
                    (time.perf_counter() - start) / len(observations))


# The attack classes whose runs can be stacked: exactly these (not their subclasses, which change what they
# match or how).
_STACKED: dict[type, _Stacking] = {
    InvertingGradients: _Stacking(_ig_dlg_options, _solve),
    DLG: _Stacking(_ig_dlg_options, _solve_dlg),
    GIAS: _Stacking(_gias_options, cast(Solve, stacked_gias.solve), memory=_gias_bytes),
    GGL: _Stacking(_ggl_options, cast(Solve, stacked_ggl.solve), fedavg=True, adaptive=True,
                   memory=lambda a, one, _batch: one * cast(GGL, a).population),
}

__all__ = ["problem_bytes", "reconstruct_many", "stacks", "why_not_batched", "why_not_stacked"]
