"""One cell, computed from its own seeds: the same `AuditRecord` in whichever process or machine runs it.

`run_cell` builds the scenario of the cell's seed (`giaudit.scenario.build`),
puts in the global model of its training round when the config sets
``scenario.checkpoints``, draws the seed's ``scenario.clients_per_seed``
private batches and computes each client's (defended) update; the attack
receives each `Observation` (never the `GroundTruth`) and only the metrics
see the private batch (`giaudit.orchestration.record`). Every draw comes from
generators seeded by the seed, the client and the attack name, so client c of
a seed gets the same batch and the same attack start under every defense
(paired comparisons across defenses).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from giaudit.config import AuditSpec
from giaudit.defenses import Chain, build_chain
from giaudit.engine import in_worker
from giaudit.orchestration import evaluators
from giaudit.orchestration.checkpoints import at_checkpoint, seed_checkpoints
from giaudit.orchestration.plan import Cell, user_level_run
from giaudit.orchestration.record import CellOutcome, CellResult, cell_record
from giaudit.scenario.build import AnyScenario, cell_scenario, model_provenance, scenario_name
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.state import sha256
from giaudit.training import TrainingSettings, stable_seed
from giaudit.types import GroundTruth, Observation


def build_defense(spec: AuditSpec) -> tuple[str, Chain]:
    """The defense chain of ``[[defenses]]`` and its label (``none`` without defenses)."""
    chain = build_chain([dict(d) for d in spec.defenses], where="defenses")
    return chain.name, chain


def simulate_clients(scenario: AnyScenario | CaptureScenario, defense: Chain, seed: int,
                     n: int) -> list[tuple[Observation, GroundTruth | None]]:
    """`n` clients' observations and private batches for one seed (client 0 draws the batch a one-client audit
    draws, so `clients_per_seed = 1` reproduces earlier runs)."""
    return [scenario.simulate(defense, generator=torch.Generator().manual_seed(
        stable_seed("batch", seed, *((c,) if c else ())))) for c in range(n)]


def _progress_bar(desc: str, total: int, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False, file=sys.stderr)


def run_cell(cell: Cell) -> CellResult:
    """Compute one cell from its own seeds (the same record whichever process or machine runs it)."""
    torch.set_flush_denormal(True)  # denormal floats slowed some attacks about 40x on CPU
    spec, seed, attack_name = cell.spec, cell.seed, cell.attack
    start = time.perf_counter()
    _label, defense = build_defense(spec)
    face_analyzer, analyzer_note = evaluators.analyzer(spec.output)
    runtime = spec.run.runtime()
    scenario = cell_scenario(spec.data, spec.scenario, spec.threat.model(), seed, spec.base, runtime)
    train_info: dict[str, Any] = {}
    if cell.round is not None:
        checkpoint = cell.checkpoint or seed_checkpoints(spec, seed, cell.training or TrainingSettings())[cell.round]
        train_info = at_checkpoint(scenario, checkpoint)
    clients = simulate_clients(scenario, defense, seed, spec.scenario.clients)
    galleries = [evaluators.gallery(spec, face_analyzer, scenario, t, seed) for _, t in clients]
    setup_s = time.perf_counter() - start
    config = spec.attacks[attack_name]
    attack = config.build()
    budget = config.budget
    wants = attack.others_wanted()
    if wants:
        # E.g. GIML learns its prior from other clients' updates: simulate them, keep only the observations.
        others = [scenario.simulate(defense, generator=torch.Generator().manual_seed(
            stable_seed("meta", seed, i)))[0] for i in range(wants)]
        attack.prepare(others)
    recs = []
    t0 = time.perf_counter()
    for c, (obs, _truth) in enumerate(clients):
        # The same attack start for a client under every defense: paired comparisons across defenses.
        rng = torch.Generator().manual_seed(stable_seed("attack", attack_name, seed, *((c,) if c else ())))
        bar = _progress_bar(f"{attack_name} seed {seed}" + (f" client {c}" if len(clients) > 1 else "")
                            + ("" if cell.round is None else f" round {cell.round}"),
                            budget.iterations * budget.restarts, cell.show_progress and not in_worker())
        try:
            recs.append(attack.reconstruct(obs, budget=budget, rng=rng, progress=bar.update))
        finally:
            bar.close()
    attack_s = time.perf_counter() - t0
    return cell_record(CellOutcome(
        cell=cell, scenario=scenario_name(spec.data, spec.scenario), attack=attack,
        observations=[o for o, _ in clients], truths=[t for _, t in clients], reconstructions=recs,
        scorers=evaluators.scorers(spec, face_analyzer, user_level_run(spec)), galleries=galleries,
        timings={"setup_s": setup_s, "attack_s": attack_s}, training=train_info,
        notes=(analyzer_note,) if analyzer_note else (),
        model=model_provenance(spec.scenario, sha256(spec.scenario.weights) if spec.scenario.weights else None),
        runtime=runtime.record()))
