"""Attacks tuned on the server's own data (attacks.NAME.tune): validated before anything runs, tuned on
clients simulated from the held-out split only (never the audited clients), recorded, reported and cached."""
from __future__ import annotations

import hashlib

import pytest
import torch

from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.errors import ConfigError
from giaudit.orchestration import run_audit
from giaudit.orchestration import tuning as tuning_module
from giaudit.report import render
from giaudit.scenario.build import build_scenario, surrogate_scenario

BASE = {"name": "tuned", "seeds": [0],
        "data": {"source": "digits", "size": 16},
        "scenario": {"model": "lenet_relu", "batch_size": 1},
        "output": {"lpips": False}}


def _config(tune, **attack):
    return {**BASE, "attacks": {"ig": {"iterations": 15, "tune": tune, **attack}}}


@pytest.mark.parametrize("tune, threat, key", [
    ({"trials": 0}, None, "attacks.ig.tune.trials"),
    ({"trialz": 3}, None, "attacks.ig.tune.trialz"),
    ({"params": ["momentum"]}, None, "attacks.ig.tune.params"),
    ({"metric": "label_accuracy"}, None, "attacks.ig.tune.metric"),
    ({}, {"surrogate_data": False}, "attacks.ig.tune"),
])
def test_tune_settings_are_checked_before_anything_runs(tune, threat, key):
    raw = _config(tune)
    if threat is not None:
        raw["threat"] = threat
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(raw)


def test_attack_without_a_search_space_cannot_be_tuned():
    with pytest.raises(ConfigError, match=r"attacks\.gidm\.tune: gidm has no options to tune"):
        parse_config({**BASE, "attacks": {"gidm": {"tune": {}}}})


def test_options_set_in_the_table_are_not_tuned():
    spec = parse_config(_config({"trials": 2}, lr=0.05))
    assert spec.attacks["ig"].tune.params == ("tv_weight", "schedule", "labels")
    assert "tune" not in spec.attacks["ig"].options


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def test_tuning_sees_only_the_servers_own_clients_and_is_recorded_and_cached(tmp_path, monkeypatch):
    spec = parse_config(_config({"trials": 3, "clients": 2}))
    audited, _held = build_scenario(spec.data, spec.scenario, spec.threat.model(), 0)
    private = {_digest(x) for x in audited.pool.images}
    surrogate = surrogate_scenario(spec.data, audited, 0)
    assert surrogate.model is audited.model and not private & {_digest(x) for x in surrogate.pool.images}

    seen = []
    real_evaluate = tuning_module.evaluate

    def spy(rec, truth, **kw):
        seen.extend(_digest(x) for x in truth.images)
        return real_evaluate(rec, truth, **kw)

    monkeypatch.setattr(tuning_module, "evaluate", spy)
    store = run_audit(spec, tmp_path / "run", show_progress=False, engine=LocalEngine(1))
    assert len(seen) == 3 * 2 and not private & set(seen)  # every scored truth is the server's own data

    rec = store.records[0]
    t = rec.tuning
    assert t["trials"] == 3 and t["clients"] == 2 and set(t["params"]) == {"lr", "tv_weight", "schedule", "labels"}
    assert t["best"] >= t["default"]  # the first trial is the defaults
    assert rec.attack_params["lr"] == pytest.approx(t["params"]["lr"])  # the audited clients met the tuned attack
    assert "surrogate_data" in rec.threat["used"] and rec.threat["sok_class"] >= "D"
    assert any(n.startswith("attack options tuned on 2 clients") for n in rec.notes)
    render(store)
    assert "attack options tuned on 2 clients" in (tmp_path / "run" / "report.md").read_text()

    # Cached by what it depends on: a rerun of the cell (its record removed) does not tune again.
    (tmp_path / "run" / "results.json").unlink()
    seen.clear()
    again = run_audit(spec, tmp_path / "run", show_progress=False, engine=LocalEngine(1)).records[0]
    assert seen == [] and again.tuning["cached"] and again.tuning["params"] == t["params"]
    assert again.metrics == rec.metrics
