"""Flower capture: real flwr simulations (subprocesses) with the capture mod, audited by `giaudit audit`:

- the example's BatchNorm variant (a shuffling DataLoader of batch 1 over 2 epochs): every array round-trips (0-d
  BatchNorm counters included), the recorded steps reproduce the update exactly, the fingerprint admits the
  deployed factory and refuses one with another activation;
- the same with Flower's LocalDpMod after the capture mod (one client round through the app's ClientApp and its
  mods, without a second simulation): the report names it and its disclosed clip norm, and reconstruction
  degrades.

Also, in-process: a shuffling loader's recorded steps where the order changes the update (the default order
misses it), the capture format's checks against the model factory, the deployment's defenses and the server
view.
"""
from __future__ import annotations

import dataclasses
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
from giaudit.errors import ConfigError, DataError
from giaudit.fl import compute_update
from giaudit.orchestration import run_audit
from giaudit.report import render
from giaudit.results import AuditRecord
from giaudit.scenario.capture import CaptureScenario, load_capture, write_capture
from giaudit.scenario.factory import call_factory
from giaudit.threat import threat_model

# The Flower simulation starts Ray: the tests that use it run on the worker that runs every other test that starts
# Ray; the in-process tests go wherever there is room.
ON_RAY = pytest.mark.xdist_group("ray")

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


# One training round of client 0 through the example's ClientApp, its mods included, in this process: the train
# message the simulation's server would send (the initial global model and the fit config), without Ray.
_CLIENT_ROUND = r"""
import sys, time
from pathlib import Path
from flwr.common import Context, FitIns, Message, MessageType, Metadata, RecordDict, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
sys.path.insert(0, sys.argv[1])
import app
out, dp, bn = Path(sys.argv[2]), sys.argv[3] == "dp", True
_server, client_app = app.build_apps(out, dp, bn)
init = ndarrays_to_parameters([v.detach().numpy() for v in app.make_bn_model().state_dict().values()])
fit = {"lr": 0.1, "local-epochs": app.BN_EPOCHS, "batch-size": app.BN_BATCH}
meta = Metadata(run_id=1, message_id="train-1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
reply = client_app(Message(content=compat.fitins_to_recorddict(FitIns(init, fit), keep_input=True), metadata=meta),
                   context)
assert not reply.has_error(), reply.error
"""


def _simulations(root: Path) -> dict[str, Path]:
    """The example app's BatchNorm variant in a real Flower simulation (a subprocess with its own Ray) and, beside
    it, the same variant with LocalDpMod for one client round through the same ClientApp and mods in a plain
    subprocess (a second Ray start-up would double the cost and test nothing the first does not); client 0's
    capture folder of each."""
    pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'giaudit[flower]'")
    # No bytecode: the app imports task.py from examples/flower/, and the test writes nowhere but tmp_path.
    # RAY_ADDRESS=local: the simulation starts its own Ray, never one another test left an address for.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1",
           "RAY_ADDRESS": "local"}
    commands = {"bn": [str(APP / "app.py"), "--out", str(root / "bn"), "--bn"],
                "bn-dp": ["-c", _CLIENT_ROUND, str(APP), str(root / "bn-dp"), "dp"]}
    procs = [subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for cmd in commands.values()]
    for proc in procs:
        try:
            _out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-2000:]
    return {name: root / name / "round-1" / "client-0" for name in commands}


def _app_copy(folder: Path) -> Path:
    """The example's task.py copied into `folder`: a config written there resolves `task:make_model` beside
    itself, as examples/flower/audit.toml does, and nothing is written into examples/."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP / "task.py", folder / "task.py")
    return folder


def _audit(tmp_path: Path, capture: Path, name: str, attack: str, options: str,
           factory: str = "task:make_model") -> AuditRecord:
    cfg = _app_copy(tmp_path / f"app-{name}") / "audit.toml"
    cfg.write_text(AUDIT.format(capture=capture, attack=attack, options=options).replace("task:make_model", factory))
    store = run_audit(load_config(cfg), tmp_path / name, show_progress=False, engine=LocalEngine(1))
    render(store)
    return store.records[0]


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    return _simulations(tmp_path_factory.mktemp("flower"))




@ON_RAY
def test_flower_capture_is_what_left_the_client(captures):
    """What the capture mod and the strategy wrapper wrote: the client's view with its training details, its
    steps, the deployed model's fingerprint and its (declared, empty) defenses; the server's view per client."""
    bn = captures["bn"]
    cap = load_capture(bn)
    assert cap.meta["view"] == "client"
    assert {k: v for k, v in cap.meta["training"].items() if k != "order"} == {
        "lr": 0.1, "local_epochs": 2, "batch_size": 1, "num_examples": 2}
    assert cap.batch is not None and cap.batch[0].shape == (2, 1, 16, 16)
    assert cap.probe is not None and cap.meta["deployment_defenses"] == []
    server = [json.loads(p.read_text()) for p in (bn.parents[1] / "server" / "round-1").glob("*/capture.json")]
    assert len(server) == 2 and {s["view"] for s in server} == {"server"}
    assert all(s["deployment_defenses"] == [] and s["has_probe"] for s in server)


BN_ATTACK = ("ig", "iterations = 400\nlr = 0.1\ntv_weight = 1e-4")


@ON_RAY
def test_batchnorm_shuffled_capture_round_trips_and_unrolls_the_real_steps(tmp_path, captures):
    cap = load_capture(captures["bn"])
    app = _app_copy(tmp_path / "app")
    model = call_factory("scenario.model_factory", "task:make_bn_model", None, app)
    state = model.state_dict()
    # Every array keeps its shape and dtype: BatchNorm's 0-d int64 counters too.
    assert [a.shape for a in cap.global_arrays.values()] == [tuple(v.shape) for v in state.values()]
    assert [a.dtype for a in cap.global_arrays.values()] == [v.numpy().dtype for v in state.values()]
    order = cap.meta["training"]["order"]
    assert order == [[0], [1], [1], [0]]  # the shuffling loader's real steps over 2 epochs, not 0, 1, 0, 1

    # The unrolling over the recorded steps reproduces what the Flower client sent.
    scen = CaptureScenario.build(captures["bn"], "task:make_bn_model", threat_model(), base=app)
    obs, _truth = scen.simulate()
    x, y = torch.from_numpy(cap.batch[0]), torch.from_numpy(cap.batch[1])
    real = compute_update(scen.model, x, y, scen.protocol)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(real, obs.update.tensors)) < 1e-5

    # A factory with the same tensor shapes and another activation is refused by the fingerprint.
    (app / "wrong.py").write_text("from task import make_bn_model\n\ndef make():\n    return make_bn_model('relu')\n")
    with pytest.raises(ConfigError, match="scenario.model_factory: .*different function"):
        CaptureScenario.build(captures["bn"], "wrong:make", threat_model(), base=app)

    leak = _audit(tmp_path, captures["bn"], "bn", *BN_ATTACK, factory="task:make_bn_model")
    noised = _audit(tmp_path, captures["bn-dp"], "bn-dp", *BN_ATTACK, factory="task:make_bn_model")
    print(f"BatchNorm, shuffled: PSNR {leak.metrics['psnr_db_mean']:.2f} dB; with LocalDpMod "
          f"{noised.metrics['psnr_db_mean']:.2f} dB")
    assert leak.defense == "none" and leak.metrics["psnr_db_mean"] >= 12.0 and leak.metrics["ssim_worst"] >= 0.6
    assert noised.defense == "LocalDpMod" and noised.metrics["psnr_db_mean"] < leak.metrics["psnr_db_mean"] - 5.0
    assert noised.disclosed["0:clip"] == {"clip_norm": 1.0} and noised.disclosed["1:noise"]["noise_sigma"] > 0
    report = (tmp_path / "bn-dp" / "report.md").read_text()
    assert "Under LocalDpMod" in report and "deployment: LocalDpMod (clipping_norm 1.0" in report
    assert "With no defense" not in report and "mnist5k" not in report  # the effective config: no simulated data
    assert "step_order" in report and "recorded (4 steps)" in report


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


def test_recorded_steps_of_a_shuffling_loader_reproduce_the_update(tmp_path):
    """4 digits, a shuffling DataLoader of batch 2 over 2 epochs, each step handed to `record_step`: which digits
    share a batch changes BatchNorm's statistics, so the default order (consecutive batches) misses the update
    and the recorded one reproduces it."""
    pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'giaudit[flower]'")
    from types import SimpleNamespace

    from flwr.app import RecordDict
    from torch.utils.data import DataLoader, TensorDataset

    from giaudit.integrations.flower import STEPS_KEY, _steps_batch, record_step

    app = _app_copy(tmp_path / "app")
    sys.path.insert(0, str(app))
    try:
        import task
    finally:
        sys.path.remove(str(app))
    x, y = task.client_batch(0, 4, size=task.BN_SIZE)
    model = task.make_bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    context = SimpleNamespace(state=RecordDict())
    loader = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        for xb, yb in loader:
            record_step(context, xb, yb)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    batch, order = _steps_batch(context.state[STEPS_KEY])
    assert sorted(i for step in order[:2] for i in step) == [0, 1, 2, 3] and order[2:] != order[:2]
    folder = write_capture(tmp_path / "c", global_arrays={k: v.numpy() for k, v in before.items()},
                           update_arrays={k: v.detach().numpy() for k, v in model.state_dict().items()},
                           meta={"training": {"lr": 0.1, "local_epochs": 2, "batch_size": 2, "num_examples": 4,
                                              "order": order},
                                 "data": {"shape": [1, task.BN_SIZE, task.BN_SIZE], "num_classes": 10}},
                           batch=batch)
    scen = CaptureScenario.build(folder, "task:make_bn_model", threat_model(), base=app)
    obs, _ = scen.simulate()
    bx, by = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])

    def gap(protocol: object) -> float:
        got = compute_update(scen.model, bx, by, protocol)  # type: ignore[arg-type]
        return max(float((a - b).detach().abs().max()) for a, b in zip(got, obs.update.tensors))

    assert gap(scen.protocol) < 1e-5
    assert gap(dataclasses.replace(scen.protocol, order=None)) > 1e-2
    assert not any("order not recorded" in n for n in scen.notes)


class _Buffers(torch.nn.Module):
    """Every kind of array a state dict holds: float weights, BatchNorm's 0-d int64 counter, a bool mask, an
    int32 table, a float16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("table", torch.arange(4, dtype=torch.int32).view(2, 2))
        self.register_buffer("lowp", torch.ones(3, dtype=torch.float16))
        self.fc = torch.nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def test_capture_round_trips_every_array_exactly(tmp_path):
    state = {k: v.numpy() for k, v in _Buffers().state_dict().items()}
    cap = load_capture(write_capture(tmp_path / "c", global_arrays=state, update_arrays=state, meta={}))
    for arrays in (cap.global_arrays, cap.update_arrays):
        assert list(arrays) == list(state)
        for k, v in state.items():
            assert arrays[k].shape == v.shape and arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v), k
    assert cap.global_arrays["bn.num_batches_tracked"].shape == ()


def test_deployment_defenses_recorded_described_and_declared(tmp_path):
    """LocalDpMod is clip + Gaussian noise of Flower's own sigma; a server DP wrapper is split into what acts
    before the server's view (clients clip) and after it (noise at aggregation); a capture without any record
    is "not declared"; a config may declare them, but not on top of recorded ones."""
    flwr = pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'giaudit[flower]'")
    from flwr.client.mod import LocalDpMod
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    from giaudit.integrations.flower import describe_mod, describe_strategy
    from giaudit.orchestration.cell import build_defense
    from giaudit.scenario.capture import deployment

    assert flwr is not None
    d = describe_mod(LocalDpMod(clipping_norm=1.0, sensitivity=0.1, epsilon=10.0, delta=1e-5), {})
    assert d["as"][0] == {"name": "clip", "max_norm": 1.0}
    assert d["as"][1]["sigma"] == pytest.approx(0.1 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 10.0, rel=1e-12)
    wrapped = DifferentialPrivacyClientSideFixedClipping(FedAvg(), noise_multiplier=1.0, clipping_norm=0.5,
                                                         num_sampled_clients=2)
    parts = describe_strategy(wrapped)
    assert [p["before_capture"] for p in parts] == [True, False]
    dep = deployment({"deployment_defenses": parts}, None)
    assert [x.name for x in dep.chain.defenses] == ["clip"] and "after the capture point" in dep.lines[1]

    app = _app_copy(tmp_path / "app")
    state = {k: v.numpy() for k, v in call_factory("scenario.model_factory", "task:make_model", None, app).state_dict().items()}
    meta = {"training": {"lr": 0.1, "local_epochs": 1, "batch_size": 1, "num_examples": 1},
            "data": {"shape": [1, 32, 32], "num_classes": 10}}
    folder = write_capture(tmp_path / "c", global_arrays=state, update_arrays=state, meta=meta)
    raw = {"scenario": {"capture": str(folder), "model_factory": "task:make_model"}}
    from giaudit.config import parse_config

    spec = parse_config(raw, str(app / "audit.toml"))
    assert build_defense(spec)[0] == "not declared"
    scen = CaptureScenario.build(folder, "task:make_model", threat_model(), base=app)
    assert any("not declared" in n for n in scen.notes) and any("not verified" in n for n in scen.notes)
    declared = parse_config({"scenario": {**raw["scenario"], "deployment_defenses": [
        {"name": "clip", "max_norm": 2.0}]}}, str(app / "audit.toml"))
    assert build_defense(declared)[0] == "clip"
    obs, _ = CaptureScenario.build(folder, "task:make_model", threat_model(), base=app,
                                   declared=declared.scenario.deployment_defenses).simulate()
    assert [(d.name, d.params) for d in obs.disclosed] == [("clip", {"clip_norm": 2.0})]
    recorded = write_capture(tmp_path / "r", global_arrays=state, update_arrays=state,
                             meta={**meta, "deployment_defenses": []})
    with pytest.raises(ConfigError, match="scenario.deployment_defenses: the capture records"):
        deployment(json.loads((recorded / "capture.json").read_text()), [{"name": "clip", "max_norm": 1.0}])


@pytest.mark.parametrize("table, key", [
    ({"data": {"source": "digits"}}, "data.source"),
    ({"data": {"size": 16}}, "data.size"),
    ({"scenario": {"model": "convnet"}}, "scenario.model"),
    ({"scenario": {"protocol": "fedavg"}}, "scenario.protocol"),
    ({"scenario": {"batch_size": 4}}, "scenario.batch_size"),
])
def test_capture_refuses_keys_it_would_ignore(tmp_path, table, key):
    from giaudit.config import parse_config

    scenario = {"capture": str(tmp_path), "model_factory": "task:make_model", **table.get("scenario", {})}
    with pytest.raises(ConfigError, match=key):
        parse_config({**table, "scenario": scenario})


def test_server_view_capture_shows_its_reconstructions(tmp_path, capsys):
    """No batch in the capture: nothing is measured, the report shows the reconstructions alone and says that
    no ground truth exists; the console prints no nan."""
    from giaudit.cli import main

    app = _app_copy(tmp_path / "app")
    model = call_factory("scenario.model_factory", "task:make_model", None, app)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    upd = {k: v - 0.001 for k, v in state.items()}
    folder = write_capture(tmp_path / "server-1", global_arrays=state, update_arrays=upd,
                           meta={"view": "server", "training": {"lr": 0.1, "local_epochs": 1, "batch_size": 1,
                                                                "num_examples": 1},
                                 "data": {"shape": [1, 32, 32], "num_classes": 10}, "deployment_defenses": []})
    cfg = app / "audit.toml"
    cfg.write_text(AUDIT.format(capture=folder, attack="ig", options="iterations = 5"))
    assert main(["audit", str(cfg), "--out", str(tmp_path / "run"), "--engine", "local", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "no ground truth" in out
    report = (tmp_path / "run" / "report.md").read_text()
    assert "no ground truth" in report and "figures/grid_000_" in report
    assert (tmp_path / "run" / "figures").is_dir() and any((tmp_path / "run" / "figures").glob("grid_000_*.png"))
