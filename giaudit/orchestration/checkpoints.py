"""Checkpoints: the global models of chosen rounds of the federated training, for leakage over training.

With ``scenario.checkpoints = [r1, r2, ...]`` an audit attacks the update a
client computes on the global model of round r, not on the scenario's
initial (or pretrained) model. One seed's training (`giaudit.training.train`:
the configured defenses on every client, `TrainingSettings` clients a round,
on the federation's data outside the held-out split) runs once up to the last
round and keeps the model's state at every requested round; it is one engine
task (`checkpoint_task`) whose states go back to the driver and into that
seed's cells (`at_checkpoint`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from giaudit.config import AuditSpec
from giaudit.scenario.build import AnyScenario, training_data
from giaudit.scenario.capture import CaptureScenario
from giaudit.training import TrainingRun, TrainingSettings, train


@dataclass(frozen=True)
class Checkpoint:
    """The global model of one round of the federated training (from the seed's training task)."""

    round: int
    state: dict[str, torch.Tensor]
    held_out_accuracy: float | None


def checkpoint_training(spec: AuditSpec, seed: int, settings: TrainingSettings) -> TrainingRun:
    """The federated training (the configured defenses on every client) up to the last checkpoint."""
    scenario, train_set, held = training_data(spec.data, spec.scenario, spec.threat.model(), seed, base=spec.base,
                                              runtime=spec.run.runtime())
    rounds = [r for r in spec.scenario.rounds if r is not None]
    return train(scenario.model, train_set, held, scenario.protocol, scenario.batch_size,
                 [dict(d) for d in spec.defenses], settings, seed, rounds=max(rounds), keep=rounds)


def seed_checkpoints(spec: AuditSpec, seed: int, settings: TrainingSettings) -> dict[int, Checkpoint]:
    """The checkpoints of one seed's training: the global model's state and held-out accuracy per round."""
    run = checkpoint_training(spec, seed, settings)
    return {r: Checkpoint(r, run.states[r], run.accuracy_at(r)) for r in sorted(run.states)}


def checkpoint_task(job: tuple[AuditSpec, int, TrainingSettings]) -> dict[int, Checkpoint]:
    """One seed's training as an engine task (its states go back to the driver, then into the cells)."""
    spec, seed, settings = job
    return seed_checkpoints(spec, seed, settings)


def at_checkpoint(scenario: AnyScenario | CaptureScenario, checkpoint: Checkpoint) -> dict[str, Any]:
    """Put the global model of the checkpoint's round into the scenario; the record's training info."""
    state, round_ = checkpoint.state, checkpoint.round
    model = copy.deepcopy(scenario.model)
    try:
        model.load_state_dict(state)
    except RuntimeError:  # a defense changed the architecture (DP-SGD's GroupNorm): load what matches
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    model.train(scenario.model.training)
    scenario.model = model
    return {"round": round_, "held_out_accuracy": checkpoint.held_out_accuracy}
