"""A finished cell -> its `AuditRecord` (and the bytes of its images file).

`CellOutcome` is everything one cell produced: its clients' observations,
private batches and reconstructions, the attack that made them, what scores
them, the timings and the training round. `cell_record` scores it
(`giaudit.metrics.assemble.assess`), states the threat the attack actually
used (`Attack.threat_record`: the capabilities it read, their SoK class and any
oracle) and assembles the record. A capture without the client's batch has
no ground truth: its record holds the server's view and a note, no metrics.
`blocked_record` is the record of a cell whose client refused the model a
malicious server sent: no update, no reconstruction, no metrics.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from giaudit.attacks import Attack
from giaudit.metrics.assemble import Scorers, assess
from giaudit.metrics.faces import Gallery
from giaudit.orchestration.plan import Cell
from giaudit.results import AuditRecord, images_file, images_npz
from giaudit.types import Capability, GroundTruth, Observation, Reconstruction, ThreatModel, disclosed_values

NO_TRUTH_NOTE = ("no ground truth: the capture holds no client batch (the server's view), so nothing is measured; "
                 "the reconstructions are shown alone (capture with store_batch=True, as the data owner, to measure "
                 "the leakage)")


@dataclass(frozen=True)
class CellResult:
    record: AuditRecord
    images: bytes | None  # the .npz of matched originals and reconstructions; the driver writes it


@dataclass(frozen=True)
class CellOutcome:
    """What one cell produced, client by client (client 0 first), before it is scored."""

    cell: Cell
    scenario: str                                  # the record's scenario column
    attack: Attack
    observations: Sequence[Observation]
    truths: Sequence[GroundTruth | None]           # None: a capture without the client's batch
    reconstructions: Sequence[Reconstruction]
    scorers: Scorers
    galleries: Sequence[Gallery | None]
    timings: dict[str, float]                      # setup_s, attack_s
    training: dict[str, Any] = field(default_factory=dict)  # round and held-out accuracy of a checkpoint cell
    notes: tuple[str, ...] = ()                    # e.g. why the semantic metrics did not run
    tuning: dict[str, Any] = field(default_factory=dict)  # the attack's options tuned on the server's own clients
    model: dict[str, Any] = field(default_factory=dict)  # the audited model's provenance (AuditRecord.model)
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype and torch version (AuditRecord.runtime)


def cell_record(outcome: CellOutcome) -> CellResult:
    """Score the outcome and assemble its record; the images go beside it as .npz bytes."""
    t0 = time.perf_counter()
    cell, recs = outcome.cell, outcome.reconstructions
    per_image: list[dict[str, Any]] = []
    notes: list[str] = []
    metrics: dict[str, Any] = {}
    images: bytes | None = None
    truths = [t for t in outcome.truths if t is not None]
    if len(truths) < len(outcome.truths):  # a capture without the client's batch: the server's view only
        notes.append(NO_TRUTH_NOTE)
        shown = recs[0].images.detach().float().clamp(0, 1).cpu().numpy()
        images = images_npz(np.zeros((0, *shown.shape[1:]), np.float32), shown)
    else:
        scored = assess(truths, recs, outcome.scorers, outcome.galleries)
        metrics, per_image, notes = scored.metrics, scored.per_image, scored.notes
        images = images_npz(scored.original, scored.reconstruction)
    notes += list(outcome.notes)
    obs, rec = outcome.observations[0], recs[0]
    tr = rec.trace
    threat = outcome.attack.threat_record(obs, rec.label_source,
                                          also_used=(Capability.SURROGATE_DATA,) if outcome.tuning else ())
    return CellResult(AuditRecord(
        record_id=cell.record_id, config_hash=cell.config_hash, scenario=outcome.scenario, defense=cell.label,
        attack=cell.attack, seed=cell.seed, threat=threat, attack_params=dict(outcome.attack.params()),
        label_source=rec.label_source, metrics=metrics, per_image=tuple(per_image),
        timings={**outcome.timings, "metrics_s": time.perf_counter() - t0, "iterations": tr.iterations,
                 "restarts": len(tr.restart_losses), "workers": tr.extra.get("workers", 1)},
        trace={"losses": list(tr.losses), "restart_losses": list(tr.restart_losses), "best_restart": tr.best_restart,
               "stopped_early": tr.stopped_early, **({"clients": len(recs)} if len(recs) > 1 else {}),
               **{k: v for k, v in tr.extra.items() if k not in ("workers", "label_source")}},
        disclosed=disclosed_values(obs.disclosed), notes=tuple(notes),
        images_file=images_file(cell.record_id) if images is not None else None, training=dict(outcome.training),
        tuning=dict(outcome.tuning), model=dict(outcome.model), runtime=dict(outcome.runtime)),
        images)


def blocked_record(cell: Cell, scenario: str, attack: Attack, threat: ThreatModel, sent: nn.Module | None,
                   reason: str, timings: dict[str, float], training: dict[str, Any]) -> CellResult:
    """The record of a cell whose clients refused `sent`, the server's model (`reason`): nothing was sent or
    attacked."""
    return CellResult(AuditRecord(
        record_id=cell.record_id, config_hash=cell.config_hash, scenario=scenario, defense=cell.label,
        attack=cell.attack, seed=cell.seed, threat=attack.planned_threat(threat, sent),
        attack_params=dict(attack.params()), label_source="", metrics={}, per_image=(),
        timings={**timings, "attack_s": 0.0, "metrics_s": 0.0, "iterations": 0}, trace={}, notes=(),
        training=dict(training), blocked=reason), None)
