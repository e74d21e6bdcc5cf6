"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

Threat model: honest-but-curious server, SoK class B (model, update, batch
size); its FedAvg variant is class C: it knows the client's local learning
rate, number of local steps and mini-batch size, and unrolls the same local
SGD steps on the candidate images to match the shared weight difference.

Recipe: negative cosine similarity between the trial and the observed update
(over the concatenated layers) + total variation, Adam on the *signed*
gradient of the images, learning rate stepped down x0.1 at 3/8, 5/8 and 7/8 of
the budget, images clamped to the data range after every step, K restarts
ranked by the attack's own matching loss.

Options beyond the paper (off unless configured): the BatchNorm statistics
prior of Yin et al. 2021 (needs `bn_statistics`, class E), and a "plateau"
schedule: the same three x0.1 drops as the paper, placed by progress rather
than by a fixed budget, then a stop. A drop comes when the mean matching loss
of the last `patience` iterations (default 50) is less than 1 % below that of
the `patience` before; each drop goes on from the best iterate so far (the
lowest matching loss), not from wherever the large signed steps left the
images. This is what buys time-to-quality (benchmarks/ig_speed.py: on ConvNet
with batch 1 the window test with the return to the best iterate ended at
18.8 dB in 406 iterations where the best-value test stopped at 16.6 dB).
Restarts can be halved (`Budget.halving`): `descend` pauses after any
iteration.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from giaudit.attacks._common.distances import DISTANCES, total_variation
from giaudit.attacks.base import ATTACKS, LABEL_DIM, Attack, Budget, Descent, Dim, Plateau, RestartResult
from giaudit.errors import ThreatModelError
from giaudit.fl import BNStatsRecorder
from giaudit.registry import check_choice, check_number
from giaudit.types import Capability, Observation

SCHEDULES = ("steps", "plateau", "constant")
# The plateau schedule's test: the mean matching loss of the last `patience` iterations is not this much
# (relative) below the mean of the `patience` before. Means, not the best value: at lr 0.1 the signed step
# makes the loss jump, and one lucky low value would otherwise hold off every drop or force one too early.
WINDOW_GAIN = 0.01


def window_stalled(losses: list[float], patience: int, since_drop: int) -> bool:
    """True when the last `patience` losses brought less than WINDOW_GAIN over the `patience` before them."""
    if since_drop < 2 * patience:
        return False
    recent = sum(losses[-patience:]) / patience
    before = sum(losses[-2 * patience:-patience]) / patience
    return recent > (1 - WINDOW_GAIN) * before


@ATTACKS.register("ig")
class InvertingGradients(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    display_name: ClassVar[str] = "Inverting Gradients"
    search_space: ClassVar[Mapping[str, Dim]] = {
        "lr": Dim("log", 1e-3, 1.0), "tv_weight": Dim("log", 1e-7, 1e-1),
        "schedule": Dim("choice", choices=SCHEDULES), "labels": LABEL_DIM}

    def __init__(self, *, labels: str = "auto", adaptive: bool = False, lr: float = 0.1,
                 tv_weight: float = 1e-4, distance: str = "cosine", schedule: str = "steps",
                 bn_weight: float = 0.0) -> None:
        super().__init__(labels=labels, adaptive=adaptive)
        check_choice("distance", distance, DISTANCES)
        check_choice("schedule", schedule, SCHEDULES)
        check_number("lr", lr, low=0.0, strict_low=True)
        check_number("tv_weight", tv_weight, low=0.0)
        check_number("bn_weight", bn_weight, low=0.0)
        self.lr, self.tv_weight, self.distance, self.schedule = lr, tv_weight, distance, schedule
        self.bn_weight = bn_weight

    def capabilities_used(self, obs: Observation) -> set[Capability]:
        used = super().capabilities_used(obs)
        if self.bn_weight > 0 and obs.bn_statistics is not None:
            used.add(Capability.BN_STATISTICS)
        return used

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        if self.bn_weight > 0 and obs.bn_statistics is None:
            raise ThreatModelError(f"attacks.{self.name}.bn_weight > 0 needs the client's BN statistics: "
                                   "set threat.bn_statistics = true")
        n = obs.batch_size or labels.numel()
        model, target = obs.model, obs.update.tensors
        distance = DISTANCES[self.distance]
        lo, hi = obs.data_spec.value_range
        x = self.initial_images(obs, n, generator).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        iters = budget.iterations
        milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        drops_left = 3
        probe = BNStatsRecorder(model, detach=False) if self.bn_weight > 0 else None
        plateau = Plateau(budget.patience, budget.min_delta)
        window = budget.patience or 50
        losses: list[float] = []
        last_drop = -1
        best_x, best_loss, stopped = x.detach().clone(), float("inf"), False
        try:
            for it in range(iters):
                trial = self.trial_update(obs, model, x, labels)
                match = distance(trial, target)
                loss = match + self.tv_weight * total_variation(x) if self.tv_weight else match
                if probe is not None and obs.bn_statistics is not None:
                    loss = loss + self.bn_weight * sum(
                        (m - tm).norm() + (v - tv).norm() for (m, v), (tm, tv) in zip(probe.take(), obs.bn_statistics))
                (grad,) = torch.autograd.grad(loss, x)
                m = float(match.detach())
                # The loss is that of the current x, before the step: keep that x if it is the best.
                if m < best_loss:
                    best_loss, best_x = m, x.detach().clone()
                losses.append(m)
                x.grad = grad.sign()
                opt.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
                yield best_loss
                plateau.update(m)
                if self.schedule == "steps" and it + 1 in milestones:
                    self._drop(opt)
                elif self.schedule == "plateau" and window_stalled(losses, window, it - last_drop):
                    if drops_left == 0:
                        stopped = True
                        break
                    self._drop(opt)
                    drops_left -= 1
                    last_drop = it
                    # Go on from the best iterate, not from wherever the large steps left x.
                    with torch.no_grad():
                        x.copy_(best_x)
                elif self.schedule != "plateau" and plateau.stalled:
                    stopped = True
                    break
        finally:
            if probe is not None:
                probe.close()
        return RestartResult(best_x, labels, losses, best_loss, stopped)

    @staticmethod
    def _drop(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["lr"] *= 0.1
