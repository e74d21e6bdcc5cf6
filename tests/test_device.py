"""Device plumbing, checked without a GPU: every tensor of an audit is made on an explicit device.

Each attack's audit cell (and the client's step under each defense) runs with ``run.device = "cpu"`` while
torch's default device is ``meta``: a tensor made without naming its device would be a meta tensor, and the
cell would fail (meta tensors hold no values). The CPU numbers are the same with and without ``[run]``, the
records say where they were computed, and a device this machine does not have is one line naming the key.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from giaudit.attacks import ATTACKS
from giaudit.cli import main
from giaudit.config import parse_config
from giaudit.defenses import DEFENSES
from giaudit.device import resolve
from giaudit.errors import ConfigError
from giaudit.orchestration import cell as cell_module
from giaudit.orchestration.cell import build_defense, run_cell
from giaudit.orchestration.plan import plan_cells
from giaudit.scenario.build import load_data

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIFIER: dict[str, Any] = {
    "data": {"source": "mnist5k", "size": 32},
    "scenario": {"model": "convnet", "width": 4, "batch_size": 2},  # BatchNorm in train mode
    "threat": {"surrogate_data": True},
    "output": {"lpips": False},
}
DIFFUSION: dict[str, Any] = {
    "data": {"source": "digits", "size": 16},
    "scenario": {"model": "ddpm_unet", "width": 32},
    "threat": {"diffusion_noise": True},
    "output": {"lpips": False},
}
# The cheapest run of each attack (the options only shrink its cost).
ATTACK_TABLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ig": (CLASSIFIER, {"iterations": 2, "bn_weight": 0.0}),
    "dlg": (CLASSIFIER, {"iterations": 2, "max_eval": 2}),
    "gias": (CLASSIFIER, {"iterations": 4}),
    "gias_z": (CLASSIFIER, {"iterations": 2}),
    "giml": (CLASSIFIER, {"iterations": 4, "meta_observations": 1, "meta_steps": 1, "tasks_per_step": 1,
                          "inner_z_steps": 1, "inner_theta_steps": 1}),
    "ggl": (CLASSIFIER, {"iterations": 2, "population": 4}),
    "diffula": (CLASSIFIER, {"iterations": 2, "denoise_steps": 2}),
    "gidm": (DIFFUSION, {"iterations": 2, "sampler_steps": 1}),
    "gidm_plus": (DIFFUSION, {"iterations": 2, "sampler_steps": 1, "t_grid": 2}),
    "imprint": ({**CLASSIFIER, "threat": {"surrogate_data": True, "modifies_model": True}}, {"bins": 16}),
    "trap_weights": ({**CLASSIFIER, "threat": {"modifies_model": True}}, {"neurons": 32}),
    "fishing": ({**CLASSIFIER, "threat": {"modifies_model": True}}, {"iterations": 2}),
    "differencing": ({**CLASSIFIER, "threat": {"selects_clients": True},
                      "defenses": [{"name": "secure_agg", "clients": 2}]}, {"iterations": 2}),
}
DEFENSE_TABLES = {
    "noise": {"name": "noise", "sigma": 0.01},
    "clip": {"name": "clip", "max_norm": 1.0},
    "dpsgd": {"name": "dpsgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0, "convert_batchnorm": True},
    "sparsify": {"name": "sparsify", "sparsity": 0.5},
    "quantize": {"name": "quantize", "bits": 4},
    "label_disguise": {"name": "label_disguise", "mix": 0.5},
    "large_batch": {"name": "large_batch", "batch_size": 4},
    "secure_agg": {"name": "secure_agg", "clients": 4},
    "model_validation": {"name": "model_validation"},
}


@contextlib.contextmanager
def meta_default() -> Iterator[None]:
    """Torch's default device is `meta` inside: a tensor made without an explicit device holds no values."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _cell(config: dict[str, Any]):
    spec = parse_config({"name": "dev", "seeds": [0], **config})
    load_data(spec.data)  # the data stay on the CPU (loaded outside the guard: the cache serves the cell)
    return plan_cells(spec, build_defense(spec)[0])[0]


def test_every_attack_and_defense_has_a_case():
    assert sorted(ATTACK_TABLES) == ATTACKS.names()
    assert sorted(DEFENSE_TABLES) == DEFENSES.names()


@pytest.mark.parametrize("name", sorted(ATTACK_TABLES))
def test_attack_cell_makes_every_tensor_on_an_explicit_device(name):
    base, table = ATTACK_TABLES[name]
    cell = _cell({**base, "attacks": {name: table}, "run": {"device": "cpu"}})
    with meta_default():
        result = run_cell(cell)
    rec = result.record
    assert rec.runtime == {"device": "cpu", "dtype": "float32", "torch": torch.__version__}
    assert all(torch.isfinite(torch.tensor(v)) for v in rec.trace["losses"])
    assert rec.metrics["psnr_db_mean"] == rec.metrics["psnr_db_mean"]  # scored: a number, not NaN


@pytest.mark.parametrize("name", sorted(DEFENSE_TABLES))
def test_defended_client_step_makes_every_tensor_on_an_explicit_device(name):
    config = {**CLASSIFIER, "defenses": [DEFENSE_TABLES[name]], "attacks": {"ig": {"iterations": 1}},
              "run": {"device": "cpu"}}
    cell = _cell(config)
    with meta_default():
        rec = run_cell(cell).record
    assert rec.defense != "none"
    assert rec.runtime["device"] == "cpu"


def test_the_cpu_numbers_do_not_change_with_run_set():
    config = {**CLASSIFIER, "attacks": {"ig": {"iterations": 3}}}
    plain, explicit = (run_cell(_cell(c)).record for c in (config, {**config, "run": {"device": "cpu"}}))
    assert plain.trace["losses"] == explicit.trace["losses"]
    assert plain.metrics == explicit.metrics
    # [run] enters the config hash only when set: configs that do not set it keep their hashes.
    assert "run" not in parse_config({"name": "dev", **config}).raw
    assert plain.config_hash != explicit.config_hash


def test_float64_runs_the_cell_in_float64(monkeypatch):
    # Secure aggregation computes the other clients' updates from the pool: those batches follow the model too.
    config = {**CLASSIFIER, "defenses": [{"name": "secure_agg", "clients": 2}], "attacks": {"ig": {"iterations": 2}},
              "run": {"dtype": "float64"}}
    seen = []
    original = cell_module.cell_record

    def spy(outcome):
        seen.extend(t.dtype for t in outcome.observations[0].update.tensors)
        return original(outcome)

    monkeypatch.setattr(cell_module, "cell_record", spy)
    rec = run_cell(_cell(config)).record
    assert rec.runtime["dtype"] == "float64" and rec.metrics["psnr_db_mean"] > 0
    assert seen and set(seen) == {torch.float64}


def test_device_names_and_missing_devices():
    assert resolve("cpu").device == torch.device("cpu")
    assert resolve("auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="run.device: unknown device 'gpu'"):
        parse_config({"run": {"device": "gpu"}})
    with pytest.raises(ConfigError, match="run.dtype: unknown dtype 'float16'"):
        parse_config({"run": {"dtype": "float16"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_naming_the_key(tmp_path, capsys):
    path = tmp_path / "cuda.toml"
    path.write_text('name = "c"\n[data]\nsource = "digits"\nsize = 16\n[scenario]\nmodel = "lenet"\n'
                    '[attacks.ig]\niterations = 2\n[output]\nlpips = false\n[run]\ndevice = "cuda"\n')
    out = tmp_path / "out"
    code = main(["audit", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "run.device: 'cuda' but this machine has no CUDA device" in err
    assert not out.exists()


def test_on_cuda_ray_tasks_ask_for_gpus_and_local_cells_share_one_process(monkeypatch):
    """No GPU here: the run's device is made to resolve to CUDA and the engines' map records what it was given."""
    from giaudit.config import RunSection
    from giaudit.device import Runtime
    from giaudit.engine import LocalEngine, RayEngine
    from giaudit.orchestration.run import run_cells

    monkeypatch.setattr(RunSection, "runtime", lambda self: Runtime(torch.device("cuda", 0), torch.float32))
    seen = []

    def record_map(self, fn, tasks, **kw):
        seen.append((type(self).__name__, getattr(self, "workers", None), getattr(self, "num_gpus", None)))
        return iter(())

    for cls in (LocalEngine, RayEngine):
        monkeypatch.setattr(cls, "map", record_map)
    monkeypatch.setattr(RayEngine, "__enter__", lambda self: self)
    monkeypatch.setattr(RayEngine, "__exit__", lambda self, *exc: None)
    spec = parse_config({"name": "dev", **CLASSIFIER, "attacks": {"ig": {"iterations": 1}},
                         "run": {"device": "cuda", "gpus_per_task": 0.25}})
    cells = plan_cells(spec, "none")
    list(run_cells(spec, cells, LocalEngine(4)))
    list(run_cells(spec, cells, RayEngine()))
    assert seen == [("LocalEngine", 1, None), ("RayEngine", None, 0.25)]
