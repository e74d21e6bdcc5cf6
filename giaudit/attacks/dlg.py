"""DLG: Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Threat model: honest-but-curious server, SoK class A/B: it sees the model and
the client's FedSGD gradient (and the batch size). Dummy images (and, unless
labels are recovered, dummy soft labels) are optimised with L-BFGS to
minimise the squared L2 distance between their gradient and the observed
one. Deviation: the images are initialised uniformly in the data range
rather than from N(0, 1), and clamped to it on return.

One restart is `DLG.solve`: torch's L-BFGS (strong Wolfe line search) on the
variables `DLG.start` draws, around an objective passed in as a `LossAndGrad`
(`run_restart` passes autograd on the observation's own model,
`DLG.matching`). `giaudit.attacks.batched` draws the same starts and runs the
same L-BFGS steps for many restarts at once; both paths keep their steps, best
iterate and plateau stop through `Steps`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import l2_distance
from giaudit.attacks.base import ATTACKS, LABEL_DIM, Attack, Budget, Dim, Plateau, Progress, RestartResult
from giaudit.device import to_model
from giaudit.types import Capability, Observation

# The matching objective at the variables (the images, then the label logits when they are optimised): its value
# and its gradient with respect to each variable, all detached.
LossAndGrad = Callable[[Sequence[Tensor]], tuple[Tensor, Sequence[Tensor]]]


@ATTACKS.register("dlg")
class DLG(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "A"
    display_name: ClassVar[str] = "DLG"
    search_space: ClassVar[Mapping[str, Dim]] = {"lr": Dim("log", 1e-2, 10.0), "labels": LABEL_DIM}

    def __init__(self, *, labels: str = "auto", adaptive: bool = False, lr: float = 1.0,
                 history_size: int = 100, max_eval: int = 20, optimise_labels: bool = False) -> None:
        super().__init__(labels=labels, adaptive=adaptive)
        self.lr, self.history_size, self.max_eval = lr, history_size, max_eval
        self.optimise_labels = optimise_labels

    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        return self.solve(obs, labels, budget, generator, progress, self.matching(obs, labels))

    def matching(self, obs: Observation, labels: Tensor) -> LossAndGrad:
        """The squared L2 distance between the trial update at the variables and the observed one, and its
        gradient, by autograd through the observation's model."""
        model, target = obs.model, obs.update.tensors

        def loss_and_grad(variables: Sequence[Tensor]) -> tuple[Tensor, Sequence[Tensor]]:
            with torch.enable_grad():
                leaves = [v.detach().requires_grad_(True) for v in variables]
                y = torch.softmax(leaves[1], -1) if len(leaves) > 1 else labels
                loss = l2_distance(self.trial_update(obs, model, leaves[0], y), target)
                grads = torch.autograd.grad(loss, leaves)
            return loss.detach(), grads

        return loss_and_grad

    def start(self, obs: Observation, labels: Tensor, generator: torch.Generator) -> list[Tensor]:
        """A restart's variables as `generator` draws them: the images, then the label logits when optimised."""
        n = obs.batch_size or labels.numel()
        variables = [self.initial_images(obs, n, generator)]
        if self.optimise_labels:
            draw = torch.randn((n, obs.data_spec.num_classes), generator=generator, device=generator.device)
            variables.append(to_model(draw, obs.model))
        return variables

    def solve(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
              progress: Progress | None, loss_and_grad: LossAndGrad) -> RestartResult:
        """One restart: the start `generator` draws (images, then label logits when optimised), then
        `budget.iterations` L-BFGS steps on `loss_and_grad`, keeping the best iterate by the matching loss."""
        variables = [v.requires_grad_(True) for v in self.start(obs, labels, generator)]
        opt = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.max_eval, history_size=self.history_size,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            loss, grads = loss_and_grad([v.detach() for v in variables])
            for v, g in zip(variables, grads):
                v.grad = g
            return loss

        steps = Steps(budget, variables[0])
        for _ in range(budget.iterations):
            loss = float(opt.step(closure).detach())
            stop = steps.update(loss, variables[0])
            if progress is not None and math.isfinite(loss):
                progress(1)
            if stop:
                break
        return steps.result(labels, variables[1] if len(variables) > 1 else None)


class Steps:
    """What a DLG restart keeps of its L-BFGS steps: the loss of each (at the step's start, as `LBFGS.step`
    returns it), the iterate after the step with the lowest such loss, and the plateau stop."""

    def __init__(self, budget: Budget, x: Tensor) -> None:
        self.losses: list[float] = []
        self.plateau = Plateau(budget.patience, budget.min_delta)
        self.best_x, self.best_loss = x.detach().clone(), float("inf")
        self.stopped = False

    def update(self, loss: float, x: Tensor) -> bool:
        """One step's loss and the iterate after it; True when the restart stops (a non-finite loss, a loss
        of zero or a plateau)."""
        if not math.isfinite(loss):
            return True
        self.losses.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_x = loss, x.detach().clone()
        self.plateau.update(loss)
        self.stopped = loss < 1e-12 or self.plateau.stalled
        return self.stopped

    def result(self, labels: Tensor, label_logits: Tensor | None) -> RestartResult:
        final_labels = labels if label_logits is None else label_logits.detach().argmax(-1)
        extra = {"label_source": "optimised"} if label_logits is not None else {}
        return RestartResult(self.best_x, final_labels, self.losses, self.best_loss, self.stopped, extra)
