"""DLG: Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Threat model: honest-but-curious server, SoK class A/B: it sees the model and
the client's FedSGD gradient (and the batch size). Dummy images (and, unless
labels are recovered, dummy soft labels) are optimised with L-BFGS to
minimise the squared L2 distance between their gradient and the observed
one. Deviation: the images are initialised uniformly in the data range
rather than from N(0, 1), and clamped to it on return.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import l2_distance
from giaudit.attacks.base import ATTACKS, LABEL_DIM, Attack, Budget, Dim, Plateau, Progress, RestartResult
from giaudit.device import to_model
from giaudit.types import Capability, Observation


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
        n = obs.batch_size or labels.numel()
        model, target = obs.model, obs.update.tensors
        x = self.initial_images(obs, n, generator).requires_grad_(True)
        variables = [x]
        label_logits = None
        if self.optimise_labels:
            draw = torch.randn((n, obs.data_spec.num_classes), generator=generator, device=generator.device)
            label_logits = to_model(draw, obs.model).requires_grad_(True)
            variables.append(label_logits)
        opt = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.max_eval, history_size=self.history_size,
                                line_search_fn="strong_wolfe")

        def objective() -> Tensor:
            y = torch.softmax(label_logits, -1) if label_logits is not None else labels
            return l2_distance(self.trial_update(obs, model, x, y), target)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward(inputs=variables)
            return loss

        losses: list[float] = []
        plateau = Plateau(budget.patience, budget.min_delta)
        best_x, best_loss = x.detach().clone(), float("inf")
        stopped = False
        for _ in range(budget.iterations):
            loss = float(opt.step(closure).detach())
            if not math.isfinite(loss):
                break
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_x = loss, x.detach().clone()
            if progress is not None:
                progress(1)
            plateau.update(loss)
            if loss < 1e-12 or plateau.stalled:
                stopped = True
                break
        final_labels = labels if label_logits is None else label_logits.detach().argmax(-1)
        extra = {"label_source": "optimised"} if label_logits is not None else {}
        return RestartResult(best_x, final_labels, losses, best_loss, stopped, extra)
