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
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from giaudit.audit import training_data
from giaudit.config import AuditSpec
from giaudit.errors import ConfigError
from giaudit.io import atomic_write_text
from giaudit.results import config_hash
from giaudit.stats import pooled_accuracy, wilson_interval
from giaudit.training import TrainingSettings, train

UtilitySettings = TrainingSettings  # the name compare's callers know

CACHE_VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "assets" / "utility"
AUDIT_ONLY_KEYS = ("clients_per_seed", "checkpoints", "bn_mode")  # do not change the training


def user_cache() -> Path:
    return Path(os.environ.get("GIAUDIT_CACHE") or Path.home() / ".cache" / "giaudit") / "utility"


def utility_key(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], seed: int, settings: TrainingSettings,
                rounds: int, stop_at: float | None) -> str:
    """The hash of everything a utility run depends on."""
    scenario = {k: v for k, v in spec.scenario.items() if k not in AUDIT_ONLY_KEYS}
    data = {k: v for k, v in spec.data.items() if k != "path"}
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
    """DP-SGD tables accounted over `rounds` rounds (the training's length)."""
    return [{**t, "rounds": rounds} if t.get("name") == "dpsgd" else dict(t) for t in tables]


def with_dp_noise(tables: Sequence[Mapping[str, Any]], spent: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tables with each DP-SGD target epsilon replaced by the noise multiplier the training used, so an
    audited update carries exactly the training's noise."""
    out = []
    for i, t in enumerate(tables):
        info = spent.get(f"{i}:{t.get('name')}", {})
        if t.get("name") == "dpsgd" and "epsilon" in t and info.get("dp_noise_multiplier") is not None:
            t = {k: v for k, v in t.items() if k != "epsilon"}
            t["noise_multiplier"] = float(info["dp_noise_multiplier"])
        out.append(dict(t))
    return out


def spent_epsilon(spent: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """(epsilon, delta) of the first defense that accounts for one."""
    for info in spent.values():
        if info.get("epsilon") is not None:
            return float(info["epsilon"]), info.get("delta")
    return None, None


def run_utility(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], seed: int, settings: TrainingSettings, *,
                rounds: int, stop_at: float | None = None, cache: UtilityCache | None = None) -> dict[str, Any]:
    """Train with `tables` on every client for `rounds` rounds (or until `stop_at`); accuracy with its interval,
    the curve and what the defenses' accountants say was spent. Cached by `utility_key`."""
    key = utility_key(spec, tables, seed, settings, rounds, stop_at)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
    scenario, train_set, held = training_data(spec, seed)
    if len(held) == 0:
        raise ConfigError("data.holdout: the held-out split is empty; set data.holdout > 0 to measure utility")
    run = train(scenario.model, train_set, held, scenario.protocol, scenario.batch_size, tables, settings, seed,
                rounds=rounds, stop_at=stop_at)
    n = len(held) if settings.eval_limit is None else min(settings.eval_limit, len(held))
    acc = run.curve[-1][1]
    lo, hi = wilson_interval(int(round(acc * n)), n)
    eps, delta = spent_epsilon(run.spent)
    out = {"key": key, "seed": seed, "accuracy": acc, "accuracy_low": lo, "accuracy_high": hi, "n_test": n,
           "rounds": run.rounds, "reached_target": stop_at is not None and acc >= stop_at,
           "initial_accuracy": run.curve[0][1], "curve": run.curve, "spent": run.spent, "epsilon": eps,
           "delta": delta, "train_s": run.train_s, "settings": settings.as_dict(), "train_images": len(train_set)}
    if cache is not None:
        cache.put(key, out)
    return {**out, "cached": False}


def baseline(spec: AuditSpec, seeds: Sequence[int], settings: TrainingSettings,
             cache: UtilityCache | None = None) -> tuple[int, dict[int, dict[str, Any]]]:
    """The no-defense runs: the first seed trains until the target or the budget, fixing R; the others R rounds."""
    first = run_utility(spec, [], seeds[0], settings, rounds=settings.max_rounds,
                        stop_at=settings.target_accuracy, cache=cache)
    rounds = int(first["rounds"])
    out = {seeds[0]: first}
    for seed in seeds[1:]:
        out[seed] = run_utility(spec, [], seed, settings, rounds=rounds, cache=cache)
    return rounds, out


__all__ = ["UtilityCache", "UtilitySettings", "baseline", "pooled_accuracy", "run_utility", "spent_epsilon",
           "user_cache", "utility_key", "with_dp_noise", "with_dp_rounds"]
