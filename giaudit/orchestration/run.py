"""The driver: every cell of a spec on an engine, each record written as soon as it arrives.

`run_audit` plans the cells (`giaudit.orchestration.plan`), skips those whose
record is already in the run folder with the same config hash, runs the
federated training of every seed that still has checkpoint cells (one engine
task per seed, `giaudit.orchestration.checkpoints`), then the cells
(`run_cell`) on the engine (`giaudit.engine`: local processes or Ray), and
writes each cell's images and record atomically as it finishes (`write_cell`),
so a crashed or interrupted sweep run again computes only the missing cells.
Only this driver writes files; a cell's result is the same whatever the engine.

`compute_records` is the same driver without a run folder: nothing is
written, the records come back in plan order. `run_and_render` is
`giaudit audit`: the run, the policy verdict when ``output.policy`` is set,
and the HTML / Markdown report.
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy
import torch

from giaudit.attacks.batched import problem_bytes, stacks
from giaudit.config import AuditSpec
from giaudit.engine import Engine, Interrupted, LocalEngine, RayEngine, cores
from giaudit.errors import DataError
from giaudit.io import atomic_write_bytes, check_output_dir
from giaudit.orchestration.cell import build_defense, group_key, run_cell, run_cell_group
from giaudit.orchestration.checkpoints import checkpoint_task
from giaudit.orchestration.plan import Cell, plan_cells
from giaudit.orchestration.record import CellResult
from giaudit.policy import Policy, Verdict, check, load_policy
from giaudit.report import render
from giaudit.results import AuditRecord, ResultsStore
from giaudit.scenario.build import build_scenario, check_scenario, preload
from giaudit.scenario.capture import summary as capture_summary
from giaudit.training import TrainingSettings
from giaudit.version import __version__


def versions() -> dict[str, str]:
    return {"giaudit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def preflight(spec: AuditSpec) -> None:
    """What fails before the first cell: the device (``run.device`` on this machine), the model the cells will
    build (factory, weights, normalisation, classes) and the capture, built once in the driver on the CPU;
    errors name their key. Nothing is written before it."""
    spec.run.runtime()
    check_scenario(spec.data, spec.scenario, spec.threat.model(), spec.base)


def run_cells(spec: AuditSpec, cells: Sequence[Cell], engine: Engine, training: TrainingSettings | None = None,
              show_progress: bool = False) -> Iterator[CellResult]:
    """The results of `cells` (of `spec`) as they finish on `engine`: first the federated training of each seed
    with checkpoint cells, whose checkpoints go into those cells, then the cells."""
    for _part, result in stream_cells([(spec, cells)], engine, training, show_progress):
        yield result


def stream_cells(parts: Sequence[tuple[AuditSpec, Sequence[Cell]]], engine: Engine,
                 training: TrainingSettings | None = None,
                 show_progress: bool = False) -> Iterator[tuple[int, CellResult]]:
    """`run_cells` for the cells of several specs (the presets of a comparison) at once, as ``(part, result)``:
    one stream of tasks, so no worker idles at the end of one spec's cells while the next spec's wait, and cells
    of different specs that can be stacked (`cell_groups`) share a solve."""
    name = parts[0][0].name if len(parts) == 1 else f"{len(parts)} runs"
    for spec, _cells in parts:
        preload(spec.data, spec.scenario)
        runtime = spec.run.runtime()
        if isinstance(engine, RayEngine) and runtime.cuda:
            engine.num_gpus = spec.run.gpu_share  # each task asks Ray for its GPU share
        if isinstance(engine, LocalEngine) and runtime.device.type != "cpu" and engine.workers > 1:
            # Forked workers cannot share a GPU the driver may have touched: one process drives it, cell by cell.
            engine = LocalEngine(1)
    with engine:  # one Ray instance for the training and the cells
        todo: list[Cell] = []
        part_of: dict[int, int] = {}  # id(cell) -> its part
        for p, (spec, cells) in enumerate(parts):
            mine = list(cells)
            to_train = sorted({c.seed for c in mine if c.round is not None})
            if to_train:
                settings = training or TrainingSettings()
                jobs = [(spec, seed, settings) for seed in to_train]
                trained = dict(engine.map(checkpoint_task, jobs, desc=f"{spec.name} training",
                                          show_progress=show_progress))
                # Each round's global model goes to the workers once (Ray's object store), not inside every cell.
                points = {(seed, r): engine.share(ck) for i, seed in enumerate(to_train)
                          for r, ck in trained[i].items()}
                mine = [replace(c, checkpoint=points[c.seed, c.round]) if c.round is not None else c for c in mine]
            part_of.update((id(c), p) for c in mine)
            todo += mine
        # Workers the groups should keep busy: the local processes, a local Ray instance's CPUs, else this machine's.
        groups = cell_groups(todo, getattr(engine, "workers", None) or getattr(engine, "num_cpus", None) or cores())
        if all(len(g) == 1 for g in groups):
            for i, result in engine.map(run_cell, todo, desc=f"{name} cells", show_progress=show_progress):
                yield part_of[id(todo[i])], result
            return
        for i, results in engine.map(run_cell_group, groups, desc=f"{name} cell groups",
                                     show_progress=show_progress):
            for cell, result in zip(groups[i], results):
                yield part_of[id(cell)], result


# [run] batch_cells = "auto": the most cells stacked in one solve for a model of this many parameters or fewer
# (benchmarks/batched_ig.py, 1 thread: LeNet, 9-15 k parameters, 2.5-4.9x faster per problem-iteration at K = 8-32;
# a model above a million parameters is compute-bound and is not stacked).
AUTO_STACK = ((20_000, 32), (200_000, 16), (1_000_000, 8))


# The share of a worker's memory (this machine's memory over its workers) stacked problems may take under "auto".
AUTO_MEMORY_SHARE = 0.25


def auto_stack(spec: AuditSpec, workers: int = 1, attack: str | None = None) -> int:
    """The cells `batch_cells = "auto"` stacks for `spec`'s model: by its parameter count (`AUTO_STACK`), and no
    more than `AUTO_MEMORY_SHARE` of a worker's memory holds (`giaudit.attacks.batched.problem_bytes` per problem
    of `attack`, else of the spec's most demanding stacked attack, each cell's clients and restarts counted)."""
    if spec.scenario.capture is not None:
        return 1
    scen, _held = build_scenario(spec.data, spec.scenario, spec.threat.model(), spec.seeds[0], base=spec.base)
    model = getattr(scen, "model", None)
    if model is None:
        return 1
    n = sum(p.numel() for p in model.parameters())
    k = next((k for limit, k in AUTO_STACK if n <= limit), 1)
    shape, batch = scen.pool.spec.shape, spec.scenario.batch_size
    per_cell = spec.scenario.clients * max(
        (problem_bytes(built, model, shape, batch) * a.budget.restarts for name, a in spec.attacks.items()
         if attack in (None, name) and stacks(type(built := a.build()))), default=0)
    budget = AUTO_MEMORY_SHARE * memory_bytes() / max(1, workers)
    return max(1, min(k, int(budget // max(1, per_cell))))


def memory_bytes() -> int:
    """This machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cell_groups(cells: Sequence[Cell], workers: int) -> list[tuple[Cell, ...]]:
    """`cells` in the groups the engine runs as one task (`run_cell_group`): cells of one attack, its options and
    one scenario (`group_key`; the defense and the seed may differ), at most their spec's `run.batch_cells` each
    ("auto": `auto_stack`, and no fewer groups than workers); every other cell alone. With batch_cells = 1 (the
    default), or none to stack, every cell is its own group.

    Stacked records agree with unbatched ones to float tolerance, not to the bit, and the groups depend on
    which cells are left to compute (a resumed run) and, under "auto", on the workers: that is why stacking
    is asked for, not the default."""
    keyed: dict[tuple, list[Cell]] = {}
    alone: list[tuple[Cell, ...]] = []
    for c in cells:
        key = group_key(c)
        if key is None or (c.spec.run.batch_cells or 1) == 1:
            alone.append((c,))
        else:
            keyed.setdefault(key, []).append(c)
    groups = list(alone)
    for members in keyed.values():
        setting = members[0].spec.run.batch_cells
        size = auto_stack(members[0].spec, workers, members[0].attack) if setting == "auto" else int(setting or 1)
        k = max(1, min(size, -(-len(members) // max(1, workers))))
        groups += [tuple(members[i:i + k]) for i in range(0, len(members), k)]
    return groups


@dataclass
class _Planned:
    """One run folder's part of `run_audits`: its store, its cells, and those still to compute."""

    spec: AuditSpec
    out: Path
    store: ResultsStore
    cells: list[Cell]
    todo: list[Cell]


def _plan(spec: AuditSpec, out_dir: str | Path, defense_label: str | None, training: TrainingSettings | None,
          show_progress: bool) -> _Planned:
    out = check_output_dir(out_dir, "run folder")
    store = ResultsStore.open(out)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store.meta = {**store.meta, "name": spec.name, "config": spec.raw, "versions": versions(),
                  "command": " ".join(sys.argv), "created": store.meta.get("created") or now, "updated": now}
    if spec.scenario.capture is not None:
        store.meta["capture"] = capture_summary(spec.scenario.capture, spec.scenario.deployment_defenses)
    label, _defense = build_defense(spec)
    cells = [replace(c, tuning_dir=str(out / "tuning"))
             for c in plan_cells(spec, defense_label or label, training, show_progress)]
    return _Planned(spec, out, store, cells, [c for c in cells if not store.has(c.record_id, c.config_hash)])


def run_audit(spec: AuditSpec, out_dir: str | Path, *, show_progress: bool = True,
              defense_label: str | None = None, training: TrainingSettings | None = None,
              engine: Engine | None = None) -> ResultsStore:
    """Run every cell of `spec` on `engine` (default: local processes), writing each record as it finishes; cells
    whose record is already in `out_dir` (same id and config hash) are skipped. Return the store.

    With ``scenario.checkpoints`` the federated training (`training` settings) of each seed that still has
    cells to compute runs first, one engine task per seed; its checkpoints go into the cells."""
    return run_audits([(spec, out_dir, defense_label)], show_progress=show_progress, training=training,
                      engine=engine)[0]


def run_audits(runs: Sequence[tuple[AuditSpec, str | Path, str | None]], *, show_progress: bool = True,
               training: TrainingSettings | None = None, engine: Engine | None = None) -> list[ResultsStore]:
    """`run_audit` for several (spec, run folder, defense label) at once (the presets of a comparison): every
    spec is checked before anything is written, then all their cells go to the engine as one stream
    (`stream_cells`), each record into its own run folder as it finishes. Return the stores, in order."""
    planned = [_plan(spec, out, label, training, show_progress) for spec, out, label in runs]
    for p in planned:
        if not p.todo and p.store.unfolded():  # nothing to compute: only records a stopped run left to fold in
            p.store.flush()
    active = [p for p in planned if p.todo]  # a run folder with nothing to compute is left untouched
    if not active:
        return [p.store for p in planned]
    for p in active:  # before the first file is written
        preflight(p.spec)
        check_output_dir(p.out, "run folder", planned_bytes(p.spec, len(p.todo)) + results_bytes(p.store, len(p.todo)))
    engine = engine or LocalEngine()
    try:
        for part, result in stream_cells([(p.spec, p.todo) for p in active], engine, training, show_progress):
            write_cell(active[part].out, active[part].store, result)
    except Interrupted as stop:  # every cell that finished is on disk already: say where, for the resume
        stop.folder = str(active[0].out if len(active) == 1 else Path(os.path.commonpath([p.out for p in active])))
        stop.saved = sum(len(p.store.records) for p in active)
        for p in active:
            _fold(p.store)
        raise
    except OSError as exc:  # disk full, the folder made read-only: what was written stays, atomically
        where = exc.filename or active[0].out
        for p in active:
            _fold(p.store)
        saved = sum(len(p.store.records) for p in active)
        folders = ", ".join(str(p.out) for p in active)
        raise DataError(f"{where}: cannot write ({exc.strerror or exc}); the {saved} record(s) "
                        f"finished so far are kept in {folders}; make room or restore write access, then run the "
                        "same command again to compute only the rest") from None
    for p in active:
        order = {c.record_id: i for i, c in enumerate(p.cells)}
        p.store.records.sort(key=lambda r: order.get(r.record_id, -1))
        p.store.meta["last_run"] = {"engine": engine.name, "cells": len(p.cells),
                                    "computed": [c.record_id for c in p.todo],
                                    **({"nodes": len(nodes)} if (nodes := getattr(engine, "nodes", None)) else {})}
        p.store.flush()
    return [p.store for p in planned]


def _fold(store: ResultsStore) -> None:
    """results.json and the table brought up to date after a run stopped early, where the disk allows: the
    records are on disk in any case (``records/``), and the next run or the report reads them from there."""
    try:
        store.flush()
    except OSError:
        pass


# A record without its images: metrics, per-image rows, a trace of losses (generous: a few KiB in practice).
RECORD_BYTES = 64 * 1024


def planned_bytes(spec: AuditSpec, cells: int) -> int:
    """An upper estimate of the images files of `cells` cells: every client's batch, originals and
    reconstructions, float32 (stored compressed, so usually less)."""
    pixels = spec.data.size ** 2 * (spec.data.channels or 3)
    images = 2 * spec.scenario.batch_size * spec.scenario.clients * pixels * 4
    return cells * (images + RECORD_BYTES)


def results_bytes(store: ResultsStore, cells: int) -> int:
    """results.json with `cells` more records (twice: the temporary copy), and those records' own files until
    results.json folds them in."""
    return (2 * (len(store.records) + cells) + cells) * RECORD_BYTES


def compute_records(spec: AuditSpec, *, show_progress: bool = False, engine: Engine | None = None,
                    training: TrainingSettings | None = None) -> list[AuditRecord]:
    """Every cell of `spec` computed on `engine` without a run folder: nothing is written (the records'
    `images_file` names where `run_audit` would put the images). The records come back in plan order."""
    preflight(spec)
    label, _defense = build_defense(spec)
    cells = plan_cells(spec, label, training, show_progress)
    done = {r.record.record_id: r.record for r in run_cells(spec, cells, engine or LocalEngine(), training,
                                                              show_progress)}
    return [done[c.record_id] for c in cells]


def write_cell(out: Path, store: ResultsStore, result: CellResult) -> None:
    """The driver's side of a finished cell: its images file, then its record (both atomic)."""
    if result.images is not None and result.record.images_file:
        atomic_write_bytes(out / result.record.images_file, result.images)
    store.add(result.record)


def policy_of(spec: AuditSpec) -> Policy | None:
    """The config's ``output.policy``, read and validated (errors name the file and key); None when unset.
    Callers read it before computing anything, so a bad policy fails before the first cell."""
    return load_policy(spec.output.policy) if spec.output.policy else None


def verdict_of(policy: Policy | None, records: Sequence[AuditRecord],
               meta: Mapping[str, Any] | None = None) -> Verdict | None:
    """The records judged by the policy (`meta`: the run folder's, for the DP bounds' pool baseline); None
    without one."""
    return check(records, policy, meta) if policy is not None else None


@dataclass(frozen=True)
class RenderedRun:
    store: ResultsStore
    verdict: Verdict | None
    html: Path
    md: Path


def run_and_render(spec: AuditSpec, out_dir: str | Path, *, show_progress: bool = True,
                   engine: Engine | None = None) -> RenderedRun:
    """`giaudit audit`: run (or resume) the audit into `out_dir`, judge it by the policy, write the report."""
    policy = policy_of(spec)
    store = run_audit(spec, out_dir, show_progress=show_progress, engine=engine)
    verdict = verdict_of(policy, store.records, store.meta)
    html, md = render(store, out_dir, verdict=verdict)
    return RenderedRun(store, verdict, html, md)
