"""`giaudit demo`: three defenses x IG and GIAS, digit leakage, utility and the verdict in one report (tiny budgets)."""
from __future__ import annotations

from pathlib import Path

import pytest

import giaudit.demo as demo
from giaudit.cli import main
from giaudit.config import load_config
from giaudit.utility import UtilitySettings


def test_demo_writes_one_report_with_comparison_plot_and_verdict(tmp_path: Path, monkeypatch) -> None:
    real = load_config

    def tiny(path):  # the embedded config with a tiny budget, one seed
        spec = real(path)
        return spec.replace(seeds=[0], attacks={k: {**v.table, "iterations": 4} for k, v in spec.attacks.items()})

    monkeypatch.setattr(demo, "load_config", tiny)
    monkeypatch.setattr(demo, "DEMO_UTILITY", UtilitySettings(clients=2, max_rounds=2, target_accuracy=None, eval_every=2))
    res = demo.run_demo(tmp_path / "demo", show_progress=False, log=lambda m: None)
    store = res["store"]
    assert {(r.defense, r.attack) for r in store.records} == {(d, a) for d in ("none", "noise", "dpsgd")
                                                             for a in ("ig", "gias")}
    assert all("attribute_digit_accuracy" in r.metrics for r in store.records)
    doc = res["html"].read_text()
    assert "Policy verdict:" in doc and "privacy-utility trade-off" in doc and "Model accuracy with the defense" in doc
    assert "Digit inferred (originals, chance)" in doc and "Under dpsgd (ε = " in doc  # ε as accounted over the utility training
    assert (tmp_path / "demo" / "figures" / "privacy_utility.png").is_file()
    # The DP-SGD rows carry the bound on any attacker beside what the attacks reached; the others have none.
    dp = [r for r in res["store"].records if r.defense == "dpsgd"]
    assert dp and doc.count("DP bounds any attacker to ≤") == 2 and "the attacks run reached" in doc
    report = res["md"].read_text()
    # A second run resumes: every record is read back as it was written (its timings too, so none was attacked
    # again), and the report and the verdict are the same.
    again = demo.run_demo(tmp_path / "demo", show_progress=False, log=lambda m: None)
    first = {r.record_id: r for r in store.records}
    second = {r.record_id: r for r in again["store"].records}
    assert second.keys() == first.keys()
    for rid, r in second.items():
        assert r.timings == first[rid].timings and r.config_hash == first[rid].config_hash, rid
        assert r.metrics == pytest.approx(first[rid].metrics, nan_ok=True), rid
    assert again["passed"] is res["passed"] and again["md"].read_text() == report
    # --active adds one malicious server's row beside them (the others resume untouched); the verdict judges
    # the honest-but-curious rows as before and says the malicious one is outside the policy's classes.
    act = demo.run_demo(tmp_path / "demo", show_progress=False, log=lambda m: None, active=True)
    rows = {(r.defense, r.attack): r for r in act["store"].records}
    assert set(rows) - {(r.defense, r.attack) for r in second.values()} == {("secure-agg-8", "imprint")}
    assert rows[("secure-agg-8", "imprint")].active and rows[("secure-agg-8", "imprint")].metrics["psnr_db_worst"] > 30
    assert act["passed"] is res["passed"]
    md = act["md"].read_text()
    assert "A malicious server (SoK classes F-H" in md and "secure-agg-8 / imprint (class G" in md


def test_demo_faces_says_how_to_install_the_backend(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "backend_status", lambda name: "dlib missing")
    assert main(["demo", "--faces", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and 'pip install "giaudit[faces]"' in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("labels", [("none", "noise", "dpsgd")])
def test_demo_defenses_match_the_example_policy_scopes(labels) -> None:
    assert tuple(label for label, _ in demo.DEMO_DEFENSES) == labels  # [defense.noise.rules] applies to "noise"


def test_shipped_digit_classifier_left_out_the_demo_pool() -> None:
    from giaudit.metrics.attributes import AttributeClassifier

    clf = AttributeClassifier.load(demo.shipped_digit_classifier())
    assert clf.config["data"] == "mnist5k" and clf.config["pool_every"] == 5
    assert clf.config["heldout_accuracy"] > 0.9
    assert load_config(demo.demo_config_path()).data.pool_every == 5


def test_the_demo_utility_ships_converged(monkeypatch) -> None:
    """The demo reads every utility result from giaudit/assets/utility: no training at run time, and the
    no-defense baseline is the converged one (>= 0.95 on the seed that fixes the training length)."""
    import giaudit.utility as utility

    def no_training(*_a, **_k):
        raise AssertionError("the demo trained: regenerate giaudit/assets/utility (see giaudit/demo.py)")

    monkeypatch.setattr(utility, "train", no_training)
    spec = demo.load_config(demo.demo_config_path())
    util, audited = demo.measure_utility(spec, demo.DEMO_DEFENSES, utility.UtilityCache(None, use_user_cache=False))
    assert util["none"][0]["accuracy"] >= 0.95 and util["none"][0]["reached_target"]
    dp = util["dpsgd"][0]
    assert dp["epsilon"] == pytest.approx(8.0, abs=0.05)  # the preset's target, spent over exactly this training
    assert audited["dpsgd"][0]["noise_multiplier"] == pytest.approx(next(iter(dp["spent"].values()))[
        "dp_noise_multiplier"])
