"""`giaudit calibrate`: bisection inside its bracket, bounds before attacks, the chosen preset passes and the next
weaker point evaluated fails; bad input is one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from giaudit.calibrate import bisect, target
from giaudit.cli import main
from giaudit.defenses import load_defense_file
from giaudit.errors import ConfigError


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_bisection_keeps_a_passing_and_a_failing_end_inside_the_bracket(scale) -> None:
    threshold = 0.7
    ok, bad, seen = bisect(lambda x: x >= threshold, 5.0, 0.05, 6, scale)
    assert ok is not None and bad is not None and ok >= threshold > bad
    assert all(0.05 <= x <= 5.0 for x in seen) and len(seen) == 8 and seen[:2] == [5.0, 0.05]
    assert (ok / bad if scale == "log" else ok - bad) <= (100 ** (1 / 64) if scale == "log" else 5 / 64) + 1e-9
    assert bisect(lambda x: False, 5.0, 0.05, 3, scale) == (None, 5.0, [5.0])
    assert bisect(lambda x: True, 5.0, 0.05, 3, scale)[:2] == (0.05, None)


def test_calibrate_finds_the_weakest_noise_that_passes(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\nseeds = [0]\n[data]\nsource = "mnist5k"\nsize = 16\n'
                      '[scenario]\nmodel = "lenet_relu"\nbatch_size = 1\n[threat]\ntrue_labels = true\n'
                      '[attacks.ig]\niterations = 2\n[output]\nlpips = false\n')
    policy = tmp_path / "policy.toml"
    policy.write_text("[rules]\nrero_bound.max = 0.5\npsnr_db.max = 60\n")
    preset = tmp_path / "dp.toml"
    preset.write_text('label = "dp"\n[[defenses]]\nname = "dpsgd"\nmax_grad_norm = 1.0\nepsilon = 8.0\n'
                      'delta = 1e-5\n')
    out = tmp_path / "cal"
    assert main(["calibrate", str(preset), "--param", "noise_multiplier", "--policy", str(policy), "--config",
                 str(config), "--out", str(out), "--steps", "3", "--low", "0.1", "--high", "4",
                 "--workers", "1"]) == 0
    res = json.loads((out / "calibrate.json").read_text())
    chosen, weaker = res["chosen"], res["next_weaker_failed"]
    assert chosen is not None and weaker is not None and weaker < chosen
    values = [e["value"] for e in res["evaluations"]]
    assert all(0.1 <= v <= 4.0 for v in values)                       # never outside the bracket
    assert [e["phase"] for e in res["evaluations"]][:2] == ["bound", "bound"]  # bounds before any attack
    by = {(e["phase"], e["value"]): e for e in res["evaluations"]}
    assert by[("audit", chosen)]["passed"] and by[("audit", chosen)]["rero_bound"] <= 0.5
    assert not by[("bound", weaker)]["passed"] and by[("bound", weaker)]["rero_bound"] > 0.5
    label, tables = load_defense_file(out / "dp-calibrated.toml")
    assert label == "dp-calibrated" and tables[0]["noise_multiplier"] == pytest.approx(chosen)
    assert "epsilon" not in tables[0] and (out / "calibrate.png").stat().st_size > 0
    assert "chosen: noise_multiplier" in capsys.readouterr().out


def test_calibrate_with_the_example_policy_on_digits(tmp_path: Path) -> None:
    """examples/policy.toml as shipped (no rero_bound rule: every candidate is audited) on digits: the returned
    noise multiplier passes, the next weaker point evaluated fails, no point leaves the bracket, and what decides
    is a measurement (labels recovered through the gradient at little noise), not an unmeasurable metric."""
    config = tmp_path / "digits.toml"
    config.write_text('name = "digits"\nseeds = [0, 1, 2]\n[data]\nsource = "mnist5k"\nsize = 16\n'
                      '[scenario]\nmodel = "lenet_relu"\nbatch_size = 1\n[threat]\ntrue_labels = false\n'
                      '[attacks.ig]\niterations = 2\n[output]\nlpips = false\n')
    out = tmp_path / "cal"
    policy = Path(__file__).resolve().parents[1] / "examples" / "policy.toml"
    assert main(["calibrate", "defenses/dpsgd-eps8.toml", "--param", "noise_multiplier", "--policy", str(policy),
                 "--config", str(config), "--out", str(out), "--steps", "2", "--low", "0.05", "--high", "5",
                 "--workers", "1"]) == 0
    res = json.loads((out / "calibrate.json").read_text())
    chosen, weaker = res["chosen"], res["next_weaker_failed"]
    audits = {e["value"]: e for e in res["evaluations"] if e["phase"] == "audit"}
    assert chosen is not None and weaker is not None and weaker < chosen
    assert audits[chosen]["passed"] and not audits[weaker]["passed"]
    assert all(0.05 <= v <= 5.0 for v in audits) and len(audits) == 4
    assert any("label_accuracy" in line for line in audits[weaker]["failed"])
    assert not any("lpips" in line for e in audits.values() for line in e["failed"])


def test_calibrate_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    preset = tmp_path / "noise.toml"
    preset.write_text('label = "n"\n[[defenses]]\nname = "noise"\nsigma = 0.1\n')
    with pytest.raises(ConfigError, match="--param: no defense"):
        target(preset, "noise_multiplier")
    with pytest.raises(ConfigError, match="--low/--high"):
        target(preset, "sigma", 0.5, 0.1)
    assert main(["calibrate", str(preset), "--param", "distribution", "--policy", "missing.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--param" in err and "noise.distribution" in err
