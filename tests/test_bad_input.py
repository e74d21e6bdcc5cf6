"""Every error a user can cause, through the real CLI: exit 2, one line, the key or file named,
no traceback, nothing half-written.

Attack and defense options fail while the config is parsed, before any data is loaded; data,
checkpoint, results and policy files fail naming the file.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from giaudit.cli import main

BASE = """
name = "t"
seeds = [0]
[data]
source = "digits"
size = 16
[scenario]
model = "lenet"
[output]
lpips = false
"""


def cfg(attacks: str = "[attacks.ig]\niterations = 2\n", defenses: str = "", data: str | None = None) -> str:
    text = BASE if data is None else BASE.replace('source = "digits"\nsize = 16', data)
    return text + defenses + attacks


def defense(table: str) -> str:
    return cfg(defenses=f"[[defenses]]\n{table}\n")


# (config text, expected fragment of the one error line)
CONFIGS = {
    "ig lr": (cfg("[attacks.ig]\nlr = -1\n"), "attacks.ig.lr: must be > 0"),
    "ig distance": (cfg('[attacks.ig]\ndistance = "manhattan"\n'), "attacks.ig.distance: unknown distance"),
    "ig schedule type": (cfg("[attacks.ig]\nschedule = 3\n"), "attacks.ig.schedule: expected a string"),
    "ig restarts": (cfg("[attacks.ig]\nrestarts = 0\n"), "attacks.ig.restarts: must be >= 1"),
    "ig halving": (cfg("[attacks.ig]\nrestarts = 4\nhalving = 0\n"), "attacks.ig.halving: must be >= 1"),
    "dlg halving": (cfg("[attacks.dlg]\nrestarts = 4\nhalving = 10\n"),
                    "attacks.dlg.halving: dlg cannot pause its restarts"),
    "ig unknown option": (cfg("[attacks.ig]\nlearning_rate = 1\n"), "attacks.ig.learning_rate: unknown option"),
    "dlg max_eval type": (cfg('[attacks.dlg]\nmax_eval = "many"\n'), "attacks.dlg.max_eval: expected an integer"),
    "dlg labels": (cfg('[attacks.dlg]\nlabels = "psychic"\n'), "attacks.dlg.labels: unknown labels 'psychic'"),
    "gias prior name": (cfg('[attacks.gias]\nprior = "cifar1000"\n'), "attacks.gias.prior: 'cifar1000' is neither"),
    "gias z_fraction": (cfg("[attacks.gias]\nz_fraction = 2.0\n"), "attacks.gias.z_fraction: must be <= 1"),
    "gias_z mode": (cfg('[attacks.gias_z]\nmode = "x"\n'), "attacks.gias_z.mode: unknown mode 'x'"),
    "ggl optimizer": (cfg('[attacks.ggl]\noptimizer = "sgd"\n'), "attacks.ggl.optimizer: unknown optimizer 'sgd'"),
    "ggl population": (cfg("[attacks.ggl]\npopulation = 1\n"), "attacks.ggl.population: must be >= 2"),
    "giml meta_lr": (cfg("[attacks.giml]\nmeta_lr = 2.0\n"), "attacks.giml.meta_lr: must be <= 1"),
    "giml start": (cfg('[attacks.giml]\nstart = "nowhere"\n'), "attacks.giml.start: 'nowhere' is neither"),
    "attack not a table": (cfg("[attacks]\nig = 3\n"), "attacks.ig: must be a table"),
    "unknown attack": (cfg("[attacks.igg]\n"), "attacks.igg: unknown attack 'igg'"),
    "defense name": (defense('name = "nosie"'), "defenses[0].name: unknown defense 'nosie'"),
    "noise sigma": (defense('name = "noise"\nsigma = -1.0'), "defenses[0].sigma: must be >= 0"),
    "clip type": (defense('name = "clip"\nmax_norm = "big"'), "defenses[0].max_norm: expected a number"),
    "dpsgd neither": (defense('name = "dpsgd"'), "defenses[0].noise_multiplier"),
    "sparsify level": (defense('name = "sparsify"\nsparsity = 1.5'), "defenses[0].sparsity: must be < 1"),
    "quantize key": (defense('name = "quantize"\nlevels = 4'), "defenses[0].levels: unknown option of quantize"),
    "label_disguise mix": (defense('name = "label_disguise"\nmix = 2.0'), "defenses[0].mix"),
    "large_batch size": (defense('name = "large_batch"\nbatch_size = 0'), "defenses[0].batch_size"),
    "secure_agg clients": (defense('name = "secure_agg"\nclients = 0'), "defenses[0].clients"),
    "data holdout": (cfg(data='source = "digits"\nholdout = 1.5'), "data.holdout: must be in [0, 1)"),
    "data source": (cfg(data='source = "imagenet"'), "data.source: unknown source 'imagenet'"),
    "folder without path": (cfg(data='source = "folder"'), "data.path: required when data.source = 'folder'"),
    "budget key type": (cfg("[attacks.ig]\npatience = 1.5\n"), "attacks.ig.patience: expected an integer"),
    "client_data choice": (cfg().replace('model = "lenet"', 'model = "lenet"\nclient_data = "by_user"'),
                           "scenario.client_data: unknown"),
    "client_data with capture": (cfg().replace('model = "lenet"', 'model = "lenet"\nclient_data = "one_label"\n'
                                               'capture = "c.npz"\nmodel_factory = "m:f"'),
                                 "scenario.client_data: a capture holds the batch"),
}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expected in err, err


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_fails_before_any_data_loads(case, tmp_path, capsys, monkeypatch):
    import giaudit.scenario.build as build

    def no_data(*_a, **_k):
        raise AssertionError("data was loaded before the config was validated")

    monkeypatch.setattr(build, "load_data", no_data)
    text, expected = CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, err = run_cli(["audit", str(path), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert_one_line(code, err, expected)
    assert str(path) in err  # the file is named too
    assert not (tmp_path / "out").exists()  # nothing half-written


def _folder_cfg(tmp_path: Path, folder: Path, extra: str = "") -> Path:
    path = tmp_path / "folder.toml"
    path.write_text(cfg(data=f'source = "folder"\npath = "{folder}"\nsize = 16\n{extra}'))
    return path


def test_folder_with_no_images(tmp_path, capsys):
    folder = tmp_path / "faces"
    (folder / "alice").mkdir(parents=True)
    (folder / "alice" / "notes.txt").write_text("no images here")
    code, err = run_cli(["audit", str(_folder_cfg(tmp_path, folder)), "--out", str(tmp_path / "out"),
                         "--no-progress"], capsys)
    assert_one_line(code, err, "no images found in")
    assert str(folder) in err
    assert not (tmp_path / "out").exists()


def test_folder_with_a_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "faces"
    (folder / "alice").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "alice" / "ok.png")
    (folder / "alice" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, err = run_cli(["audit", str(_folder_cfg(tmp_path, folder)), "--out", str(tmp_path / "out"),
                         "--no-progress"], capsys)
    assert_one_line(code, err, "broken.png: cannot read image")
    assert not (tmp_path / "out").exists()


def _prior_cfg(tmp_path: Path, weights: bytes) -> Path:
    from giaudit.priors.io import shipped_priors

    ckpt = tmp_path / "prior.safetensors"
    ckpt.write_bytes(weights)
    ckpt.with_suffix(".json").write_text(shipped_priors()["mnist32"].with_suffix(".json").read_text())
    path = tmp_path / "prior.toml"
    path.write_text(cfg(f'[attacks.gias]\nprior = "{ckpt}"\n'))
    return path


def test_truncated_checkpoint(tmp_path, capsys):
    from giaudit.priors.io import shipped_priors

    good = shipped_priors()["mnist32"].read_bytes()
    code, err = run_cli(["audit", str(_prior_cfg(tmp_path, good[: len(good) // 3])), "--out",
                         str(tmp_path / "out"), "--no-progress"], capsys)
    assert_one_line(code, err, "prior.safetensors: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoint(tmp_path, capsys):
    code, err = run_cli(["audit", str(_prior_cfg(tmp_path, pickle.dumps({"weight": [1.0, 2.0]}))), "--out",
                         str(tmp_path / "out"), "--no-progress"], capsys)
    assert_one_line(code, err, "prior.safetensors: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_corrupt_results_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"schema": 2, "records": [')
    code, err = run_cli(["report", str(run)], capsys)
    assert_one_line(code, err, "results.json: not a giaudit results file")
    assert not (run / "report.html").exists()
    code, err = run_cli(["check", str(run), "--policy", str(Path(__file__).parents[1] / "examples" / "policy.toml")],
                        capsys)
    assert code == 2 and "results.json" in err and "Traceback" not in err


def test_results_of_another_schema(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"schema": 1, "meta": {}, "records": []}))
    code, err = run_cli(["report", str(run)], capsys)
    assert_one_line(code, err, "written with results schema 1")


def test_policy_with_an_unknown_metric(tmp_path, capsys):
    from giaudit.io import atomic_write_text

    run = tmp_path / "run"
    atomic_write_text(run / "results.json", json.dumps({"schema": 2, "meta": {}, "records": []}))
    policy = tmp_path / "policy.toml"
    policy.write_text("[rules]\npsnr_dbb.max = 20\n")
    code, err = run_cli(["check", str(run), "--policy", str(policy)], capsys)
    assert code == 2, err
    assert "psnr_dbb" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_preset_for_compare(tmp_path, capsys):
    code, err = run_cli(["compare", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "cmp")], capsys)
    assert_one_line(code, err, "nope.toml: defense preset not found")
    assert not (tmp_path / "cmp").exists()


def test_internal_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import giaudit.cli as cli

    def boom(_args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "_report", boom)
    parser_args = ["report", str(tmp_path)]
    assert main(parser_args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run with --debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        main(["--debug", *parser_args])


def test_the_console_script_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(cfg("[attacks.ig]\nlr = -1\n"))
    out = subprocess.run([sys.executable, "-m", "giaudit.cli", "audit", str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "attacks.ig.lr: must be > 0" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("text", "named"), [
    (BASE.replace("seeds = [0]", "seeds = [0, 0]") + "[attacks.ig]\niterations = 2\n", "seeds: seed 0 is listed twice"),
    (BASE.replace("seeds = [0]", "seeds = [-1]") + "[attacks.ig]\niterations = 2\n", "seeds: every seed"),
    (BASE.replace("seeds = [0]", "seeds = [1180591620717411303424]") + "[attacks.ig]\niterations = 2\n",
     "seeds: every seed"),
    (BASE.replace("seeds = [0]", 'seeds = ["zero"]') + "[attacks.ig]\niterations = 2\n", "seeds: expected"),
    (BASE.replace('name = "t"', 'name = "../../escape_dir"') + "[attacks.ig]\niterations = 2\n", "name: '../../escape"),
    (BASE.replace('name = "t"', 'name = "a/b c"') + "[attacks.ig]\niterations = 2\n", "name: 'a/b c'"),
    (BASE.replace('name = "t"', 'name = ""') + "[attacks.ig]\niterations = 2\n", "name: ''"),
])
def test_seeds_and_run_names_are_refused_before_anything_runs(tmp_path, capsys, text, named):
    """Repeated or out-of-range seeds, and names that would put the run folder outside the output root."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert main(["audit", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("giaudit: error:") and named in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
    assert not (tmp_path.parent / "escape_dir").exists()


def test_a_policy_scope_naming_no_attack_is_refused(tmp_path, capsys):
    policy = tmp_path / "p.toml"
    policy.write_text("[attack.igg.rules]\npsnr_db.max = 10\n")
    config = tmp_path / "c.toml"
    config.write_text(cfg().replace("lpips = false", f'lpips = false\npolicy = "{policy}"'))
    assert main(["audit", str(config), "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "attack.igg: unknown attack 'igg'" in err and "ig" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "named"), [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--kind", "ddpm", "--steps", "0"], "--steps: must be >= 1"),
    (["--kind", "ddpm", "--minutes", "-1"], "--minutes: must be > 0"),
    (["--kind", "ddpm", "--checkpoint-minutes", "0"], "--checkpoint-minutes: must be > 0"),
])
def test_prior_training_refuses_zero_steps_and_negative_budgets(tmp_path, capsys, flags, named):
    out = tmp_path / "prior"
    assert main(["prior", "train", "--data", "digits", "--out", str(out), *flags]) == 2
    assert named in capsys.readouterr().err and not out.exists()
