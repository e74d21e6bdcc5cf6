"""The only orchestrator: config -> scenario -> defenses -> attacks -> metrics -> results -> report.

Each (scenario, defense, attack, seed) is one `Cell`, an idempotent task
keyed by its record id and config hash: `run_cell` builds the scenario, draws
the seed's private batch and computes the client's (defended) update, the
attack receives the `Observation`, and only `evaluate` sees the `GroundTruth`.
A cell derives all its randomness from its own seeds, so it gives the same
`AuditRecord` in whichever process or machine an engine (`giaudit.engine`:
local processes or Ray) runs it. The driver writes each record atomically as
soon as it arrives, so a crashed or interrupted sweep run again computes only
the missing cells. The scenario is either simulated (`Scenario`) or a
captured real update (`giaudit.scenario.capture`).
"""
from __future__ import annotations

import hashlib
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy
import torch
from tqdm.auto import tqdm

from giaudit import __version__
from giaudit.attacks import Attack, Budget, build_attack
from giaudit.config import AuditSpec
from giaudit.data import ImageDataset, load_dataset, split_indices
from giaudit.defenses import Chain, build_chain
from giaudit.engine import Engine, LocalEngine, in_worker
from giaudit.io import atomic_write_bytes
from giaudit.metrics.evaluate import evaluate
from giaudit.metrics.faces import FaceBackendUnavailable, get_analyzer, semantic_metrics
from giaudit.metrics.lpips import load_lpips
from giaudit.results import AuditRecord, ResultsStore, config_hash, images_file, images_npz
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import Capability, ClientProtocol, Observation, ThreatModel, disclosed_values


def stable_seed(*parts: Any) -> int:
    """A stable 62-bit seed from parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@lru_cache(maxsize=4)
def _dataset(items: tuple[tuple[str, Any], ...]) -> ImageDataset:
    data = dict(items)
    source = data.pop("source")
    data.pop("holdout", None)
    data.pop("pool_every", None)
    if source != "folder":
        for key in ("label_parser", "label_field", "path", "limit"):
            data.pop(key, None)
    return load_dataset(source, **data)


def load_data(spec: AuditSpec) -> ImageDataset:
    return _dataset(tuple(sorted(spec.data.items())))


def scenario_name(spec: AuditSpec) -> str:
    s = spec.scenario
    if s.get("capture"):
        return f"capture-{Path(s['capture']).name}"
    return f"{spec.data['source']}{spec.data['size']}-{s['model']}-{s['protocol']}-b{s['batch_size']}"


def build_scenario(spec: AuditSpec, seed: int) -> tuple[Scenario, ImageDataset]:
    """The global model (initialised, optionally pretrained) and the client's pool; plus the held-out split."""
    data = load_data(spec)
    split_gen = torch.Generator().manual_seed(stable_seed("split", seed))
    pool_idx, held_idx = split_indices(len(data), spec.data["holdout"], split_gen, spec.data["pool_every"])
    pool, held = data.subset(pool_idx), data.subset(held_idx)
    s = spec.scenario
    gen = torch.Generator().manual_seed(stable_seed("model", seed))
    model = build_model(s["model"], channels=data.spec.channels, num_classes=data.spec.num_classes,
                        size=data.spec.height, width=s.get("width"), generator=gen)
    pretrain(model, pool, s["pretrain_steps"], gen)
    model.train(s["bn_mode"] == "train")
    protocol = ClientProtocol(s["protocol"], s["local_steps"], float(s["local_lr"]), s.get("local_batch_size"))
    return Scenario(model, pool, protocol, s["batch_size"], spec_threat(spec)), held


def spec_threat(spec: AuditSpec) -> ThreatModel:
    t = spec.threat
    return threat_model(batch_size=t["batch_size"], training_details=t["training_details"],
                        surrogate_data=t["surrogate_data"], bn_statistics=t["bn_statistics"],
                        true_labels=t["true_labels"])


def cell_scenario(spec: AuditSpec, seed: int) -> Scenario | CaptureScenario:
    """The simulated client of `spec`, or the captured real update when `scenario.capture` is set."""
    s = spec.scenario
    if s.get("capture"):
        return CaptureScenario.build(s["capture"], s["model_factory"], spec_threat(spec), bn_mode=s["bn_mode"],
                                     base=Path(spec.source).resolve().parent)
    return build_scenario(spec, seed)[0]


def build_defense(spec: AuditSpec) -> tuple[str, Chain]:
    chain = build_chain([dict(d) for d in spec.defenses], where="defenses")
    return chain.name, chain


def threat_summary(threat: ThreatModel, attack: Attack, label_source: str, obs: Observation) -> dict[str, Any]:
    """The capabilities this attack actually used, their SoK letter, and any oracle."""
    used = attack.capabilities_used(obs)
    if label_source == "oracle":
        used.add(Capability.TRUE_LABELS)
    oracles = list(ThreatModel(frozenset(used)).oracles)
    letter = max(ThreatModel(frozenset(used)).sok_class, attack.sok_class)
    return {"sok_class": letter, "granted": sorted(c.value for c in threat.granted),
            "used": sorted(c.value for c in used), "oracles": oracles}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name)


def versions() -> dict[str, str]:
    return {"giaudit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _progress_bar(desc: str, total: int, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False, file=sys.stderr)


@dataclass(frozen=True)
class Cell:
    """One (scenario, defense, attack, seed) cell: an idempotent task keyed by its record id and config hash."""

    spec: AuditSpec
    label: str
    attack: str
    seed: int
    record_id: str
    config_hash: str
    show_progress: bool = False


@dataclass(frozen=True)
class CellResult:
    record: AuditRecord
    images: bytes | None  # the .npz of matched originals and reconstructions; the driver writes it


def plan_cells(spec: AuditSpec, label: str, show_progress: bool = False) -> list[Cell]:
    """Every cell of `spec` under the defense `label`, seed by seed, in the config's attack order."""
    cells = []
    for seed in spec.seeds:
        for attack_name in spec.attacks:
            rid = _safe(f"{spec.name}__{label}__{attack_name}__s{seed}")
            chash = config_hash({**{k: v for k, v in spec.raw.items() if k not in ("seeds", "attacks", "name")},
                                 "attack": {attack_name: dict(spec.attacks[attack_name])}, "seed": seed})
            cells.append(Cell(spec, label, attack_name, seed, rid, chash, show_progress))
    return cells


def run_cell(cell: Cell) -> CellResult:
    """Compute one cell from its own seeds (the same record whichever process or machine runs it)."""
    torch.set_flush_denormal(True)  # denormals slowed some runs 40x (performance.md)
    spec, seed, attack_name = cell.spec, cell.seed, cell.attack
    start = time.perf_counter()
    _label, defense = build_defense(spec)
    scenario = cell_scenario(spec, seed)
    obs, truth = scenario.simulate(defense, generator=torch.Generator().manual_seed(stable_seed("batch", seed)))
    setup_s = time.perf_counter() - start
    budget_kw, options = spec.budget_and_options(attack_name)
    attack = build_attack(attack_name, **options)
    budget = Budget(**budget_kw)
    rng = torch.Generator().manual_seed(stable_seed("attack", attack_name, seed))
    wants = attack.others_wanted()
    if wants:
        # E.g. GIML learns its prior from other clients' updates: simulate them, keep only the observations.
        others = [scenario.simulate(defense, generator=torch.Generator().manual_seed(
            stable_seed("meta", seed, i)))[0] for i in range(wants)]
        attack.prepare(others)
    bar = _progress_bar(f"{attack_name} seed {seed}", budget.iterations * budget.restarts,
                        cell.show_progress and not in_worker())
    t0 = time.perf_counter()
    try:
        rec = attack.reconstruct(obs, budget=budget, rng=rng, progress=bar.update)
    finally:
        bar.close()
    attack_s = time.perf_counter() - t0
    analyzer, analyzer_note = _analyzer(spec)
    return _record(spec, cell.record_id, cell.config_hash, scenario_name(spec), cell.label, attack_name, seed,
                   attack, obs, truth, rec, _lpips(spec), analyzer, {"setup_s": setup_s, "attack_s": attack_s},
                   analyzer_note)


def run_audit(spec: AuditSpec, out_dir: str | Path, *, show_progress: bool = True,
              defense_label: str | None = None, engine: Engine | None = None) -> ResultsStore:
    """Run every (attack, seed) cell of `spec` on `engine` (default: local processes), writing each record as it
    finishes; cells whose record is already in `out_dir` (same id and config hash) are skipped. Return the store."""
    out = Path(out_dir)
    store = ResultsStore.open(out)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store.meta = {**store.meta, "name": spec.name, "config": spec.raw, "versions": versions(),
                  "command": " ".join(sys.argv), "created": store.meta.get("created") or now, "updated": now}
    label, _defense = build_defense(spec)
    cells = plan_cells(spec, defense_label or label, show_progress)
    todo = [c for c in cells if not store.has(c.record_id, c.config_hash)]
    engine = engine or LocalEngine()
    if not todo:
        return store  # nothing to do: the run folder is left untouched
    _warm(spec)
    for _i, result in engine.map(run_cell, todo, desc=f"{spec.name} cells", show_progress=show_progress):
        write_cell(out, store, result)
    order = {c.record_id: i for i, c in enumerate(cells)}
    store.records.sort(key=lambda r: order.get(r.record_id, -1))
    store.meta["last_run"] = {"engine": engine.name, "cells": len(cells),
                              "computed": [c.record_id for c in todo]}
    store.flush()
    return store


def write_cell(out: Path, store: ResultsStore, result: CellResult) -> None:
    """The driver's side of a finished cell: its images file, then its record (both atomic)."""
    if result.images is not None and result.record.images_file:
        atomic_write_bytes(out / result.record.images_file, result.images)
    store.add(result.record)


def _warm(spec: AuditSpec) -> None:
    """Load the dataset once in the driver, so forked local workers share it instead of each reading it."""
    if not spec.scenario.get("capture"):
        load_data(spec)


def _lpips(spec: AuditSpec) -> Any:
    if not spec.output.get("lpips", True):
        return None
    return load_lpips()  # cached per process and weights file by giaudit.metrics.lpips


def _analyzer(spec: AuditSpec) -> tuple[Any, str | None]:
    """The face analyzer the config asks for, or (None, why not) when its backend is not installed."""
    backend = spec.output.get("semantic")
    if not backend:
        return None, None
    try:
        return get_analyzer(backend), None
    except FaceBackendUnavailable as exc:
        return None, f"semantic metrics unavailable: {exc}"


def _record(spec: AuditSpec, rid: str, chash: str, scen_name: str, label: str, attack_name: str,
            seed: int, attack: Attack, obs: Observation, truth: Any, rec: Any, lpips_metric: Any, analyzer: Any,
            timings: dict[str, float], analyzer_note: str | None = None) -> CellResult:
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    per_image: list[dict[str, Any]] = []
    notes = [analyzer_note] if analyzer_note else []
    images: bytes | None = None
    if truth is None:  # a capture without the client's batch: the server's view only, nothing to compare with
        notes.append("no ground truth: the capture holds no client batch (capture with store_batch=True, as the "
                     "data owner, to measure the leakage)")
    else:
        ev = evaluate(rec, truth, lpips=lpips_metric)
        metrics = dict(ev.aggregate)
        per_image = [dict(p) for p in ev.per_image]
        notes = list(ev.notes) + notes
        if analyzer is not None:
            sem = semantic_metrics(ev.original, ev.reconstruction, analyzer=analyzer, labels_meta=[
                truth.meta[p["truth_index"]] for p in per_image] if truth.meta else None)
            metrics.update(sem.aggregate)
            metrics.update({f"reference_{k}": v for k, v in sem.reference.items()})
            for row, extra in zip(per_image, sem.per_image):
                row.update(extra)
            notes.extend(sem.notes)
        images = images_npz(ev.original, ev.reconstruction)
    tr = rec.trace
    threat = threat_summary(obs.threat, attack, rec.label_source, obs)
    return CellResult(AuditRecord(
        record_id=rid, config_hash=chash, scenario=scen_name, defense=label, attack=attack_name, seed=seed,
        threat=threat, attack_params=dict(attack.params()), label_source=rec.label_source, metrics=metrics,
        per_image=tuple(per_image),
        timings={**timings, "metrics_s": time.perf_counter() - t0, "iterations": tr.iterations,
                 "restarts": len(tr.restart_losses), "workers": tr.extra.get("workers", 1)},
        trace={"losses": list(tr.losses), "restart_losses": list(tr.restart_losses), "best_restart": tr.best_restart,
               "stopped_early": tr.stopped_early,
               **{k: v for k, v in tr.extra.items() if k not in ("workers", "label_source")}},
        disclosed=disclosed_values(obs.disclosed), notes=tuple(notes),
        images_file=images_file(rid) if images is not None else None), images)
