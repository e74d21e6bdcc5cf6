"""The plan of an audit: one `Cell` per (scenario, defense, attack, seed[, checkpoint round]).

A cell is an idempotent task keyed by its record id and its config hash. The
hash is taken over the canonical config (`AuditSpec.raw`) without the seeds,
the other attacks and the name, plus the cell's own attack table and seed
(and its round and training settings for a checkpoint cell, a user-level
flag when the run holds a user-level attack, and the SHA-256 of
``scenario.weights`` when it is set). A run folder that already holds
a record with the same id and hash skips the cell, so a crashed or
interrupted sweep run again computes only what is missing, and a config
change recomputes exactly the cells it touches. Saved runs and shipped caches
are keyed by these hashes: their inputs do not change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from giaudit.attacks import ATTACKS
from giaudit.config import AuditSpec
from giaudit.engine import Shared
from giaudit.orchestration.checkpoints import Checkpoint
from giaudit.results import config_hash
from giaudit.scenario.state import sha256
from giaudit.training import TrainingSettings


@dataclass(frozen=True)
class Cell:
    """One (scenario, defense, attack, seed[, round]) cell: an idempotent task keyed by its record id and config
    hash. `checkpoint` is filled in by the driver from the seed's training task (a cell without it trains)."""

    spec: AuditSpec
    label: str
    attack: str
    seed: int
    record_id: str
    config_hash: str
    round: int | None = None
    training: TrainingSettings | None = None
    checkpoint: Checkpoint | Shared | None = None  # Shared: handed out by the engine (`Engine.share`)
    show_progress: bool = False
    tuning_dir: str | None = None   # where tuned attack options are cached (the run folder's tuning/)


def safe_id(name: str) -> str:
    """A record id usable as a file name (the record's images file is named after it)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name)


def user_level_run(spec: AuditSpec) -> bool:
    """The run holds a user-level attack (one representative image per user batch, e.g. DiffULA)."""
    return any(ATTACKS[name].user_level for name in spec.attacks)


def plan_cells(spec: AuditSpec, label: str, training: TrainingSettings | None = None,
               show_progress: bool = False) -> list[Cell]:
    """Every cell of `spec` under the defense `label`: seed by seed, checkpoint round by round, in the config's
    attack order."""
    training = training or TrainingSettings()
    # With a user-level attack in the run every record is also scored at user level, which its hash records
    # (only then, so the hashes of other runs stay as they were).
    user = {"user_level": True} if user_level_run(spec) else {}
    # [bounds] only changes how the records are read (the DP bounds), never an attack: not in the cell hash.
    shared = {k: v for k, v in spec.raw.items() if k not in ("seeds", "attacks", "name", "bounds")}
    # [run] batch_cells only changes how cells are computed together (their records agree to float tolerance).
    run = {k: v for k, v in shared.get("run", {}).items() if k != "batch_cells"}
    shared = {k: v for k, v in shared.items() if k != "run"} | ({"run": run} if run else {})
    if spec.scenario.weights is not None:
        # The weights' content, not only their path: a new round saved under the same name recomputes the cells.
        shared["weights_sha256"] = sha256(spec.scenario.weights)
    cells = []
    for seed in spec.seeds:
        for round_ in spec.scenario.rounds:
            for attack_name, attack in spec.attacks.items():
                at = "" if round_ is None else f"__r{round_}"
                rid = safe_id(f"{spec.name}__{label}__{attack_name}__s{seed}{at}")
                chash = config_hash({**shared, "attack": {attack_name: dict(attack.table)}, "seed": seed, **user,
                                     **({} if round_ is None else {"round": round_, "training": training.as_dict()})})
                cells.append(Cell(spec, label, attack_name, seed, rid, chash, round_,
                                  training if round_ is not None else None, show_progress=show_progress))
    return cells
