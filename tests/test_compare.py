"""`giaudit compare`: one table row per defense x attack, report files, resume, and the utility proxy."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from giaudit.compare import mean_ci, run_compare
from giaudit.errors import ConfigError
from giaudit.utility import UtilitySettings

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


def test_compare_two_presets_one_row_per_defense_and_attack(tmp_path, base):
    torch.set_num_threads(1)
    presets = [REPO / "defenses" / "none.toml", REPO / "defenses" / "noise-0.1.toml"]
    out = tmp_path / "out"
    small = UtilitySettings(rounds=3, clients=2, eval_limit=100)
    html = run_compare(presets, base_config=base, attacks=["ig", "dlg"], seeds=2, out_dir=out,
                       show_progress=False, utility=small)
    assert html == out / "compare.html" and html.is_file()
    table = pd.read_csv(out / "compare.csv")
    assert len(table) == 4
    assert sorted(zip(table.defense, table.attack)) == sorted(
        [("none", "ig"), ("none", "dlg"), ("noise-0.1", "ig"), ("noise-0.1", "dlg")])
    assert (table.seeds == 2).all()
    for col in ("psnr_db_mean", "psnr_db_ci95", "psnr_db_worst", "ssim_mean", "label_accuracy_mean",
                "utility_accuracy_mean", "utility_drop_mean"):
        assert table[col].notna().all(), col
    none_rows = table[table.defense == "none"]
    assert (none_rows.utility_drop_mean == 0).all()  # the baseline against itself
    assert (out / "compare.parquet").is_file() and (out / "compare_privacy_utility.png").is_file()
    md = (out / "compare.md").read_text()
    assert md.count("| none |") == 2 and md.count("| noise-0.1 |") == 2
    assert "data:image/png;base64," in html.read_text()
    # resume: a second run re-uses the saved records and utilities
    mtime = (out / "noise-0.1" / "results.json").stat().st_mtime_ns
    run_compare(presets, base_config=base, attacks=["ig", "dlg"], seeds=2, out_dir=out, show_progress=False,
                utility=small)
    assert (out / "noise-0.1" / "results.json").stat().st_mtime_ns == mtime


def test_compare_reports_epsilon(tmp_path, base):
    out = tmp_path / "out"
    preset = tmp_path / "dp.toml"
    preset.write_text('label = "dp"\n[[defenses]]\nname = "dpsgd"\nmax_grad_norm = 1.0\n'
                      'noise_multiplier = 1.0\ndelta = 1e-5\nrounds = 10\n')
    run_compare([preset], base_config=base, attacks=["dlg"], seeds=1, out_dir=out, show_progress=False,
                utility=UtilitySettings(rounds=2, clients=2, eval_limit=50))
    table = pd.read_csv(out / "compare.csv")
    assert len(table) == 1 and table.epsilon[0] > 0 and math.isfinite(table.epsilon[0])


def test_compare_bad_input(tmp_path, base):
    none = REPO / "defenses" / "none.toml"
    with pytest.raises(ConfigError, match="--attacks: unknown attack 'gan'"):
        run_compare([none], base_config=base, attacks=["gan"], seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="used by two presets"):
        run_compare([none, none], base_config=base, seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="preset not found"):
        run_compare([tmp_path / "missing.toml"], base_config=base, seeds=1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="--seeds"):
        run_compare([none], base_config=base, seeds=0, out_dir=tmp_path)


def test_mean_ci():
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([5.0])[1])


def test_utility_dp_costs_accuracy(mnist32):
    """Heavy per-sample noise trains worse than no defense on the same batches."""
    from giaudit.scenario.models import build_model
    from giaudit.types import ClientProtocol
    from giaudit.utility import measure_utility

    torch.set_num_threads(1)
    perm = torch.randperm(len(mnist32), generator=torch.Generator().manual_seed(0))  # the file is sorted by label
    pool, held = mnist32.subset(perm[:2000]), mnist32.subset(perm[4000:4500])
    model = build_model("lenet_relu", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))
    settings = UtilitySettings(rounds=40, clients=4)
    noisy = measure_utility(model, pool, held, ClientProtocol(), 8, [{"name": "noise", "sigma": 1.0}], seed=0,
                            settings=settings)
    assert noisy["baseline_accuracy"] > 0.3
    assert noisy["accuracy_drop"] > 0.1
    same = measure_utility(model, pool, held, ClientProtocol(), 8, [{"name": "secure_agg", "clients": 4}], seed=0,
                           settings=settings)
    assert same["accuracy_drop"] == 0.0  # aggregation-only: training is unchanged
