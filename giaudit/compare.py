"""`giaudit compare`: the same scenario and attacks under each defense preset, on privacy and utility.

For every preset (a ``label`` and ``[[defenses]]`` tables, see
`giaudit.defenses.registry.load_defense_file`):

1. Utility (`giaudit.utility`): the no-defense baseline trains until it
   reaches the target accuracy or the round budget, fixing the training
   length R; the preset trains R rounds with its defenses on every client
   (DP-SGD accounted over exactly those R rounds). Cached by content hash.
2. Leakage: the base audit config (default: the embedded demo) is run with
   each preset's defenses into ``out_dir/<label>/`` (resumable) with
   ``clients_per_seed`` private batches per seed, every preset's cells in one
   stream of engine tasks (`giaudit.orchestration.run.run_audits`); a DP-SGD
   preset's audited update carries the noise multiplier its training used.

Both run on an engine (`giaudit.engine`, ``--engine local|ray``): every
utility training and every audit cell is an idempotent task, and only the
driver writes caches and records, so the files are the same whatever the
engine.

The comparison is computed from the saved records only (no metric is
recomputed): one row per defense x attack (x checkpoint round) with per-image
statistics (`giaudit.stats`: mean and bootstrap 95 % interval, 95th
percentile, worst image) for PSNR / SSIM / LPIPS, label accuracy with its
Wilson interval, a one-sided paired Wilcoxon test of per-image PSNR against
the preset without defenses (same images, seeds and attack starts), epsilon
and utility with the Wilson interval of the held-out test. Written to
``out_dir``: ``compare.csv`` (+ ``compare.parquet``), ``compare.md``,
``compare.html`` and the plots (privacy-utility; leakage over training when
the base config sets ``scenario.checkpoints``).

A tuned attack (``attacks.NAME.tune`` in the base config) is tuned under each
preset, on the server's own clients with that preset's defenses (the
attacker adapts to the defense); its row is the tuned attack's leakage, with
the options it chose and the same attack at its defaults on the same images
beside it. With a policy (``--policy``, else the base config's
``output.policy``) the records of every preset are judged
(`giaudit.policy.check`, the tuned attack at its defaults too), and every
rule that passed untuned but fails tuned is stated as such.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from giaudit.aggregate import summarise as aggregate
from giaudit.attacks import ATTACKS
from giaudit.config import AuditSpec, demo_config_path, load_config
from giaudit.defenses import load_defense_file
from giaudit.engine import Engine, LocalEngine
from giaudit.errors import ConfigError, ParamError
from giaudit.orchestration.run import run_audits
from giaudit.policy import Verdict, check, load_policy
from giaudit.report.compare import render_compare
from giaudit.results import AuditRecord
from giaudit.utility import UtilityCache, UtilitySettings, measure, with_dp_noise, with_dp_rounds


def safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", label).strip("-") or "defense"


def summarise(records: Sequence[AuditRecord], utilities: Mapping[str, Sequence[Mapping[str, Any]]],
              order: Sequence[str], attacks: Sequence[str], reference: str | None = None) -> list[dict[str, Any]]:
    """One row per defense x attack (x checkpoint round) from saved records (`giaudit.aggregate.summarise`,
    the aggregation the report and the policy check share), in preset then attack order.

    `reference`: the defense the paired test compares against (the preset without defenses)."""
    return aggregate(records, utilities, by_round=True, reference=reference,
                     order=[(label, attack) for label in order for attack in attacks])


def _select_attacks(spec: AuditSpec, attacks: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    if not attacks:
        return {k: dict(v.table) for k, v in spec.attacks.items()}
    out = {}
    for name in attacks:
        if name in spec.attacks:
            out[name] = dict(spec.attacks[name].table)
        elif name in ATTACKS:
            out[name] = {}  # the attack's defaults
        else:
            raise ParamError("attacks", f"unknown attack {name!r}; known: {', '.join(ATTACKS.names())}")
    return out


def run_compare(defense_files: list[Path], *, base_config: Path | None = None, attacks: list[str] | None = None,
                seeds: int = 3, out_dir: Path, show_progress: bool = True,
                utility: UtilitySettings | None = None, clients_per_seed: int = 8,
                cache: UtilityCache | None = None, engine: Engine | None = None,
                policy: Path | None = None) -> Path:
    """Run every preset on the same scenario, measure utility, write the comparison; return compare.html.

    Utility first: the no-defense baseline fixes the training length R (target accuracy or budget), every
    preset trains R rounds (DP-SGD accounted over exactly those rounds), and the audited update of a DP preset
    carries the noise its training used. Then each preset's audit, `clients_per_seed` private batches per seed
    (unless the base config sets scenario.clients_per_seed), the same images and attack starts under every
    preset, so leakage is compared image by image.

    Every utility training and every audit cell is a task on `engine` (default: local processes, one per
    core); the records and caches written are the same whatever the engine.

    `policy` (default: the base config's ``output.policy``): judge every preset's records, the tuned attacks
    at their defaults too, and state each rule that passed untuned and fails tuned.
    """
    if not defense_files:
        raise ConfigError("compare: pass at least one defense preset (e.g. defenses/*.toml)")
    if seeds < 1:
        raise ParamError("seeds", "must be >= 1")
    if clients_per_seed < 1:
        raise ParamError("clients_per_seed", "must be >= 1")
    presets = [load_defense_file(f) for f in defense_files]  # every preset is validated before anything runs
    labels = [label for label, _ in presets]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(f"compare: label {dupes[0]!r} is used by two presets; labels must be unique")
    base = load_config(base_config) if base_config is not None else load_config(demo_config_path())
    rules = load_policy(policy) if policy is not None else (load_policy(base.output.policy) if base.output.policy
                                                            else None)  # read before anything runs
    chosen = _select_attacks(base, attacks)
    scenario = dataclasses.replace(base.scenario, clients_per_seed=base.scenario.clients_per_seed or clients_per_seed)
    spec = base.replace(seeds=list(range(seeds)), attacks=chosen, scenario=scenario)
    settings = utility or UtilitySettings()
    out = Path(out_dir)
    cache = cache if cache is not None else UtilityCache(out)
    start = time.perf_counter()

    engine = engine or LocalEngine()
    reference = next((label for label, tables in presets if not tables), None)
    records: list[AuditRecord] = []
    run_meta: dict[str, Any] = {}
    audited: dict[str, list[dict[str, Any]]] = {}
    with engine:  # one Ray instance (or cluster connection) for the whole comparison
        # Utility first (the baseline fixes R; every other training is an engine task, all at once) ...
        rounds, base_runs, utilities = measure(spec, spec.seeds, presets, settings, cache, engine,
                                               show_progress=show_progress)
        # ... then every preset's audit cells, a DP preset's update carrying the noise its training used: one
        # stream of cells over all presets (no idle worker between two presets; stacked solves may span them).
        t0 = time.perf_counter()
        for label, tables in presets:
            audited[label] = with_dp_noise(with_dp_rounds(tables, rounds), utilities[label][0].get("spent", {}))
        stores = run_audits([(spec.replace(defenses=audited[label]), out / safe_label(label), label)
                             for label, _tables in presets], show_progress=show_progress, training=settings,
                            engine=engine)
        for (label, _tables), store in zip(presets, stores):
            records += [r for r in store.records
                        if r.seed in spec.seeds and r.attack in chosen and r.defense == label]
            run_meta = run_meta or dict(store.meta)
        audits_s = time.perf_counter() - t0

    rows = summarise(records, utilities, labels, list(chosen), reference)
    meta = {"base_config": str(base_config) if base_config else "embedded demo (giaudit/assets/demo.toml)",
            "scenario": records[0].scenario if records else "", "seeds": list(spec.seeds),
            "clients_per_seed": spec.scenario.clients,
            "checkpoints": spec.scenario.checkpoints, "reference": reference,
            "attacks": {k: dict(v) for k, v in chosen.items()}, "utility": settings.as_dict(),
            "utility_rounds": rounds, "utility_baseline_reached": bool(base_runs[spec.seeds[0]]["reached_target"]),
            "utility_cached": sum(bool(u.get("cached")) for us in utilities.values() for u in us),
            "utility_curves": {label: us[0].get("curve", []) for label, us in utilities.items()},
            "presets": {label: {"file": str(f), "defenses": tables, "audited": audited[label]}
                        for f, (label, tables) in zip(defense_files, presets)},
            "wall_s": time.perf_counter() - start, "audits_wall_s": audits_s,
            "notes": sorted({n for r in records for n in r.notes})}
    if rules is not None:
        meta["verdict"] = verdict_meta(check(records, rules, run_meta))
    return render_compare(rows, meta, out)


def verdict_meta(verdict: Verdict) -> dict[str, Any]:
    """What the comparison report shows of a policy verdict: each preset's, the rules that passed untuned and
    fail tuned, the failed rules and the coverage."""
    return {"passed": verdict.passed, "policy": verdict.policy_source, "defenses": verdict.by_defense(),
            "tuning_flips": verdict.flip_lines(), "failed": [r.line() for r in verdict.failures],
            "coverage": verdict.coverage()}
