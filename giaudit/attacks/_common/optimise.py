"""The gradient-descent loop the generative-prior attacks share.

GIAS's latent search (GI-z) and parameter search (GI-z+theta) (Jeon et al.,
NeurIPS 2021; GIML reuses both) and GGL's Adam-on-z comparison
(Li et al., CVPR 2022) all run the same loop: Adam on a set of
tensors, the step-wise schedule of Geiping et al. (learning rate x0.1 at 3/8,
5/8 and 7/8 of the phase), one recorded loss per step, the best state seen kept,
progress reported, and an early stop on a plateau. Only the objective and
what counts as the state differ, so they pass those in. The threat model is
the caller's (class D for GIAS/GGL, B for GIML); nothing here sees ground
truth.

IG keeps its own loop (signed gradient, clamping, plateau-placed drops) and
DLG its L-BFGS closure: not the same shape.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
from torch import Tensor

from giaudit.attacks.base import Budget, Plateau, Progress, drive

# A phase as a generator: yields the best value so far after each step, returns (best state, value, stalled).
PhaseSteps = Generator[float, None, tuple[Tensor, float, bool]]

# One step's objective: (value recorded and ranked, loss to differentiate, state kept when the value is the best).
Step = Callable[[], tuple[Tensor, Tensor, Tensor]]


def drop_lr(opt: torch.optim.Optimizer, factor: float = 0.1) -> None:
    for group in opt.param_groups:
        group["lr"] *= factor


def milestones(n: int) -> set[int]:
    """Iteration counts after which the learning rate drops: 3/8, 5/8, 7/8 of `n` (none at 0)."""
    return {int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)} - {0}


def adam_steps(params: Sequence[Tensor], step: Step, *, lr: float, iterations: int, budget: Budget,
               losses: list[float], start: Tensor) -> PhaseSteps:
    """Adam on `params` for at most `iterations` steps, as a generator that yields the best value so far
    after every step (so restarts can be paused and halved); returns (best state, its value, stalled early).

    `step()` evaluates the objective at the current `params`. The value is recorded (appended to
    `losses`) and compared BEFORE the optimiser moves, so the state kept is the one that value belongs
    to. `start` is returned (with value inf) when no step runs. `budget.patience` / `min_delta` give
    the plateau stop.
    """
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    marks = milestones(iterations)
    plateau = Plateau(budget.patience, budget.min_delta)
    best_state, best, stalled = start, float("inf"), False
    for it in range(iterations):
        tracked, loss, state = step()
        grads = torch.autograd.grad(loss, params)
        v = float(tracked.detach())
        if v < best:
            best, best_state = v, state.detach().clone()
        losses.append(v)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        yield best
        plateau.update(v)
        if it + 1 in marks:
            drop_lr(opt)
        if plateau.stalled:
            stalled = True
            break
    return best_state, best, stalled


def at_most(steps: PhaseSteps, floor: float) -> PhaseSteps:
    """A later phase's steps, yielding the best value over this phase and the earlier ones (`floor`)."""
    while True:
        try:
            v = next(steps)
        except StopIteration as stop:
            return stop.value
        yield min(floor, v)


def adam_descent(params: Sequence[Tensor], step: Step, *, lr: float, iterations: int, budget: Budget,
                 progress: Progress | None, losses: list[float], start: Tensor) -> tuple[Tensor, float, bool]:
    """`adam_steps` run to its end: (best state, its value, stalled early)."""
    return drive(adam_steps(params, step, lr=lr, iterations=iterations, budget=budget, losses=losses, start=start),
                 progress)
