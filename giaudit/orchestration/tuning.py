"""Attacks tuned on the server's own data (``attacks.NAME.tune``), the strongest attacker an audit can field.

An untuned attack gives a false PASS; LeakPro tunes its attacks with Optuna, and users of every
gradient-inversion library report that reconstructions "do not work" on their model until the
hyperparameters are tuned. Here the server (SoK class D: it holds surrogate data from the same distribution)
simulates `clients` clients of its own from the seed's held-out split, which no audited client draws from,
with the audited global model, protocol, batch size and defenses, so it knows their private batches. It
tunes the options of the attack's search space (`Attack.search_space`, less the options the config sets) by
Optuna's TPE sampler over `trials` trials for the attack's success on those clients (the tune metric's mean,
in its leak direction), the first trial being the attack's defaults, and then attacks the audited clients
with the best options. The audited ground truth is never read: the tuning sees only its own clients.

The result is cached by the hash of everything it depends on (the cell's config hash, which covers the
scenario, the defenses, the attack table with its tune settings and the seed) in the run folder's
``tuning/`` (written atomically), so a resumed or repeated run does not tune again, and it is recorded in
the cell's record and shown in the report.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from giaudit.aggregate import options_text
from giaudit.attacks import ATTACKS, Attack, build_attack
from giaudit.attacks.base import Dim
from giaudit.config import AttackConfig, TuneSettings
from giaudit.defenses import Chain
from giaudit.errors import GiauditError
from giaudit.io import atomic_write_text
from giaudit.metrics.evaluate import evaluate
from giaudit.metrics.registry import METRICS
from giaudit.scenario.build import AnyScenario
from giaudit.training import stable_seed


@dataclass(frozen=True)
class Tuned:
    """The tuning's outcome: the best options, the tune metric's mean on the server's own clients with them
    and with the defaults, and what it cost."""

    params: Mapping[str, Any]
    metric: str
    best: float
    default: float
    trials: int
    clients: int
    time_s: float
    key: str
    cached: bool = False

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def note(self) -> str:
        unit = METRICS[self.metric].unit
        opts = options_text(self.params)
        return (f"attack options tuned on {self.clients} clients the server simulated from its own held-out data "
                f"(surrogate data, class D; the audited clients were never used), {self.trials} trials: {opts}; "
                f"mean {METRICS[self.metric].label} on those clients {self.best:.3g}{' ' + unit if unit else ''} "
                f"(defaults: {self.default:.3g})")


def tuning_key(config_hash: str, attack: str, round_: int | None) -> str:
    return hashlib.sha256(json.dumps([config_hash, attack, round_]).encode()).hexdigest()[:16]


def _suggest(trial: Any, name: str, dim: Dim) -> Any:
    if dim.kind == "log":
        return trial.suggest_float(name, dim.low, dim.high, log=True)
    if dim.kind == "float":
        return trial.suggest_float(name, dim.low, dim.high)
    if dim.kind == "int":
        return trial.suggest_int(name, int(dim.low), int(dim.high))
    return trial.suggest_categorical(name, list(dim.choices))


def _score(attack: Attack, config: AttackConfig, clients: list[Any], metric: str, seed: int) -> float:
    """The tune metric's mean over the server's own clients (their truth is the server's own data)."""
    values = []
    for i, (obs, truth) in enumerate(clients):
        rng = torch.Generator().manual_seed(stable_seed("tune-attack", config.name, seed, i))
        rec = attack.reconstruct(obs, budget=config.budget, rng=rng)
        values.append(float(evaluate(rec, truth, lpips=False).aggregate[f"{metric}_mean"]))
    return sum(values) / len(values)


def tune_attack(config: AttackConfig, settings: TuneSettings, surrogate: AnyScenario, defense: Chain, seed: int,
                key: str, cache_dir: str | Path | None = None) -> Tuned:
    """Tune `config`'s attack on `settings.clients` clients simulated from `surrogate` (the audited scenario on
    the server's own data) under `defense`; cached under `cache_dir`/<key>.json when given."""
    cache = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            return Tuned(**{**json.loads(cache.read_text()), "cached": True})
        except (OSError, ValueError, TypeError):
            pass  # an unreadable cache entry is recomputed (and rewritten)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    clients = [surrogate.simulate(defense, generator=torch.Generator().manual_seed(stable_seed("tune", seed, i)))
               for i in range(settings.clients)]
    space = ATTACKS[config.name].search_space
    higher = METRICS[settings.metric].leak == "higher"
    defaults = {p: config.option(p) for p in settings.params}

    def objective(trial: Any) -> float:
        chosen = {p: _suggest(trial, p, space[p]) for p in settings.params}
        try:
            attack = build_attack(config.name, **{**config.options, **chosen})
            value = _score(attack, config, clients, settings.metric, seed)
        except (GiauditError, ValueError, RuntimeError) as exc:  # e.g. a label method that does not apply
            raise optuna.TrialPruned(str(exc)) from None
        if not math.isfinite(value):
            raise optuna.TrialPruned("non-finite score")
        return value

    sampler = optuna.samplers.TPESampler(seed=stable_seed("tune-sampler", config.name, seed) % 2**32)
    study = optuna.create_study(direction="maximize" if higher else "minimize", sampler=sampler)
    study.enqueue_trial(defaults)  # the first trial is the defaults: tuning never ends worse on its own clients
    study.optimize(objective, n_trials=settings.trials)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise GiauditError(f"attacks.{config.name}.tune: every trial failed; check the attack's options")
    best = study.best_trial
    first = study.trials[0]
    default = float(first.value) if first.value is not None else math.nan
    tuned = Tuned(dict(best.params), settings.metric, float(best.value or math.nan), default, settings.trials,
                  settings.clients,
                  time.perf_counter() - start, key)
    if cache is not None:
        atomic_write_text(cache, json.dumps({k: v for k, v in tuned.record().items() if k != "cached"}, indent=1))
    return tuned
