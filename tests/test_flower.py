"""Flower capture: a real flwr simulation (subprocess) with the capture mod, audited by `giaudit audit`; with
Flower's LocalDpMod after the capture mod, the captured update is the noised one and reconstruction degrades.
Also the capture format's checks against the model factory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from giaudit.config import load_config
from giaudit.engine import LocalEngine
from giaudit.errors import DataError
from giaudit.orchestration import run_audit
from giaudit.scenario.capture import CaptureScenario, load_capture, write_capture
from giaudit.scenario.factory import call_factory
from giaudit.threat import threat_model

# The Flower simulations start Ray: they run on the worker that runs every other test that starts Ray.
pytestmark = pytest.mark.xdist_group("ray")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower"

AUDIT = """
name = "flower"
seeds = [0]
[scenario]
capture = "{capture}"
model_factory = "task:make_model"
[threat]
batch_size = true
training_details = true
[attacks.{attack}]
{options}
[output]
lpips = false
"""


def _simulations(root: Path) -> tuple[Path, Path]:
    """The example app without and with LocalDpMod, as two concurrent subprocesses (each starts its own Ray)."""
    pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'giaudit[flower]'")
    # No bytecode: the app imports task.py from examples/flower/, and the test writes nowhere but tmp_path.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [subprocess.Popen([sys.executable, str(APP / "app.py"), "--out", str(root / name)] + extra, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, extra in (("plain", []), ("dp", ["--dp"]))]
    for proc in procs:
        try:
            _out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-2000:]
    return root / "plain" / "round-1" / "client-0", root / "dp" / "round-1" / "client-0"


def _app_copy(folder: Path) -> Path:
    """The example's task.py copied into `folder`: a config written there resolves `task:make_model` beside
    itself, as examples/flower/audit.toml does, and nothing is written into examples/."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP / "task.py", folder / "task.py")
    return folder


def _audit(tmp_path: Path, capture: Path, name: str, attack: str, options: str) -> dict[str, float]:
    cfg = _app_copy(tmp_path / f"app-{name}") / "audit.toml"
    cfg.write_text(AUDIT.format(capture=capture, attack=attack, options=options))
    store = run_audit(load_config(cfg), tmp_path / name, show_progress=False, engine=LocalEngine(1))
    return dict(store.records[0].metrics)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    return _simulations(tmp_path_factory.mktemp("flower"))


ATTACK = ("ig", "iterations = 600\nlr = 0.03\ntv_weight = 1e-4")


def test_flower_capture_is_what_left_the_client_and_leaks_the_digit(tmp_path, captures):
    plain, dp = captures
    cap = load_capture(plain)
    assert cap.meta["view"] == "client" and cap.meta["training"] == {"lr": 0.1, "local_epochs": 1, "batch_size": 1,
                                                                      "num_examples": 1}
    assert cap.batch is not None and cap.batch[0].shape == (1, 1, 32, 32)
    server = [json.loads(p.read_text()) for p in (plain.parents[1] / "server" / "round-1").glob("*/capture.json")]
    assert len(server) == 2 and {s["view"] for s in server} == {"server"}

    leak = _audit(tmp_path, plain, "plain", *ATTACK)
    noised = _audit(tmp_path, dp, "dp", *ATTACK)
    print(f"PSNR without DP {leak['psnr_db_mean']:.2f} dB, with LocalDpMod {noised['psnr_db_mean']:.2f} dB")
    assert leak["psnr_db_mean"] >= 20.0
    assert noised["psnr_db_mean"] < leak["psnr_db_mean"] - 5.0

    # With LocalDpMod after the capture mod, the captured update is the clipped and noised one.
    a, b = load_capture(plain), load_capture(dp)
    diff = [np.abs(a.update_arrays[k] - b.update_arrays[k]).max() for k in a.update_arrays]
    assert max(diff) > 1e-3


def test_capture_checked_against_the_model_factory(tmp_path):
    app = _app_copy(tmp_path / "app")
    model = call_factory("scenario.model_factory", "task:make_model", None, app)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(state)
    bad["fc.weight"] = np.zeros((10, 7), np.float32)
    folder = write_capture(tmp_path / "c", global_arrays=bad, update_arrays=bad,
                           meta={"training": {"lr": 0.1, "local_epochs": 1, "num_examples": 1},
                                 "data": {"shape": [1, 32, 32], "num_classes": 10}})
    with pytest.raises(DataError, match="fc.weight"):
        CaptureScenario.build(folder, "task:make_model", threat_model(), base=app)

    # The right shapes: the update is the FedAvg delta; no batch stored, so no ground truth.
    upd = {k: v + 0.01 for k, v in state.items()}
    folder = write_capture(tmp_path / "ok", global_arrays=state, update_arrays=upd,
                           meta={"training": {"lr": 0.1, "local_epochs": 1, "batch_size": 1, "num_examples": 1},
                                 "data": {"shape": [1, 32, 32], "num_classes": 10}})
    scen = CaptureScenario.build(folder, "task:make_model", threat_model(), base=app)
    obs, truth = scen.simulate()
    assert truth is None and obs.update.kind == "delta"
    assert all(torch.allclose(t, torch.full_like(t, 0.01), atol=1e-6) for t in obs.update.tensors)


@pytest.mark.parametrize("extra, key", [
    ({"clients_per_seed": 4}, "scenario.clients_per_seed"),
    ({"checkpoints": [0, 10]}, "scenario.checkpoints"),
    ({"model_factory": None}, "scenario.model_factory"),
])
def test_capture_excludes_what_needs_a_simulation(tmp_path, extra, key):
    """A capture is one client's update at one round: per-seed clients and training checkpoints are refused,
    naming the key (and a capture needs its model factory)."""
    from giaudit.config import parse_config
    from giaudit.errors import ConfigError

    scenario = {"capture": str(tmp_path), "model_factory": "task:make_model", **extra}
    scenario = {k: v for k, v in scenario.items() if v is not None}
    with pytest.raises(ConfigError, match=key):
        parse_config({"scenario": scenario})
