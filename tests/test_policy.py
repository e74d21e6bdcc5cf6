"""Policy checks (giaudit.policy): thresholds over saved records, exit codes 0 / 1 / 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from giaudit.cli import main
from giaudit.errors import ConfigError
from giaudit.policy import check, load_policy, parse_policy, resolve_metric
from giaudit.results import AuditRecord, ResultsStore, load_results

REPO = Path(__file__).resolve().parents[1]


def check_main(results, policy) -> int:
    """`giaudit check RESULTS --policy POLICY`, as a user runs it."""
    return main(["check", str(results), "--policy", str(policy)])


def _record(attack: str, defense: str, seed: int, **metrics: float) -> AuditRecord:
    return AuditRecord(
        record_id=f"scn__{defense}__{attack}__s{seed}", config_hash="h", scenario="scn", defense=defense,
        attack=attack, seed=seed, threat={"sok_class": "B", "granted": [], "oracles": []}, attack_params={},
        label_source="oracle", metrics=metrics, per_image=(), timings={"attack_s": 1.0}, trace={})


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    store = ResultsStore.open(tmp_path / "run")
    store.add(_record("ig", "noise", 0, psnr_db_mean=11.0, psnr_db_worst=14.0, ssim_mean=0.2, ssim_worst=0.25,
                      label_accuracy=0.5))
    store.add(_record("dlg", "noise", 0, psnr_db_mean=16.0, psnr_db_worst=18.5, ssim_mean=0.4, ssim_worst=0.45,
                      label_accuracy=1.0, identity_match_rate=0.0))
    return tmp_path / "run"


def _write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_fails_on_one_broken_rule_and_passes_when_relaxed(results_dir, tmp_path, capsys):
    strict = _write(tmp_path, "[rules]\npsnr_db.max = 18\nssim.max = 0.5\n")
    assert check_main(results_dir, strict) == 1
    out = capsys.readouterr().out
    # dlg's worst-case PSNR (18.5) breaks psnr_db.max = 18; everything else passes.
    assert "FAIL  psnr_db.max = 18" in out and "scn__noise__dlg__s0: psnr_db_worst = 18.5" in out
    assert sum(line.startswith("FAIL ") for line in out.splitlines()) == 1 and "PASS  ssim.max = 0.5" in out
    relaxed = _write(tmp_path, "[rules]\npsnr_db.max = 19\nssim.max = 0.5\n", "relaxed.toml")
    assert check_main(results_dir, relaxed) == 0
    assert "verdict: PASS" in capsys.readouterr().out


def test_verdict_fields_and_mean_key(results_dir):
    records = load_results(results_dir).records
    v = check(records, parse_policy({"rules": {"psnr_db_mean": {"max": 15}}}))
    assert not v.passed
    by_attack = {r.attack: r for r in v.rules}
    assert by_attack["ig"].passed and by_attack["ig"].measured == 11.0 and by_attack["ig"].defense == "noise"
    bad = by_attack["dlg"]
    assert not bad.passed and bad.key == "psnr_db_mean" and bad.threshold == 15 and bad.op == "max"
    assert bad.basis == "mean over records" and bad.samples == 1


def test_scopes_override_global(results_dir):
    records = load_results(results_dir).records
    policy = parse_policy({"rules": {"psnr_db": {"max": 15}}, "attack": {"dlg": {"rules": {"psnr_db": {"max": 20}}}}})
    v = check(records, policy)
    assert v.passed, v.format()
    assert {r.scope for r in v.rules} == {"all", "attack:dlg"}
    assert "SKIP" not in v.format()  # the global rule still applies to ig
    tighter = parse_policy({"rules": {"ssim": {"max": 0.5}}, "defense": {"noise": {"rules": {"ssim": {"max": 0.3}}}},
                            "attack": {"ig": {"rules": {"ssim": {"max": 0.2}}}}})
    v = check(records, tighter)
    res = {r.attack: r for r in v.rules}
    # ig: attack scope wins (0.25 > 0.2 fails); dlg: defense scope (0.45 > 0.3 fails)
    assert res["ig"].scope == "attack:ig" and not res["ig"].passed and res["ig"].record_id == "scn__noise__ig__s0"
    assert res["dlg"].scope == "defense:noise" and not res["dlg"].passed


def test_min_rule_and_missing_metric(results_dir):
    records = load_results(results_dir).records
    v = check(records, parse_policy({"rules": {"label_accuracy": {"min": 0.6}}}))
    assert [r.passed for r in sorted(v.rules, key=lambda r: str(r.attack))] == [True, False]  # dlg 1.0, ig 0.5
    # identity_match_rate is only on dlg: ig fails closed, unless missing = "skip"
    v = check(records, parse_policy({"rules": {"identity_match_rate": {"max": 0.05}}}))
    assert not v.passed and any("not measured" in r.message for r in v.failures)
    v = check(records, parse_policy({"rules": {"identity_match_rate": {"max": 0.05, "missing": "skip"}}}))
    assert v.passed
    v = check(records, parse_policy({"rules": {"race_accuracy": {"max": 0.5, "missing": "skip"}}}))
    assert v.passed and v.rules[0].message.startswith("skipped: no record has metric")


def test_metric_absent_everywhere_fails_with_list(results_dir, tmp_path, capsys):
    # A known metric these records did not measure (no semantic backend ran) fails the rule, listing what is there.
    p = _write(tmp_path, "[rules]\ngender_accuracy.max = 0.6\n")
    assert check_main(results_dir, p) == 1
    out = capsys.readouterr().out
    assert "no record has metric 'gender_accuracy'" in out and "psnr_db_worst" in out


def test_unknown_metric_is_bad_input(results_dir, tmp_path, capsys):
    p = _write(tmp_path, "[rules]\npsnr.max = 15\n")
    assert check_main(results_dir, p) == 2
    err = capsys.readouterr().err
    assert "rules.psnr: unknown metric 'psnr'" in err and "psnr_db" in err


@pytest.mark.parametrize("text, key", [
    ("[rules]\npsnr_db.max = 'high'\n", "rules.psnr_db.max"),
    ("[rules]\npsnr_db.maximum = 3\n", "rules.psnr_db.maximum"),
    ("[rules]\npsnr_db = 3\n", "rules.psnr_db"),
    ("[rulez]\npsnr_db.max = 3\n", "rulez"),
    ("[attack.ig]\nthreshold = 3\n", "attack.ig.threshold"),
    ("[rules]\nssim = { min = 0.9, max = 0.1 }\n", "rules.ssim"),
    ("[rules]\npsnr_db.max = [\n", "not valid TOML"),
])
def test_malformed_policy_exits_2_naming_the_key(results_dir, tmp_path, capsys, text, key):
    p = _write(tmp_path, text)
    assert check_main(results_dir, p) == 2
    err = capsys.readouterr().err
    assert key in err and str(p) in err
    with pytest.raises(ConfigError):
        load_policy(p)


def test_bad_results_and_missing_policy_exit_2(results_dir, tmp_path, capsys):
    good = _write(tmp_path, "[rules]\npsnr_db.max = 15\n")
    assert check_main(tmp_path / "nowhere", good) == 2
    assert "no results.json" in capsys.readouterr().err
    assert check_main(results_dir, tmp_path / "absent.toml") == 2
    assert "absent.toml" in capsys.readouterr().err


def test_example_policy_loads_and_resolves():
    policy = load_policy(REPO / "examples" / "policy.toml")
    assert {r.scope for r in policy.rules} >= {"all", "attack:ig", "defense:noise"}
    assert resolve_metric({"psnr_db_worst": 1.0, "psnr_db_mean": 0.5}, "psnr_db") == "psnr_db_worst"
    assert resolve_metric({"psnr_db_worst": 1.0, "psnr_db_mean": 0.5}, "psnr_db_mean") == "psnr_db_mean"
    assert resolve_metric({"ssim_mean": 1.0}, "ssim") is None


def _rate_records(matches: int, n: int = 40) -> list[AuditRecord]:
    return [_record("ig", "noise", i, identity_match_rate=1.0 if i < matches else 0.0, psnr_db_worst=10.0 + i)
            for i in range(n)]


def test_rates_are_judged_on_the_aggregate_and_at_a_confidence_bound():
    rule = {"rules": {"identity_match_rate": {"max": 0.05}}}
    one = check(_rate_records(1), parse_policy(rule))
    assert one.passed and len(one.rules) == 1  # one judgement for the (defense, attack), not 40
    r = one.rules[0]
    assert r.measured == pytest.approx(0.025) and r.samples == 40 and r.basis == "mean over records"
    three = check(_rate_records(3), parse_policy(rule))
    assert not three.passed and three.rules[0].measured == pytest.approx(0.075)
    sure = check(_rate_records(1), parse_policy({"confidence": 0.95, **rule}))
    assert not sure.passed  # the Wilson upper bound of 1 in 40 is 0.13 > 0.05
    r = sure.rules[0]
    assert r.measured == pytest.approx(0.1288, abs=2e-4) and "Wilson upper 95% bound" in r.basis
    assert "n = 40" in r.line()
    # a worst-case rule stays per image: the most leaked image of the 40 records decides
    worst = check(_rate_records(1), parse_policy({"rules": {"psnr_db": {"max": 45}}}))
    assert not worst.passed and worst.rules[0].measured == 49.0 and worst.rules[0].basis == "worst image"
    assert worst.rules[0].record_id == "scn__noise__ig__s39"


def test_means_use_per_image_values_and_bootstrap_bound():
    recs = [AuditRecord(
        record_id=f"r{s}", config_hash="h", scenario="scn", defense="none", attack="ig", seed=s,
        threat={}, attack_params={}, label_source="idlg", metrics={"psnr_db_mean": 12.0, "psnr_db_worst": 14.0},
        per_image=tuple({"psnr_db": 10.0 + i} for i in range(5)), timings={}, trace={}) for s in range(4)]
    v = check(recs, parse_policy({"rules": {"psnr_db_mean": {"max": 12.5}}}))
    assert v.passed and v.rules[0].samples == 20 and v.rules[0].basis == "mean over images"
    v = check(recs, parse_policy({"confidence": 0.95, "rules": {"psnr_db_mean": {"max": 12.5}}}))
    assert not v.passed and 12.0 < v.rules[0].measured < 13.5 and "bootstrap upper" in v.rules[0].basis
    with pytest.raises(ConfigError, match="confidence"):
        parse_policy({"confidence": 95, "rules": {"psnr_db": {"max": 1}}})


def test_a_defense_verdict_is_the_worst_over_attacks(results_dir):
    records = load_results(results_dir).records
    v = check(records, parse_policy({"rules": {"psnr_db": {"max": 18}}}))
    assert v.by_defense() == {"noise": {"passed": False, "worst_attack": "dlg", "worst_rule": v.failures[0].line()}}
    assert "defense noise: FAIL (worst attack: dlg)" in v.format()
    ok = check(records, parse_policy({"rules": {"psnr_db": {"max": 30}}}))
    assert ok.by_defense()["noise"] == {"passed": True, "worst_attack": "dlg",
                                        "worst_rule": next(r.line() for r in ok.rules if r.attack == "dlg")}
