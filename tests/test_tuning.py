"""Attacks tuned on the server's own data (attacks.NAME.tune): validated before anything runs, tuned on
clients simulated from the held-out split only (never the audited clients), recorded, reported and cached."""
from __future__ import annotations

import hashlib

import pytest
import torch

from giaudit.compare import summarise as compare_summarise
from giaudit.compare import verdict_meta
from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.errors import ConfigError
from giaudit.orchestration import run_audit
from giaudit.orchestration import tuning as tuning_module
from giaudit.policy import check, parse_policy
from giaudit.report import render
from giaudit.report.compare import render_compare
from giaudit.results import AuditRecord, ResultsStore
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
    # The same attack at its defaults on the same audited images and starts, measured and judged beside it.
    untuned = t["untuned"]
    assert untuned["attack_params"]["lr"] == spec.attacks["ig"].option("lr") and "surrogate_data" not in \
        untuned["threat"]["used"]
    assert [p["image_key"] for p in untuned["per_image"]] == [p["image_key"] for p in rec.per_image]
    verdict = check([rec], parse_policy({"rules": {"psnr_db": {"max": 99}}}))
    assert {(r.variant, r.measured) for r in verdict.rules} == {
        ("tuned", rec.metrics["psnr_db_worst"]), ("untuned", untuned["metrics"]["psnr_db_worst"])}
    assert any(n.startswith("attack options tuned on 2 clients") for n in rec.notes)
    render(store)
    assert "attack options tuned on 2 clients" in (tmp_path / "run" / "report.md").read_text()

    # Cached by what it depends on: a rerun of the cell (its record removed) does not tune again.
    (tmp_path / "run" / "results.json").unlink()
    seen.clear()
    again = run_audit(spec, tmp_path / "run", show_progress=False, engine=LocalEngine(1)).records[0]
    assert seen == [] and again.tuning["cached"] and again.tuning["params"] == t["params"]
    assert again.metrics == rec.metrics


def _tuned_record(defense: str, tuned: float, untuned: float) -> AuditRecord:
    """A record of IG tuned to lr = 0.5 whose most leaked image is `tuned` dB, `untuned` dB at the defaults."""
    def measured(psnr: float) -> tuple[dict, list]:
        return ({"psnr_db_mean": psnr, "psnr_db_worst": psnr, "ssim_mean": 0.1, "ssim_worst": 0.1,
                 "mse_mean": 0.05, "mse_worst": 0.05, "label_accuracy": 1.0},
                [{"psnr_db": psnr, "ssim": 0.1, "mse": 0.05, "image_key": "k0", "truth_index": 0}])
    metrics, rows = measured(tuned)
    u_metrics, u_rows = measured(untuned)
    threat = {"sok_class": "B", "granted": [], "used": [], "oracles": []}
    return AuditRecord(
        record_id=f"t__{defense}__ig__s0", config_hash="h", scenario="s", defense=defense, attack="ig", seed=0,
        threat={**threat, "sok_class": "D", "used": ["surrogate_data"]}, attack_params={"lr": 0.5},
        label_source="idlg", metrics=metrics, per_image=tuple(rows), timings={"attack_s": 1.0}, trace={},
        tuning={"params": {"lr": 0.5}, "metric": "psnr_db", "best": 20.0, "default": 11.0, "trials": 3, "clients": 2,
                "time_s": 1.0, "key": "k", "untuned": {"attack_params": {"lr": 0.1}, "label_source": "idlg",
                                                        "threat": threat, "metrics": u_metrics, "per_image": u_rows,
                                                        "attack_s": 1.0}})


def test_a_rule_that_passes_untuned_and_fails_tuned_is_marked_in_check_report_and_compare(tmp_path):
    records = [_tuned_record("none", tuned=20.0, untuned=10.0), _tuned_record("noise", tuned=12.0, untuned=8.0)]
    verdict = check(records, parse_policy({"rules": {"psnr_db": {"max": 15}}}))
    assert not verdict.passed
    judged = {(r.defense, r.variant): (r.measured, r.status) for r in verdict.rules}
    assert judged == {("none", "tuned"): (20.0, "FAIL"), ("none", "untuned"): (10.0, "PASS"),
                      ("noise", "tuned"): (12.0, "PASS"), ("noise", "untuned"): (8.0, "PASS")}
    [line] = verdict.flip_lines()
    assert line.startswith("passed untuned, fails tuned: psnr_db.max = 15 on none / ig") and "lr = 0.5" in line
    assert line in verdict.format() and verdict.by_defense()["none"]["passed"] is False

    store = ResultsStore.open(tmp_path / "run")
    for r in records:
        store.add(r)
    _html, md = render(store, verdict=verdict)
    text = md.read_text()
    assert "**passed untuned, fails tuned: psnr\\_db.max = 15 on none / ig" in text  # Markdown escapes _
    assert "with its defaults on the same images the most leaked image was 10.0 dB PSNR" in text

    rows = compare_summarise(records, {}, ["none", "noise"], ["ig"])
    assert [(r["tuned"], r["psnr_db_worst"], r["untuned_psnr_db_worst"]) for r in rows] == [(True, 20.0, 10.0),
                                                                                          (True, 12.0, 8.0)]
    render_compare(rows, {"verdict": verdict_meta(verdict)}, tmp_path / "cmp")
    cmp = (tmp_path / "cmp" / "compare.md").read_text()
    assert "ig (tuned: lr = 0.5)" in cmp and "untuned PSNR" in cmp and line in cmp
