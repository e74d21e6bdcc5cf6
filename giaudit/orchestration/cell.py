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

An attack that modifies the model (a malicious server, `Attack.modifies()`) adds the server
step before any client computes: the attack's `serve` changes the global
model, estimated on the server's own held-out images (`server_data`), and
every client of the cell computes on the model it received. When a defense
makes the client refuse that model (model_validation), the cell's record is
"blocked": no update left the client, so nothing was attacked.

A tuned attack (``attacks.NAME.tune``) is tuned on clients the server
simulates from its own data (`giaudit.orchestration.tuning`) and attacks the
audited clients with the options it chose; the same attack at its defaults
attacks them too, with the same starts, scored as the record is, under the
record's ``tuning["untuned"]``: what an untuned audit would have reported is a
measurement on the same images, not a guess.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from giaudit.attacks import ATTACKS, Attack, build_attack
from giaudit.attacks.batched import reconstruct_many, stacks, why_not_stacked
from giaudit.config import AuditSpec
from giaudit.defenses import Chain, build_chain
from giaudit.engine import Shared, in_worker
from giaudit.errors import ConfigError, ModelRefused
from giaudit.metrics.assemble import Scorers, assess
from giaudit.orchestration import evaluators
from giaudit.orchestration.checkpoints import at_checkpoint, seed_checkpoints
from giaudit.orchestration.plan import Cell, user_level_run
from giaudit.orchestration.record import CellOutcome, CellResult, blocked_record, cell_record
from giaudit.orchestration.tuning import tune_attack, tuning_key
from giaudit.results import UNTUNED
from giaudit.scenario.build import (
    AnyScenario,
    cell_scenario,
    model_provenance,
    scenario_name,
    server_data,
    surrogate_scenario,
)
from giaudit.scenario.capture import CaptureScenario, deployment, read_meta
from giaudit.scenario.client import Scenario
from giaudit.scenario.state import sha256
from giaudit.training import TrainingSettings, stable_seed
from giaudit.types import Capability, GroundTruth, Observation, Reconstruction


def build_defense(spec: AuditSpec) -> tuple[str, Chain]:
    """The defense chain of ``[[defenses]]`` and its label (``none`` without defenses). A capture's label is
    the deployment's own defenses (or "not declared"); the chain stays empty, the deployment applied them."""
    chain = build_chain([dict(d) for d in spec.defenses], where="defenses")
    if spec.scenario.capture is not None:
        return deployment(read_meta(spec.scenario.capture), spec.scenario.deployment_defenses).label, chain
    return chain.name, chain


def simulate_clients(scenario: AnyScenario | CaptureScenario, defense: Chain, seed: int,
                     n: int) -> list[tuple[Observation, GroundTruth | None]]:
    """`n` clients' observations and private batches for one seed (client 0 draws the batch a one-client audit
    draws, so `clients_per_seed = 1` reproduces earlier runs)."""
    return [scenario.simulate(defense, generator=torch.Generator().manual_seed(
        stable_seed("batch", seed, *((c,) if c else ())))) for c in range(n)]


def malicious_server(spec: AuditSpec, scenario: AnyScenario | CaptureScenario, attack: Attack,
                     seed: int) -> Scenario:
    """The scenario with the server step of the active `attack`: the model it sends, made from the agreed one
    and the server's held-out images (surrogate data, when the threat model grants it)."""
    if not isinstance(scenario, Scenario):
        key = "scenario.capture" if isinstance(scenario, CaptureScenario) else "scenario.model"
        raise ConfigError(f"attacks.{attack.name}: a malicious server changes the model a simulated classifier "
                          f"client computes on; {key} gives no such client (its update is computed already, or "
                          "it is a diffusion model)")
    held = server_data(spec.data, seed).images if scenario.threat.has(Capability.SURROGATE_DATA) else None
    if held is not None and held.shape[0] == 0:
        raise ConfigError(f"attacks.{attack.name}: the server's surrogate images are the held-out split, and "
                          "data.holdout = 0 leaves it none; raise data.holdout")
    gen = torch.Generator().manual_seed(stable_seed("server", attack.name, seed))
    return scenario.serve(partial(attack.serve, data_spec=scenario.pool.spec, threat=scenario.threat,
                                  surrogate=held, generator=gen))


def _progress_bar(desc: str, total: int, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False, file=sys.stderr)


@dataclass
class _Prepared:
    """A cell up to its reconstructions: everything `run_cell` builds before the attack runs."""

    cell: Cell
    scenario: Any
    attack: Attack
    budget: Any
    clients: list[tuple[Observation, GroundTruth | None]]
    galleries: list[Any]
    face_analyzer: Any
    analyzer_note: str | None
    runtime: Any
    setup_s: float
    train_info: dict[str, Any]
    tuned: Any = None
    untuned: Attack | None = None   # a tuned attack's options at their defaults, measured beside it


def _prepare(cell: Cell) -> _Prepared | CellResult:
    """The cell's scenario, clients, attack and attack starts; a finished (blocked) result when the client
    refused the served model."""
    torch.set_flush_denormal(True)  # denormal floats slowed some attacks about 40x on CPU
    spec, seed, attack_name = cell.spec, cell.seed, cell.attack
    start = time.perf_counter()
    _label, defense = build_defense(spec)
    face_analyzer, analyzer_note = evaluators.analyzer(spec.output)
    runtime = spec.run.runtime()
    scenario = cell_scenario(spec.data, spec.scenario, spec.threat.model(), seed, spec.base, runtime)
    train_info: dict[str, Any] = {}
    if cell.round is not None:
        checkpoint = (cell.checkpoint.get() if isinstance(cell.checkpoint, Shared) else cell.checkpoint
                      or seed_checkpoints(spec, seed, cell.training or TrainingSettings())[cell.round])
        train_info = at_checkpoint(scenario, checkpoint)
    config = spec.attacks[attack_name]
    active = ATTACKS[attack_name].modifies()
    if active:  # passive attacks are built after the clients, as they always were
        attack = config.build()
        scenario = malicious_server(spec, scenario, attack, seed)
    try:
        clients = simulate_clients(scenario, defense, seed, spec.scenario.clients)
    except ModelRefused as refused:  # only a malicious server's model is ever refused
        return blocked_record(cell, scenario_name(spec.data, spec.scenario), attack if active else config.build(),
                              spec.threat.model(), getattr(scenario, "served", None),
                              str(refused), {"setup_s": time.perf_counter() - start}, train_info)
    galleries = [evaluators.gallery(spec, face_analyzer, scenario, t, seed) for _, t in clients]
    setup_s = time.perf_counter() - start
    tuned = None
    untuned: Attack | None = None
    settings = config.tune
    if settings is not None and not isinstance(scenario, CaptureScenario):  # the config refuses tune with capture
        # The server tunes on clients of its own (held-out data), never on the audited ones.
        tuned = tune_attack(config, settings, surrogate_scenario(spec.data, scenario, seed), defense, seed,
                            tuning_key(cell.config_hash, attack_name, cell.round), cell.tuning_dir)
        attack = build_attack(attack_name, **{**config.options, **tuned.params})
        untuned = config.build()
    elif not active:
        attack = config.build()
    wants = attack.others_wanted()
    if wants:
        # E.g. GIML learns its prior from other clients' updates: simulate them, keep only the observations.
        others = [scenario.simulate(defense, generator=torch.Generator().manual_seed(
            stable_seed("meta", seed, i)))[0] for i in range(wants)]
        for a in (attack, untuned):
            if a is not None:
                a.prepare(others)
    return _Prepared(cell, scenario, attack, config.budget, clients, galleries, face_analyzer, analyzer_note,
                     runtime, setup_s, train_info, tuned, untuned)


def _rng(cell: Cell, client: int) -> torch.Generator:
    """The attack start of `client`: the same under every defense (paired comparisons across defenses)."""
    return torch.Generator().manual_seed(stable_seed("attack", cell.attack, cell.seed, *((client,) if client else ())))


def _finish(p: _Prepared, recs: list[Reconstruction], attack_s: float) -> CellResult:
    spec, tuned, scenario = p.cell.spec, p.tuned, p.scenario
    scorers = evaluators.scorers(spec, p.face_analyzer, user_level_run(spec))
    tuning: dict[str, Any] = {}
    if tuned is not None and p.untuned is not None:
        # The same attack at its defaults on the same audited clients and attack starts: the verdict an untuned
        # audit would have given, measured, so a rule that passes untuned and fails tuned is shown as such.
        tuning = {**tuned.record(), UNTUNED: _untuned(p, recs, scorers)}
    return cell_record(CellOutcome(
        cell=p.cell, scenario=scenario_name(spec.data, spec.scenario), attack=p.attack,
        observations=[o for o, _ in p.clients], truths=[t for _, t in p.clients], reconstructions=recs,
        scorers=scorers, galleries=p.galleries,
        timings={"setup_s": p.setup_s, "attack_s": attack_s, **({"tune_s": tuned.time_s} if tuned else {})},
        training=p.train_info, tuning=tuning,
        notes=((p.analyzer_note,) if p.analyzer_note else ()) + ((tuned.note(),) if tuned else ())
        + (scenario.notes if isinstance(scenario, CaptureScenario) else ()),
        model=model_provenance(spec.scenario, sha256(spec.scenario.weights) if spec.scenario.weights else None),
        runtime=p.runtime.record()))


def _attack_clients(p: _Prepared, attack: Attack, *, quiet: bool = False) -> list[Reconstruction]:
    """`attack`'s reconstruction of every client's update, client 0 first."""
    cell, budget = p.cell, p.budget
    recs = []
    for c, (obs, _truth) in enumerate(p.clients):
        bar = _progress_bar(f"{cell.attack} seed {cell.seed}" + (f" client {c}" if len(p.clients) > 1 else "")
                            + ("" if cell.round is None else f" round {cell.round}") + (" (defaults)" if quiet else ""),
                            budget.iterations * budget.restarts, cell.show_progress and not in_worker())
        try:
            recs.append(attack.reconstruct(obs, budget=budget, rng=_rng(cell, c), progress=bar.update))
        finally:
            bar.close()
    return recs


def _untuned(p: _Prepared, tuned_recs: list[Reconstruction], scorers: Scorers) -> dict[str, Any]:
    """The attack at its defaults on the audited clients, scored as the record is: its options, label source,
    metrics, per-image rows and time. When the tuning kept the defaults, the tuned reconstructions are the
    untuned ones (same options, same starts) and are not computed twice."""
    untuned, clients = p.untuned, p.clients
    assert untuned is not None
    same = dict(untuned.params()) == dict(p.attack.params())
    t0 = time.perf_counter()
    recs = tuned_recs if same else _attack_clients(p, untuned, quiet=True)
    attack_s = time.perf_counter() - t0
    truths = [t for _, t in clients if t is not None]
    scored = assess(truths, recs, scorers, p.galleries)
    return {"attack_params": dict(untuned.params()), "label_source": recs[0].label_source,
            "threat": untuned.threat_record(clients[0][0], recs[0].label_source),
            "metrics": dict(scored.metrics), "per_image": [dict(q) for q in scored.per_image],
            "attack_s": attack_s, "same_as_tuned": same}


def run_cell(cell: Cell) -> CellResult:
    """Compute one cell from its own seeds (the same record whichever process or machine runs it)."""
    p = _prepare(cell)
    if isinstance(p, CellResult):
        return p
    t0 = time.perf_counter()
    recs = _attack_clients(p, p.attack)
    return _finish(p, recs, time.perf_counter() - t0)


def run_cell_group(cells: Sequence[Cell]) -> list[CellResult]:
    """Several cells of one attack computed together: each cell is prepared as `run_cell` prepares it, then every
    client of every cell that can be stacked is reconstructed in one solve (`giaudit.attacks.batched`), and
    each cell's record is made as `run_cell` makes it. Cells that cannot be stacked run as `run_cell` runs them.
    Each cell's attack time is its share of the solve."""
    prepared = [_prepare(c) for c in cells]
    ready = [p for p in prepared if isinstance(p, _Prepared)]
    recs: dict[int, list[Reconstruction]] = {}
    share = 0.0
    if ready:
        lead = ready[0]
        t0 = time.perf_counter()
        jobs = [(id(p), obs, _rng(p.cell, c)) for p in ready for c, (obs, _) in enumerate(p.clients)]
        out = reconstruct_many(lead.attack, [o for _, o, _ in jobs], budget=lead.budget,
                               rngs=[r for _, _, r in jobs])
        share = (time.perf_counter() - t0) / len(ready)
        for (key, _o, _r), rec in zip(jobs, out):
            recs.setdefault(key, []).append(rec)
    return [p if isinstance(p, CellResult) else _finish(p, recs[id(p)], share) for p in prepared]


def group_key(cell: Cell) -> tuple | None:
    """What cells must share to be computed together: the attack and its options, the data, scenario, threat
    model and run settings (the defense and the seed may differ: each cell brings its own observations, and the
    solve keeps problems of different architectures, e.g. after DP-SGD's GroupNorm swap, apart). None when the
    cell's attack cannot be stacked (its class, or its options: `why_not_stacked`) or is tuned per cell."""
    spec = cell.spec
    config = spec.attacks[cell.attack]
    if not stacks(ATTACKS[cell.attack]) or config.tune is not None or spec.scenario.capture is not None:
        return None
    if why_not_stacked(config.build(), config.budget) is not None:  # it would run unbatched, one cell at a time
        return None
    raw = spec.raw
    shared = {k: raw.get(k) for k in ("data", "scenario", "threat", "run")}
    return (cell.attack, json.dumps(dict(config.table), sort_keys=True, default=str),
            json.dumps(shared, sort_keys=True, default=str), str(spec.base))
