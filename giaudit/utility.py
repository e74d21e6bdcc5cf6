"""What a defense costs the model: held-out accuracy after a federated training that converged.

The training is `giaudit.training.train` (FedSGD or FedAvg as the scenario
says, the defense on every client, `TrainingSettings.clients` clients a
round) on the federation's data (every image not held out), measured on the
held-out split no client ever draws from. The no-defense baseline of the
first seed trains until its held-out accuracy reaches
`target_accuracy` (checked every `eval_every` rounds) or the round budget
`max_rounds`; that number of rounds R is then the length of every other run
(other seeds, every defense), so the accuracy drop compares trainings of the
same length on the same client batches (paired).

DP-SGD: its tables are run with ``rounds = R``, so a target epsilon is spent
over exactly this training, and the epsilon reported is Opacus's accountant
for the noise multiplier, sampling rate and steps that the run used
(`Defense.spent`). Every simulated client draws from the whole training set,
so its sampling rate is (mini-batch) / (training-set size).

Accuracy intervals: each run's accuracy carries the Wilson 95 % interval of
its held-out test (n held-out images); over seeds the correct counts are
pooled.

Caching: a run depends only on the data and scenario, the defense tables,
the training settings, the seed and the number of rounds; its result (a few
hundred bytes of JSON) is stored under the hash of exactly those, in
`<out>/_utility/<hash>.json`, in a user cache (``$GIAUDIT_CACHE``, default
``~/.cache/giaudit``) and looked up also in ``giaudit/assets/utility/``, where
a release can ship the entries of its demo scenario
(``benchmarks/utility_convergence.py --write-cache giaudit/assets/utility``)
so `giaudit demo` shows utility without paying for the training.

Engines (`giaudit.engine`): every training is an idempotent task
(`compute_utility`, no file access); `run_utilities` looks each one up in the
cache, runs the missing ones on the engine (local processes or Ray) and only
the driver writes the cache entries. `measure` is the whole measurement
compare and the demo share: the baseline's first seed fixes R, then the other
baseline seeds and every defense's runs go to the engine at once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from giaudit.config import AuditSpec
from giaudit.defenses import DEFENSES
from giaudit.engine import Engine, LocalEngine
from giaudit.errors import ConfigError
from giaudit.io import atomic_write_text
from giaudit.results import config_hash
from giaudit.scenario.build import training_data
from giaudit.scenario.sections import canonical
from giaudit.stats import pooled_accuracy, wilson_interval
from giaudit.training import TrainingSettings, train

UtilitySettings = TrainingSettings  # the name compare's callers know

CACHE_VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "assets" / "utility"
AUDIT_ONLY_KEYS = ("clients_per_seed", "checkpoints", "bn_mode", "client_data")  # do not change the training


def user_cache() -> Path:
    return Path(os.environ.get("GIAUDIT_CACHE") or Path.home() / ".cache" / "giaudit") / "utility"


def utility_key(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], seed: int, settings: TrainingSettings,
                rounds: int, stop_at: float | None) -> str:
    """The hash of everything a utility run depends on."""
    scenario = {k: v for k, v in canonical(spec.scenario).items() if k not in AUDIT_ONLY_KEYS}
    data = {k: v for k, v in canonical(spec.data).items() if k != "path"}
    return config_hash({"v": CACHE_VERSION, "data": data, "scenario": scenario, "defenses": [dict(t) for t in tables],
                        "settings": settings.as_dict(), "seed": seed, "rounds": rounds, "stop_at": stop_at})


class UtilityCache:
    """JSON entries by key: read from the run folder, the shipped assets and the user cache; written to the
    run folder and the user cache."""

    def __init__(self, run_dir: Path | None = None, *, use_user_cache: bool = True) -> None:
        self.write_dirs = ([run_dir / "_utility"] if run_dir is not None else []) + (
            [user_cache()] if use_user_cache else [])
        self.read_dirs = self.write_dirs[:1] + [SHIPPED] + self.write_dirs[1:]

    def get(self, key: str) -> dict[str, Any] | None:
        for d in self.read_dirs:
            p = d / f"{key}.json"
            if p.is_file():
                try:
                    return dict(json.loads(p.read_text()))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a damaged entry is recomputed
        return None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        for d in self.write_dirs:
            try:
                atomic_write_text(d / f"{key}.json", json.dumps(value, indent=1))
            except OSError:
                continue  # a read-only cache is not an error


def with_dp_rounds(tables: Sequence[Mapping[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """The tables for a training of `rounds` rounds (`RegisteredDefense.over_rounds`: DP-SGD accounts over
    them)."""
    return [DEFENSES[str(t["name"])].over_rounds(t, rounds) for t in tables]


def with_dp_noise(tables: Sequence[Mapping[str, Any]], spent: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tables fixed to what their training used (`RegisteredDefense.as_trained`: a DP-SGD target epsilon
    becomes the noise multiplier the training found), so an audited update carries exactly the training's
    noise."""
    return [DEFENSES[str(t["name"])].as_trained(t, spent.get(f"{i}:{t['name']}", {})) for i, t in enumerate(tables)]


def spent_epsilon(spent: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """(epsilon, delta) of the first defense that accounts for one."""
    for info in spent.values():
        if info.get("epsilon") is not None:
            return float(info["epsilon"]), info.get("delta")
    return None, None


def compute_utility(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], seed: int, settings: TrainingSettings,
                    *, rounds: int, stop_at: float | None = None) -> dict[str, Any]:
    """Train with `tables` on every client for `rounds` rounds (or until `stop_at`); accuracy with its interval,
    the curve and what the defenses' accountants say was spent. No cache: the same result in any process."""
    key = utility_key(spec, tables, seed, settings, rounds, stop_at)
    scenario, train_set, held = training_data(spec.data, spec.scenario, spec.threat.model(), seed, base=spec.base,
                                              runtime=spec.run.runtime())
    if len(held) == 0:
        raise ConfigError("data.holdout: the held-out split is empty; set data.holdout > 0 to measure utility")
    run = train(scenario.model, train_set, held, scenario.protocol, scenario.batch_size, tables, settings, seed,
                rounds=rounds, stop_at=stop_at)
    n = len(held) if settings.eval_limit is None else min(settings.eval_limit, len(held))
    acc = run.curve[-1][1]
    lo, hi = wilson_interval(int(round(acc * n)), n)
    eps, delta = spent_epsilon(run.spent)
    return {"key": key, "seed": seed, "accuracy": acc, "accuracy_low": lo, "accuracy_high": hi, "n_test": n,
            "rounds": run.rounds, "reached_target": stop_at is not None and acc >= stop_at,
            "initial_accuracy": run.curve[0][1], "curve": run.curve, "spent": run.spent, "epsilon": eps,
            "delta": delta, "train_s": run.train_s, "settings": settings.as_dict(), "train_images": len(train_set)}


def run_utility(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], seed: int, settings: TrainingSettings, *,
                rounds: int, stop_at: float | None = None, cache: UtilityCache | None = None) -> dict[str, Any]:
    """`compute_utility` in this process, cached by `utility_key`."""
    return run_utilities([UtilityJob(spec, tuple(tables), seed, settings, rounds, stop_at)], cache)[0]


@dataclass(frozen=True)
class UtilityJob:
    """One utility training: an idempotent engine task keyed by `utility_key`."""

    spec: AuditSpec
    tables: tuple[Mapping[str, Any], ...]
    seed: int
    settings: TrainingSettings
    rounds: int
    stop_at: float | None = None

    @property
    def key(self) -> str:
        return utility_key(self.spec, self.tables, self.seed, self.settings, self.rounds, self.stop_at)


def _utility_task(job: UtilityJob) -> dict[str, Any]:
    return compute_utility(job.spec, job.tables, job.seed, job.settings, rounds=job.rounds, stop_at=job.stop_at)


def run_utilities(jobs: Sequence[UtilityJob], cache: UtilityCache | None = None, engine: Engine | None = None, *,
                  show_progress: bool = False) -> list[dict[str, Any]]:
    """Every job's result, in order: cached ones read (``cached: True``), the missing ones run as tasks on
    `engine` (default: this process), and only this driver writes the cache."""
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    missing: list[int] = []
    for i, job in enumerate(jobs):
        hit = cache.get(job.key) if cache is not None else None
        if hit is not None:
            out[i] = {**hit, "cached": True}
        elif not any(jobs[j].key == job.key for j in missing):
            missing.append(i)
    engine = engine or LocalEngine(1)
    for j, result in engine.map(_utility_task, [jobs[i] for i in missing], desc="utility",
                                show_progress=show_progress):
        if cache is not None:
            cache.put(result["key"], result)
        out[missing[j]] = {**result, "cached": False}
    for i, job in enumerate(jobs):  # a job repeated in `jobs` shares its first occurrence's run
        if out[i] is None:
            out[i] = next(r for r in out if r is not None and r["key"] == job.key)
    return [r for r in out if r is not None]


def baseline(spec: AuditSpec, seeds: Sequence[int], settings: TrainingSettings,
             cache: UtilityCache | None = None, engine: Engine | None = None, *,
             show_progress: bool = False) -> tuple[int, dict[int, dict[str, Any]]]:
    """The no-defense runs: the first seed trains until the target or the budget, fixing R; the others R rounds."""
    rounds, base_runs, _ = measure(spec, seeds, [], settings, cache, engine, show_progress=show_progress)
    return rounds, base_runs


def measure(spec: AuditSpec, seeds: Sequence[int], defenses: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
            settings: TrainingSettings, cache: UtilityCache | None = None, engine: Engine | None = None, *,
            show_progress: bool = False) -> tuple[int, dict[int, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The baseline (its first seed fixes R) and every (label, tables) defense's runs of R rounds per seed
    (DP-SGD accounted over R; no defense: the baseline's runs). The first seed's baseline is one task; all
    the other trainings are independent and go to `engine` together."""
    first = run_utilities([UtilityJob(spec, (), seeds[0], settings, settings.max_rounds, settings.target_accuracy)],
                          cache, engine, show_progress=show_progress)[0]
    rounds = int(first["rounds"])
    jobs = [UtilityJob(spec, (), seed, settings, rounds) for seed in seeds[1:]]
    trained = [(label, with_dp_rounds(tables, rounds)) for label, tables in defenses if tables]
    jobs += [UtilityJob(spec, tuple(tables), seed, settings, rounds) for _label, tables in trained for seed in seeds]
    results = iter(run_utilities(jobs, cache, engine, show_progress=show_progress))
    base_runs = {seeds[0]: first, **{seed: next(results) for seed in seeds[1:]}}
    per_defense = {label: [next(results) for _seed in seeds] for label, _tables in trained}
    runs = {label: per_defense.get(label) or [base_runs[s] for s in seeds] for label, _tables in defenses}
    return rounds, base_runs, runs


__all__ = ["UtilityCache", "UtilityJob", "UtilitySettings", "baseline", "compute_utility", "measure",
           "pooled_accuracy", "run_utilities", "run_utility", "spent_epsilon", "user_cache", "utility_key",
           "with_dp_noise", "with_dp_rounds"]
