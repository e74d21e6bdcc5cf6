"""`giaudit compare`: one table row per defense x attack, report files, resume, and the utility proxy."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from giaudit.cli import main
from giaudit.compare import run_compare
from giaudit.config import load_config
from giaudit.errors import ConfigError
from giaudit.results import load_results
from giaudit.scenario.build import training_data
from giaudit.stats import mean_ci
from giaudit.utility import UtilityCache, UtilitySettings, baseline, run_utility, with_dp_noise, with_dp_rounds

REPO = Path(__file__).resolve().parents[1]

BASE = """
name = "cmp"
seeds = [0]
[data]
source = "digits"
size = 16
[scenario]
model = "lenet_relu"
protocol = "fedsgd"
batch_size = 1
[threat]
batch_size = true
[attacks.ig]
iterations = 15
[attacks.dlg]
iterations = 2
[output]
lpips = false
"""


@pytest.fixture()
def base(tmp_path) -> Path:
    p = tmp_path / "base.toml"
    p.write_text(BASE)
    return p


SMALL = UtilitySettings(max_rounds=6, clients=2, eval_every=3, target_accuracy=None, eval_limit=100)


def _cache(out: Path) -> UtilityCache:
    return UtilityCache(out, use_user_cache=False)  # tests never write to the user's cache


def test_compare_two_presets_one_row_per_defense_and_attack(tmp_path, base):
    torch.set_num_threads(1)
    presets = [REPO / "defenses" / "none.toml", REPO / "defenses" / "noise-0.1.toml"]
    out = tmp_path / "out"
    html = run_compare(presets, base_config=base, attacks=["ig", "dlg"], seeds=2, out_dir=out,
                       show_progress=False, utility=SMALL, clients_per_seed=2, cache=_cache(out))
    assert html == out / "compare.html" and html.is_file()
    table = pd.read_csv(out / "compare.csv")
    assert len(table) == 4
    assert sorted(zip(table.defense, table.attack)) == sorted(
        [("none", "ig"), ("none", "dlg"), ("noise-0.1", "ig"), ("noise-0.1", "dlg")])
    assert (table.seeds == 2).all() and (table.images == 4).all()  # 2 seeds x 2 private batches of 1
    for col in ("psnr_db_mean", "psnr_db_ci_low", "psnr_db_ci_high", "psnr_db_worst", "psnr_db_p95", "ssim_mean",
                "label_accuracy_mean", "label_accuracy_high", "utility_accuracy_mean", "utility_accuracy_low",
                "utility_drop_mean"):
        assert table[col].notna().all(), col
    assert (table.psnr_db_ci_low <= table.psnr_db_mean).all() and (table.psnr_db_mean <= table.psnr_db_ci_high).all()
    none_rows, noisy = table[table.defense == "none"], table[table.defense == "noise-0.1"]
    assert (none_rows.utility_drop_mean == 0).all()  # the baseline against itself
    assert noisy.paired_n.tolist() == [4, 4] and noisy.paired_p.notna().all() and noisy.paired_too_few.all()
    assert (out / "compare.parquet").is_file() and (out / "compare_privacy_utility.png").is_file()
    md = (out / "compare.md").read_text()
    assert md.count("| none |") == 2 and md.count("| noise-0.1 |") == 2 and "(too few)" in md
    assert "data:image/png;base64," in html.read_text()
    # resume: a second run re-uses the saved records and utilities
    mtime = (out / "noise-0.1" / "results.json").stat().st_mtime_ns
    run_compare(presets, base_config=base, attacks=["ig", "dlg"], seeds=2, out_dir=out, show_progress=False,
                utility=SMALL, clients_per_seed=2, cache=_cache(out))
    assert (out / "noise-0.1" / "results.json").stat().st_mtime_ns == mtime


def test_compare_epsilon_is_the_accountants_for_the_utility_run(tmp_path, base):
    """The epsilon in the table is Opacus's accountant for the noise, sampling rate and steps of the training
    whose accuracy it sits next to (the preset's own `rounds = 10` is replaced by the training's length)."""
    from opacus.accountants import RDPAccountant

    out = tmp_path / "out"
    preset = tmp_path / "dp.toml"
    preset.write_text('label = "dp"\n[[defenses]]\nname = "dpsgd"\nmax_grad_norm = 1.0\n'
                      'noise_multiplier = 1.0\ndelta = 1e-5\nrounds = 10\n')
    run_compare([preset], base_config=base, attacks=["dlg"], seeds=1, out_dir=out, show_progress=False,
                utility=SMALL, clients_per_seed=1, cache=_cache(out))
    table = pd.read_csv(out / "compare.csv")
    spec = load_config(base)
    _, train_set, _ = training_data(spec.data, spec.scenario, spec.threat.model(), 0)
    acc = RDPAccountant()
    acc.history = [(1.0, 1 / len(train_set), SMALL.max_rounds)]  # FedSGD, batch 1: one step per round
    expected = acc.get_epsilon(delta=1e-5)
    assert len(table) == 1 and table.epsilon[0] == pytest.approx(expected, rel=1e-9)
    assert table.utility_rounds[0] == SMALL.max_rounds


def test_target_epsilon_is_spent_over_exactly_the_training(tmp_path, base):
    from opacus.accountants import RDPAccountant

    spec = load_config(base)
    tables = with_dp_rounds([{"name": "dpsgd", "max_grad_norm": 1.0, "epsilon": 8.0, "delta": 1e-5}], 5)
    r = run_utility(spec, tables, 0, SMALL, rounds=5)
    sp = r["spent"]["0:dpsgd"]
    acc = RDPAccountant()
    acc.history = [(sp["dp_noise_multiplier"], sp["dp_sample_rate"], 5)]
    assert sp["dp_steps"] == 5 and r["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert r["epsilon"] == pytest.approx(8.0, rel=0.02)  # Opacus's search lands on the target
    audited = with_dp_noise(tables, r["spent"])
    assert "epsilon" not in audited[0] and audited[0]["noise_multiplier"] == sp["dp_noise_multiplier"]


def test_utility_baseline_stops_at_the_target_and_is_cached(tmp_path, base, monkeypatch):
    torch.set_num_threads(1)
    spec = load_config(base)
    settings = UtilitySettings(max_rounds=200, clients=4, eval_every=5, target_accuracy=0.3)
    cache = _cache(tmp_path)
    rounds, runs = baseline(spec, [0, 1], settings, cache)
    first = runs[0]
    assert first["reached_target"] and first["accuracy"] >= 0.3 and rounds == first["rounds"] < 200
    assert runs[1]["rounds"] == rounds and runs[1]["curve"][-1][0] == rounds
    assert first["accuracy_low"] < first["accuracy"] < first["accuracy_high"]
    again = baseline(spec, [0, 1], settings, cache)[1]
    assert again[0]["cached"] and again[0]["accuracy"] == first["accuracy"]
    # a cache shipped with the package is found by the same key (what `giaudit demo` would use)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for p in (tmp_path / "_utility").glob("*.json"):
        (shipped / p.name).write_text(p.read_text())
    monkeypatch.setattr("giaudit.utility.SHIPPED", shipped)
    fresh = UtilityCache(tmp_path / "elsewhere", use_user_cache=False)
    assert baseline(spec, [0], settings, fresh)[1][0]["cached"]
    noisy = run_utility(spec, [{"name": "noise", "sigma": 1.0}], 0, settings, rounds=rounds)
    assert noisy["accuracy"] < first["accuracy"] - 0.05  # heavy noise on every client costs accuracy
    same = run_utility(spec, [{"name": "secure_agg", "clients": 4}], 0, settings, rounds=rounds)
    assert same["accuracy"] == first["accuracy"]  # aggregation-only: training is unchanged


def test_compare_bad_input(tmp_path, base, capsys):
    none = REPO / "defenses" / "none.toml"
    with pytest.raises(ConfigError, match="^attacks: unknown attack 'gan'"):
        run_compare([none], base_config=base, attacks=["gan"], seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="used by two presets"):
        run_compare([none, none], base_config=base, seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="preset not found"):
        run_compare([tmp_path / "missing.toml"], base_config=base, seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="^seeds: must be >= 1"):
        run_compare([none], base_config=base, seeds=0, out_dir=tmp_path)
    # The CLI names its own flags for the same parameters, and writes nothing.
    assert main(["compare", str(none), "--config", str(base), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds: must be >= 1" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["compare", str(none), "--config", str(base), "--clients-per-seed", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--clients-per-seed: must be >= 1" in capsys.readouterr().err


def test_mean_ci():
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([5.0])[1])


def test_paired_test_separates_a_real_defense_from_an_identical_config(tmp_path, base):
    """IG on 8 private batches: noise sigma = 0.1 leaks less than no defense on the same images and attack
    starts (p < 0.05); an identical configuration under another label does not (p > 0.05)."""
    torch.set_num_threads(1)
    same = tmp_path / "none-again.toml"
    same.write_text('label = "none-again"\n')
    presets = [REPO / "defenses" / "none.toml", REPO / "defenses" / "noise-0.1.toml", same]
    out = tmp_path / "out"
    run_compare(presets, base_config=base, attacks=["ig"], seeds=1, out_dir=out, show_progress=False,
                utility=SMALL, clients_per_seed=8, cache=_cache(out))
    table = pd.read_csv(out / "compare.csv").set_index("defense")
    assert table.loc["none-again", "paired_n"] == 8 and table.loc["noise-0.1", "paired_n"] == 8
    assert table.loc["noise-0.1", "paired_p"] < 0.05, table.loc["noise-0.1"].to_dict()
    assert table.loc["none-again", "paired_p"] > 0.05
    assert table.loc["noise-0.1", "psnr_db_mean"] < table.loc["none", "psnr_db_mean"]


def test_leakage_over_training_checkpoints(tmp_path, base):
    """scenario.checkpoints: the audit attacks the update taken at each round of the federated training; the
    records carry the round and the model's held-out accuracy; the report plots leakage against the round."""
    torch.set_num_threads(1)
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text(base.read_text().replace('batch_size = 1\n[threat]', 'batch_size = 1\ncheckpoints = [0, 4]\n'
                                            '[threat]'))
    out = tmp_path / "out"
    run_compare([REPO / "defenses" / "none.toml"], base_config=cfg, attacks=["dlg"], seeds=1, out_dir=out,
                show_progress=False, utility=SMALL, clients_per_seed=2, cache=_cache(out))
    table = pd.read_csv(out / "compare.csv")
    assert table["round"].tolist() == [0, 4] and table.model_accuracy.notna().all()
    assert table.model_accuracy[1] != table.model_accuracy[0]  # a different model at round 4
    assert (out / "compare_leakage_over_training.png").is_file()
    store = load_results(out / "none")
    assert sorted(r.record_id for r in store.records) == ["cmp__none__dlg__s0__r0", "cmp__none__dlg__s0__r4"]
    assert {r.training["round"] for r in store.records} == {0, 4} and all(len(r.per_image) == 2 for r in store.records)
    assert all({p["client"] for p in r.per_image} == {0, 1} and p["image_key"] for r in store.records
               for p in r.per_image)


@pytest.mark.parametrize("scenario, message", [
    ({"checkpoints": [50, 0]}, "scenario.checkpoints: rounds must be increasing"),
    ({"checkpoints": []}, "scenario.checkpoints: expected a non-empty list"),
    ({"checkpoints": [-1]}, "scenario.checkpoints: expected a non-empty list"),
    ({"clients_per_seed": 0}, "scenario.clients_per_seed"),
])
def test_bad_scenario_options_name_the_key(scenario, message):
    from giaudit.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"scenario": scenario})
