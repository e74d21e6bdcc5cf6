"""Differencing through client selection: a malicious server that chooses which clients take part (SoK class H),
composed with Inverting Gradients (Geiping et al. 2020) on the isolated update.

Threat model: SoK class H, a malicious server; it needs no change of the model. Secure aggregation (Bonawitz et
al. 2017) lets the server learn only the sum of a round's updates, but the server picks the round's clients:
it runs the round with the audited client and again without it (the same model, the other clients on their
same local data), and the difference of the two sums is the audited client's own update (the power Carletti et
al.'s SoK gives class H; Pasquini, Francati and Ateniese, "Eluding Secure Aggregation in Federated Learning via
Model Inconsistency", CCS 2022, isolate a client within one round by sending it a model of its own). The
scenario runs
the second round honestly (`Observation.without_client`): the other clients really recompute, every defense
applies to each as usual, and randomness is drawn anew, so noise (DP-SGD's, a central mechanism's) does not
cancel: the difference holds the audited client's update plus two rounds' noise.

The attack then runs Inverting Gradients (the `ig` attack's own loop and options) on the difference, with the
audited client's batch size and labels recovered from the difference as IG recovers them. The model is
unchanged, so model_validation lets both rounds through; what stops it is a minimum number of clients per
round that the server cannot choose, or noise.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from giaudit.attacks.base import ATTACKS, Budget, Descent, Dim
from giaudit.attacks.ig import InvertingGradients
from giaudit.attacks.labels import recover_labels
from giaudit.errors import ThreatModelError
from giaudit.types import Capability, Observation, SharedUpdate


def differenced(obs: Observation) -> Observation:
    """The observation with the audited client's update isolated: the round with it minus the round without it."""
    if obs.without_client is None:
        if obs.threat.has(Capability.SELECTS_CLIENTS):
            raise ThreatModelError("attack 'differencing': the scenario ran no round without the audited client "
                                   "(a captured update or a diffusion client has none)")
        raise ThreatModelError("attack 'differencing' needs the round run without the audited client: set "
                               "threat.selects_clients = true")
    tensors = tuple(a - b for a, b in zip(obs.update.tensors, obs.without_client.tensors))
    return dataclasses.replace(obs, update=SharedUpdate(tensors, obs.update.kind), without_client=None)


@ATTACKS.register("differencing")
class Differencing(InvertingGradients):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE, Capability.SELECTS_CLIENTS})
    sok_class: ClassVar[str] = "H"
    display_name: ClassVar[str] = "Differencing of two rounds (client selection + IG)"
    search_space: ClassVar[Mapping[str, Dim]] = {}

    def __init__(self, *, labels: str = "auto", lr: float = 0.1, tv_weight: float = 1e-4, distance: str = "cosine",
                 schedule: str = "steps") -> None:
        super().__init__(labels=labels, lr=lr, tv_weight=tv_weight, distance=distance, schedule=schedule)

    def modification(self, model: nn.Module) -> dict[str, Any]:
        return {"did": "ran the round again without the audited client (the same model and other clients) and "
                       "subtracted the two sums"}

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        return recover_labels(differenced(obs), self.label_method, generator, self.name)

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        return (yield from super().descend(differenced(obs), labels, budget, generator))
