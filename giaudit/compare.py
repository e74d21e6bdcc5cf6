"""`giaudit compare`: the same scenario and attacks under each defense preset, on privacy and utility.

For every preset (a ``label`` and ``[[defenses]]`` tables, see
`giaudit.defenses.registry.load_defense_file`) the base audit config (default:
the embedded demo) is run through `giaudit.audit.run_audit` into
``out_dir/<label>/`` (resumable: finished records are skipped), and the
defense's utility is measured per seed (`giaudit.utility`, cached in
``out_dir/<label>/utility.json``). The comparison is computed from the saved
records only (no metric is recomputed): one row per defense x attack with
PSNR / SSIM / LPIPS mean and worst case (the most leaked image over all
seeds), label accuracy, epsilon where the defense defines one, and utility,
each mean with a 95 % Student-t confidence half-width over seeds. Written to
``out_dir``: ``compare.csv`` (+ ``compare.parquet``), ``compare.md``,
``compare.html`` (with the privacy-utility plot embedded) and
``compare_privacy_utility.png``.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from giaudit.attacks import ATTACKS
from giaudit.audit import run_audit
from giaudit.config import demo_config_path, load_config
from giaudit.defenses import load_defense_file
from giaudit.engine import Engine, LocalEngine
from giaudit.errors import ConfigError
from giaudit.io import atomic_write_text
from giaudit.report.compare import render_compare
from giaudit.results import AuditRecord, config_hash, disclosed_value
from giaudit.utility import UtilitySettings, utility_for_spec

METRICS = (  # (column prefix, record metric for the mean, record metric for the worst case, worst = max?)
    ("psnr_db", "psnr_db_mean", "psnr_db_worst", True),
    ("ssim", "ssim_mean", "ssim_worst", True),
    ("lpips", "lpips_mean", "lpips_worst", False),
)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval (nan for one value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    n = len(vals)
    m = sum(vals) / n
    if n < 2:
        return m, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", label).strip("-") or "defense"


def summarise(records: Sequence[AuditRecord], utilities: Mapping[str, Sequence[Mapping[str, Any]]],
              order: Sequence[str], attacks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per defense x attack (in preset order, then attack order) from saved records."""
    rows = []
    for label in order:
        util = list(utilities.get(label, []))
        acc_m, acc_ci = mean_ci([u["accuracy"] for u in util])
        base_m, _ = mean_ci([u["baseline_accuracy"] for u in util])
        drop_m, drop_ci = mean_ci([u["baseline_accuracy"] - u["accuracy"] for u in util])
        for attack in attacks:
            recs = sorted((r for r in records if r.defense == label and r.attack == attack), key=lambda r: r.seed)
            if not recs:
                continue
            row: dict[str, Any] = {"defense": label, "attack": attack, "seeds": len(recs),
                                   "sok_class": recs[0].threat.get("sok_class")}
            for prefix, mean_key, worst_key, worst_is_max in METRICS:
                vals = [r.metrics[mean_key] for r in recs if mean_key in r.metrics]
                row[f"{prefix}_mean"], row[f"{prefix}_ci95"] = mean_ci(vals)
                worst = [r.metrics[worst_key] for r in recs if worst_key in r.metrics]
                row[f"{prefix}_worst"] = (max(worst) if worst_is_max else min(worst)) if worst else math.nan
            row["label_accuracy_mean"], row["label_accuracy_ci95"] = mean_ci(
                [r.metrics["label_accuracy"] for r in recs if "label_accuracy" in r.metrics])
            for key in ("epsilon", "delta"):
                found = [v for v in (disclosed_value(r, key) for r in recs) if v is not None]
                row[key] = float(found[0]) if found else None
            row["utility_accuracy_mean"], row["utility_accuracy_ci95"] = acc_m, acc_ci
            row["utility_baseline_accuracy"] = base_m
            row["utility_drop_mean"], row["utility_drop_ci95"] = drop_m, drop_ci
            row["attack_s_mean"] = mean_ci([r.timings.get("attack_s", math.nan) for r in recs])[0]
            rows.append(row)
    return rows


def _select_attacks(spec: Any, attacks: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    if not attacks:
        return {k: dict(v) for k, v in spec.attacks.items()}
    out = {}
    for name in attacks:
        if name in spec.attacks:
            out[name] = dict(spec.attacks[name])
        elif name in ATTACKS:
            out[name] = {}  # the attack's defaults
        else:
            raise ConfigError(f"--attacks: unknown attack {name!r}; known: {', '.join(ATTACKS.names())}")
    return out


def _utility_key(spec: Any, tables: list[dict[str, Any]], seed: int, settings: UtilitySettings,
                 baseline: float | None) -> str:
    return config_hash({"data": dict(spec.data), "scenario": dict(spec.scenario), "defenses": tables,
                        "settings": settings.__dict__, "seed": seed, "baseline": baseline})


def _utility_task(job: tuple[Any, list[dict[str, Any]], int, UtilitySettings, float | None]) -> dict[str, Any]:
    """One utility training (an engine task: the same result in any process)."""
    spec, tables, seed, settings, baseline = job
    return utility_for_spec(spec, tables, seed, settings, baseline_accuracy=baseline)


def _utilities(engine: Engine, jobs: list[tuple[Any, list[dict[str, Any]], int, UtilitySettings, Path,
                                                float | None]],
               show_progress: bool) -> list[dict[str, Any]]:
    """Each job's utility, cached in its run_dir/utility.json (keyed by a hash of what it depends on); the
    missing ones run as engine tasks and only the driver writes the caches."""
    caches: dict[Path, dict[str, Any]] = {}
    keys = []
    for spec, tables, seed, settings, run_dir, baseline in jobs:
        path = run_dir / "utility.json"
        if path not in caches:
            caches[path] = json.loads(path.read_text()) if path.is_file() else {}
        keys.append((path, _utility_key(spec, tables, seed, settings, baseline)))
    missing = [i for i, (path, key) in enumerate(keys) if key not in caches[path]]
    tasks = [(jobs[i][0], jobs[i][1], jobs[i][2], jobs[i][3], jobs[i][5]) for i in missing]
    for j, result in engine.map(_utility_task, tasks, desc="utility", show_progress=show_progress):
        path, key = keys[missing[j]]
        caches[path][key] = result
        atomic_write_text(path, json.dumps(caches[path], indent=1))
    return [caches[path][key] for path, key in keys]


def run_compare(defense_files: list[Path], *, base_config: Path | None = None, attacks: list[str] | None = None,
                seeds: int = 3, out_dir: Path, show_progress: bool = True,
                utility: UtilitySettings | None = None, engine: Engine | None = None) -> Path:
    """Run every preset on the same scenario, measure utility, write the comparison; return compare.html."""
    if not defense_files:
        raise ConfigError("compare: pass at least one defense preset (e.g. defenses/*.toml)")
    if seeds < 1:
        raise ConfigError("--seeds: must be >= 1")
    presets = [load_defense_file(f) for f in defense_files]  # every preset is validated before anything runs
    labels = [label for label, _ in presets]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(f"compare: label {dupes[0]!r} is used by two presets; labels must be unique")
    base = load_config(base_config) if base_config is not None else load_config(demo_config_path())
    chosen = _select_attacks(base, attacks)
    spec = base.replace(seeds=list(range(seeds)), attacks=chosen)
    settings = utility or UtilitySettings()
    out = Path(out_dir)
    start = time.perf_counter()

    engine = engine or LocalEngine()
    with engine:  # one Ray instance (or cluster connection) for the whole comparison
        base_dir = out / "_utility_baseline"
        base_utils = _utilities(engine, [(spec, [], seed, settings, base_dir, None) for seed in spec.seeds],
                                show_progress)
        baseline = {seed: u["accuracy"] for seed, u in zip(spec.seeds, base_utils)}

        records: list[AuditRecord] = []
        utilities: dict[str, list[dict[str, Any]]] = {}
        timings: dict[str, float] = {}
        for label, tables in presets:
            t0 = time.perf_counter()
            run_dir = out / safe_label(label)
            store = run_audit(spec.replace(defenses=tables), run_dir, show_progress=show_progress,
                              defense_label=label, engine=engine)
            records += [r for r in store.records
                        if r.seed in spec.seeds and r.attack in chosen and r.defense == label]
            timings[label] = time.perf_counter() - t0
        jobs = [(spec, tables, seed, settings, out / safe_label(label), baseline.get(seed))
                for label, tables in presets for seed in spec.seeds]
        flat = _utilities(engine, jobs, show_progress)
        for k, (label, _tables) in enumerate(presets):
            utilities[label] = flat[k * len(spec.seeds):(k + 1) * len(spec.seeds)]

    rows = summarise(records, utilities, labels, list(chosen))
    meta = {"base_config": str(base_config) if base_config else "embedded demo (giaudit/assets/demo.toml)",
            "scenario": records[0].scenario if records else "", "seeds": list(spec.seeds),
            "attacks": {k: dict(v) for k, v in chosen.items()}, "utility": settings.__dict__,
            "presets": {label: {"file": str(f), "defenses": tables}
                        for f, (label, tables) in zip(defense_files, presets)},
            "wall_s": time.perf_counter() - start, "preset_wall_s": timings,
            "notes": sorted({n for r in records for n in r.notes})}
    return render_compare(rows, meta, out)
