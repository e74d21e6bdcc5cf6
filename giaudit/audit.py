"""The only orchestrator: config -> scenario -> defenses -> attacks -> metrics -> results -> report.

Each (scenario, defense, attack, seed[, checkpoint round]) is one `Cell`, an
idempotent task keyed by its record id and config hash: `run_cell` builds the
scenario, puts in the global model of its training round when the config sets
``scenario.checkpoints``, draws the seed's ``clients_per_seed`` private
batches and computes each client's (defended) update, the attack receives
each `Observation`, and only `evaluate` sees the `GroundTruth` (plus the
re-identification gallery and attribute classifiers when configured). A cell
derives all its randomness from its own seeds, so it gives the same
`AuditRecord` in whichever process or machine an engine (`giaudit.engine`:
local processes or Ray) runs it. The federated training that the checkpoints
come from is one task per seed, run before its cells. The driver writes each
record atomically as soon as it arrives, so a crashed or interrupted sweep
run again computes only the missing cells. The scenario is simulated (the
classifier client `Scenario` or the federated DDPM client
`DiffusionScenario`) or a captured real update (`giaudit.scenario.capture`).
"""
from __future__ import annotations

import copy
import hashlib
import platform
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy
import torch
from tqdm.auto import tqdm

from giaudit import __version__
from giaudit.attacks import ATTACKS, Attack, Budget, build_attack
from giaudit.config import AuditSpec
from giaudit.data import ImageDataset, load_dataset, split_indices
from giaudit.defenses import Chain, build_chain
from giaudit.engine import Engine, LocalEngine, in_worker
from giaudit.io import atomic_write_bytes
from giaudit.metrics.attributes import AttributeClassifier, score_attributes
from giaudit.metrics.evaluate import distinct_rows, evaluate
from giaudit.metrics.faces import (
    FaceBackendUnavailable,
    Gallery,
    get_analyzer,
    identity_gallery,
    originals_gallery,
    semantic_metrics,
)
from giaudit.metrics.lpips import load_lpips
from giaudit.results import AuditRecord, ResultsStore, config_hash, images_file, images_npz
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.client import Scenario, pretrain
from giaudit.scenario.diffusion import DiffusionScenario, diffusion_global_model
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.training import TrainingRun, TrainingSettings, stable_seed, train
from giaudit.types import Capability, ClientProtocol, Observation, ThreatModel, disclosed_values

# The classifier client (FedSGD / FedAvg) or the federated DDPM client (issue 10): both simulate().
AnyScenario = Scenario | DiffusionScenario


@lru_cache(maxsize=4)
def _dataset(items: tuple[tuple[str, Any], ...]) -> ImageDataset:
    data = dict(items)
    source = data.pop("source")
    data.pop("holdout", None)
    data.pop("pool_every", None)
    if source != "folder":
        for key in ("label_parser", "label_field", "path") + (("limit",) if source != "lfw_subset" else ()):
            data.pop(key, None)
    return load_dataset(source, **data)


def load_data(spec: AuditSpec) -> ImageDataset:
    return _dataset(tuple(sorted(spec.data.items())))


def scenario_name(spec: AuditSpec) -> str:
    s = spec.scenario
    if s.get("capture"):
        return f"capture-{Path(s['capture']).name}"
    return f"{spec.data['source']}{spec.data['size']}-{s['model']}-{s['protocol']}-b{s['batch_size']}"


def build_scenario(spec: AuditSpec, seed: int) -> tuple[AnyScenario, ImageDataset]:
    """The global model (initialised, optionally pretrained) and the client's pool; plus the held-out split."""
    data = load_data(spec)
    split_gen = torch.Generator().manual_seed(stable_seed("split", seed))
    pool_idx, held_idx = split_indices(len(data), spec.data["holdout"], split_gen, spec.data["pool_every"])
    pool, held = data.subset(pool_idx), data.subset(held_idx)
    s = spec.scenario
    gen = torch.Generator().manual_seed(stable_seed("model", seed))
    threat = spec_threat(spec)
    protocol = ClientProtocol(s["protocol"], s["local_steps"], float(s["local_lr"]), s.get("local_batch_size"))
    if s["model"] == "ddpm_unet":
        unet, schedule = diffusion_global_model(data.spec, s.get("diffusion_prior"), s.get("width"),
                                                s["pretrain_steps"], gen)
        return DiffusionScenario(unet, schedule, pool, protocol, s["batch_size"], threat, s["client_data"]), held
    model = build_model(s["model"], channels=data.spec.channels, num_classes=data.spec.num_classes,
                        size=data.spec.height, width=s.get("width"), generator=gen)
    pretrain(model, pool, s["pretrain_steps"], gen)
    model.train(s["bn_mode"] == "train")
    return Scenario(model, pool, protocol, s["batch_size"], threat, s["client_data"]), held


def spec_threat(spec: AuditSpec) -> ThreatModel:
    return threat_model(**spec.threat)


def cell_scenario(spec: AuditSpec, seed: int) -> AnyScenario | CaptureScenario:
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
class Checkpoint:
    """The global model of one round of the federated training (from the seed's training task)."""

    round: int
    state: dict[str, torch.Tensor]
    held_out_accuracy: float | None


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
    checkpoint: Checkpoint | None = None
    show_progress: bool = False


@dataclass(frozen=True)
class CellResult:
    record: AuditRecord
    images: bytes | None  # the .npz of matched originals and reconstructions; the driver writes it


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
    cells = []
    for seed in spec.seeds:
        for round_ in checkpoints(spec):
            for attack_name in spec.attacks:
                at = "" if round_ is None else f"__r{round_}"
                rid = _safe(f"{spec.name}__{label}__{attack_name}__s{seed}{at}")
                chash = config_hash({**{k: v for k, v in spec.raw.items() if k not in ("seeds", "attacks", "name")},
                                     "attack": {attack_name: dict(spec.attacks[attack_name])}, "seed": seed,
                                     **user,
                                     **({} if round_ is None else {"round": round_, "training": training.as_dict()})})
                cells.append(Cell(spec, label, attack_name, seed, rid, chash, round_,
                                  training if round_ is not None else None, show_progress=show_progress))
    return cells


def run_cell(cell: Cell) -> CellResult:
    """Compute one cell from its own seeds (the same record whichever process or machine runs it)."""
    torch.set_flush_denormal(True)  # denormals slowed some runs 40x (performance.md)
    spec, seed, attack_name = cell.spec, cell.seed, cell.attack
    start = time.perf_counter()
    _label, defense = build_defense(spec)
    analyzer, analyzer_note = _analyzer(spec)
    scenario = cell_scenario(spec, seed)
    train_info: dict[str, Any] = {}
    if cell.round is not None:
        checkpoint = cell.checkpoint or seed_checkpoints(spec, seed, cell.training or TrainingSettings())[cell.round]
        train_info = at_checkpoint(scenario, checkpoint)
    clients = simulate_clients(scenario, defense, seed, clients_per_seed(spec))
    galleries = [_gallery(spec, analyzer, scenario, t, seed) if analyzer is not None and t is not None else None
                 for _, t in clients]
    setup_s = time.perf_counter() - start
    budget_kw, options = spec.budget_and_options(attack_name)
    attack = build_attack(attack_name, **options)
    budget = Budget(**budget_kw)
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
    return _record(spec, cell.record_id, cell.config_hash, scenario_name(spec), cell.label, attack_name, seed,
                   attack, [o for o, _ in clients], [t for _, t in clients], recs, _lpips(spec), analyzer,
                   {"setup_s": setup_s, "attack_s": attack_s}, analyzer_note, train_info, galleries=galleries,
                   classifiers=_classifiers(spec), user_level=user_level_run(spec))


def run_audit(spec: AuditSpec, out_dir: str | Path, *, show_progress: bool = True,
              defense_label: str | None = None, training: TrainingSettings | None = None,
              engine: Engine | None = None) -> ResultsStore:
    """Run every cell of `spec` on `engine` (default: local processes), writing each record as it finishes; cells
    whose record is already in `out_dir` (same id and config hash) are skipped. Return the store.

    With ``scenario.checkpoints`` the federated training (`training` settings) of each seed that still has
    cells to compute runs first, one engine task per seed; its checkpoints go into the cells."""
    out = Path(out_dir)
    store = ResultsStore.open(out)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store.meta = {**store.meta, "name": spec.name, "config": spec.raw, "versions": versions(),
                  "command": " ".join(sys.argv), "created": store.meta.get("created") or now, "updated": now}
    label, _defense = build_defense(spec)
    cells = plan_cells(spec, defense_label or label, training, show_progress)
    todo = [c for c in cells if not store.has(c.record_id, c.config_hash)]
    if not todo:
        return store  # nothing to do: the run folder is left untouched
    engine = engine or LocalEngine()
    _warm(spec)
    with engine:  # one Ray instance for the training and the cells
        to_train = sorted({c.seed for c in todo if c.round is not None})
        if to_train:
            settings = training or TrainingSettings()
            jobs = [(spec, seed, settings) for seed in to_train]
            trained = dict(engine.map(_checkpoint_task, jobs, desc=f"{spec.name} training",
                                      show_progress=show_progress))
            points = {seed: trained[i] for i, seed in enumerate(to_train)}
            todo = [replace(c, checkpoint=points[c.seed][c.round]) if c.round is not None else c for c in todo]
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


# ---- several private batches per seed, and attacks at checkpoints of the federated training -------------------

def clients_per_seed(spec: AuditSpec) -> int:
    return int(spec.scenario.get("clients_per_seed", 1))


def checkpoints(spec: AuditSpec) -> list[int | None]:
    """The training rounds whose update is attacked; [None]: the scenario's (initial or pretrained) model."""
    rounds = spec.scenario.get("checkpoints")
    return [None] if not rounds else [int(r) for r in rounds]


def simulate_clients(scenario: AnyScenario | CaptureScenario, defense: Chain, seed: int,
                     n: int) -> list[tuple[Observation, Any]]:
    """`n` clients' observations and private batches for one seed (client 0 draws the batch a one-client audit
    draws, so `clients_per_seed = 1` reproduces earlier runs)."""
    return [scenario.simulate(defense, generator=torch.Generator().manual_seed(
        stable_seed("batch", seed, *((c,) if c else ())))) for c in range(n)]


def training_data(spec: AuditSpec, seed: int) -> tuple[AnyScenario, ImageDataset, ImageDataset]:
    """The scenario, the federation's training data (every image not held out: the audited client's pool and
    the other clients' data) and the held-out split the accuracy is measured on."""
    scenario, held = build_scenario(spec, seed)
    data = load_data(spec)
    split_gen = torch.Generator().manual_seed(stable_seed("split", seed))
    _pool, held_idx = split_indices(len(data), spec.data["holdout"], split_gen, spec.data["pool_every"])
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[held_idx] = False
    return scenario, data.subset(torch.nonzero(mask).flatten()), held


def checkpoint_training(spec: AuditSpec, seed: int, settings: TrainingSettings) -> TrainingRun:
    """The federated training (the configured defenses on every client) up to the last checkpoint."""
    scenario, train_set, held = training_data(spec, seed)
    rounds = [int(r) for r in spec.scenario["checkpoints"]]
    return train(scenario.model, train_set, held, scenario.protocol, scenario.batch_size,
                 [dict(d) for d in spec.defenses], settings, seed, rounds=max(rounds), keep=rounds)


def seed_checkpoints(spec: AuditSpec, seed: int, settings: TrainingSettings) -> dict[int, Checkpoint]:
    """The checkpoints of one seed's training: the global model's state and held-out accuracy per round."""
    run = checkpoint_training(spec, seed, settings)
    return {r: Checkpoint(r, run.states[r], run.accuracy_at(r)) for r in sorted(run.states)}


def _checkpoint_task(job: tuple[AuditSpec, int, TrainingSettings]) -> dict[int, Checkpoint]:
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


def _lpips(spec: AuditSpec) -> Any:
    if not spec.output.get("lpips", True):
        return None
    return load_lpips()  # cached per process and weights file by giaudit.metrics.lpips


@lru_cache(maxsize=8)
def _load_classifier(folder: str) -> AttributeClassifier:
    return AttributeClassifier.load(folder)


def _classifiers(spec: AuditSpec) -> dict[str, AttributeClassifier]:
    """The configured attribute classifiers (loaded once per process)."""
    return {name: _load_classifier(folder) for name, folder in (spec.output.get("attributes") or {}).items()}


def _analyzer(spec: AuditSpec) -> tuple[Any, str | None]:
    """The face analyzer the config asks for, or (None, why not) when its backend is not installed."""
    backend = spec.output.get("semantic")
    if not backend:
        return None, None
    try:
        return get_analyzer(backend), None
    except FaceBackendUnavailable as exc:
        return None, f"semantic metrics unavailable: {exc}"


def has_identities(spec: AuditSpec) -> bool:
    """The data's labels are people (one subfolder per person, as ORL): re-identify against identities."""
    return spec.data["source"] == "folder" and spec.data.get("label_parser") == "subfolder"


@lru_cache(maxsize=2)
def _identity_gallery(analyzer: Any, items: tuple[tuple[str, Any], ...]) -> Gallery:
    data = _dataset(items)
    pool_every = int(dict(items)["pool_every"])
    idx = torch.arange(len(data))
    outside = idx[idx % pool_every != 0] if pool_every > 1 else idx
    return identity_gallery(analyzer, data.images[outside].numpy(), data.labels[outside].tolist())


def _gallery(spec: AuditSpec, analyzer: Any, scenario: AnyScenario | CaptureScenario, truth: Any,
             seed: int) -> Gallery | None:
    """Re-identification candidates for this batch (None when the backend has no identity model, or for a
    capture: it holds no pool to draw other people from)."""
    if "identity" not in analyzer.provides or isinstance(scenario, CaptureScenario):
        return None
    if has_identities(spec):
        # Enrolment photos: images outside the client pool (every photo but the attacked ones when pool_every = 1).
        return _identity_gallery(analyzer, tuple(sorted(spec.data.items())))
    n = int(spec.output.get("reid_gallery") or 100)
    pool = scenario.pool.images
    gen = torch.Generator().manual_seed(stable_seed("gallery", seed))
    order = torch.randperm(len(pool), generator=gen)
    batch = truth.images.reshape(truth.images.shape[0], -1)
    keep = [int(i) for i in order if not bool((pool[i].reshape(1, -1) == batch).all(1).any())][: n - 1]
    if not keep:
        return None
    return originals_gallery(analyzer, pool[keep].numpy(), len(keep) + 1)


def _evaluate_one(truth: Any, rec: Any, lpips_metric: Any, analyzer: Any, *, gallery: Gallery | None = None,
                  identities: bool = False, classifiers: dict[str, AttributeClassifier] | None = None,
                  user_level: bool = False) -> tuple[dict[str, float], list[dict[str, Any]], list[str], Any]:
    ev = evaluate(rec, truth, lpips=lpips_metric, user_level=user_level)
    metrics = dict(ev.aggregate)
    per_image = [dict(p) for p in ev.per_image]
    notes = list(ev.notes)
    metas = [truth.meta[p["truth_index"]] for p in per_image] if truth.meta else []
    labels = [int(truth.labels[p["truth_index"]]) for p in per_image]
    if analyzer is not None:
        sem = semantic_metrics(ev.original, ev.reconstruction, analyzer=analyzer, labels_meta=metas or None,
                               gallery=gallery, identities=labels if identities else None)
        metrics.update(sem.aggregate)
        metrics.update({f"reference_{k}": v for k, v in sem.reference.items()})
        for row, extra in zip(per_image, sem.per_image):
            row.update(extra)
        notes.extend(sem.notes)
    if classifiers:
        agg, rows, ref, attr_notes = score_attributes(ev.original, ev.reconstruction, metas, labels, classifiers)
        metrics.update(agg)
        metrics.update({f"reference_{k}": v for k, v in ref.items()})
        for row, extra in zip(per_image, rows):
            row.update(extra)
        notes.extend(attr_notes)
    if user_level and (analyzer is not None or classifiers):
        metrics.update(_user_level_semantics(ev, labels, metas, analyzer, gallery, identities, classifiers))
    for row, img in zip(per_image, ev.original):
        # Identifies the private image, so comparisons pair the same image across defenses.
        row["image_key"] = hashlib.sha256(numpy.ascontiguousarray(img).tobytes()).hexdigest()[:16]
    return metrics, per_image, notes, ev


def _user_level_semantics(ev: Any, labels: list[int], metas: list[dict[str, Any]], analyzer: Any,
                          gallery: Gallery | None, identities: bool,
                          classifiers: dict[str, AttributeClassifier] | None) -> dict[str, float]:
    """The semantic and attribute scores over every (distinct reconstruction, original) pair, user_-prefixed:
    what a user-level attack claims (one image stands for the whole batch), applied to every attack of the run
    so sample-level baselines are scored the same way."""
    keep = distinct_rows(ev.reconstruction)
    rec, orig = ev.reconstruction[keep], ev.original
    out: dict[str, float] = {}
    if analyzer is not None:
        sem = semantic_metrics(orig, rec, analyzer=analyzer, labels_meta=metas or None, user_level=True,
                               gallery=gallery, identities=labels if identities else None)
        out.update(sem.aggregate)
    if classifiers:
        n = len(orig)
        pairs_rec = numpy.repeat(rec, n, axis=0)
        pairs_orig = numpy.tile(orig, (len(keep), 1, 1, 1))
        agg, _, _, _ = score_attributes(pairs_orig, pairs_rec, metas * len(keep), labels * len(keep),
                                        classifiers)
        out.update(agg)
    # Counts and chance levels are not leakage measured over pairs: they keep their sample-level names only.
    return {f"user_{k}": v for k, v in out.items() if not k.endswith(("_chance", "_gallery_size", "_scored"))}


_MIN_IS_WORST = ("mse_worst", "lpips_worst", "age_abs_error_worst")


def _merge_metrics(parts: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """Aggregates over several clients' images: means and rates weighted by images, worst cases over all."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        vals = [(p[key], n) for p, n in zip(parts, sizes) if key in p and p[key] is not None]
        if key.endswith("_worst"):
            out[key] = (min if key in _MIN_IS_WORST else max)(v for v, _ in vals)
        elif key in ("reid_scored", "reference_reid_scored"):  # counts add up (rates are weighted below)
            out[key] = sum(v for v, _ in vals)
        elif key in ("reid_gallery_size", "reference_reid_gallery_size"):
            out[key] = min(v for v, _ in vals)
        else:
            out[key] = sum(v * n for v, n in vals) / max(sum(n for _, n in vals), 1)
    return out


def _record(spec: AuditSpec, rid: str, chash: str, scen_name: str, label: str, attack_name: str,
            seed: int, attack: Attack, obs_list: list[Observation], truths: list[Any], recs: list[Any],
            lpips_metric: Any, analyzer: Any, timings: dict[str, float], analyzer_note: str | None = None,
            training: dict[str, Any] | None = None, *, galleries: list[Gallery | None] | None = None,
            classifiers: dict[str, AttributeClassifier] | None = None, user_level: bool = False) -> CellResult:
    t0 = time.perf_counter()
    parts, per_image, notes, originals, reconstructions = [], [], [], [], []
    metrics: dict[str, Any] = {}
    images: bytes | None = None
    if any(t is None for t in truths):  # a capture without the client's batch: the server's view only
        notes.append("no ground truth: the capture holds no client batch (capture with store_batch=True, as the "
                     "data owner, to measure the leakage)")
    else:
        for c, (truth, rec) in enumerate(zip(truths, recs)):
            m, rows, n, ev = _evaluate_one(truth, rec, lpips_metric, analyzer,
                                           gallery=galleries[c] if galleries else None,
                                           identities=has_identities(spec), classifiers=classifiers,
                                           user_level=user_level)
            parts.append(m)
            per_image += [{**row, "client": c} if len(recs) > 1 else row for row in rows]
            notes += [x for x in n if x not in notes]
            originals.append(ev.original)
            reconstructions.append(ev.reconstruction)
        metrics = _merge_metrics(parts, [len(t.labels) for t in truths])
        if len(recs) > 1:
            per_image.sort(key=lambda p: (p["mse"], -p["ssim"], p["client"], p["truth_index"]))
            for r, row in enumerate(per_image):
                row["rank"] = r + 1
        images = images_npz(numpy.concatenate(originals), numpy.concatenate(reconstructions))
    notes += [analyzer_note] if analyzer_note else []
    obs, rec = obs_list[0], recs[0]
    tr = rec.trace
    threat = threat_summary(obs.threat, attack, rec.label_source, obs)
    return CellResult(AuditRecord(
        record_id=rid, config_hash=chash, scenario=scen_name, defense=label, attack=attack_name, seed=seed,
        threat=threat, attack_params=dict(attack.params()), label_source=rec.label_source, metrics=metrics,
        per_image=tuple(per_image),
        timings={**timings, "metrics_s": time.perf_counter() - t0, "iterations": tr.iterations,
                 "restarts": len(tr.restart_losses), "workers": tr.extra.get("workers", 1)},
        trace={"losses": list(tr.losses), "restart_losses": list(tr.restart_losses), "best_restart": tr.best_restart,
               "stopped_early": tr.stopped_early, **({"clients": len(recs)} if len(recs) > 1 else {}),
               **{k: v for k, v in tr.extra.items() if k not in ("workers", "label_source")}},
        disclosed=disclosed_values(obs.disclosed), notes=tuple(notes),
        images_file=images_file(rid) if images is not None else None, training=dict(training or {})), images)
