"""Auditing a model giaudit does not ship: a user's factory, its saved weights, their data's normalisation.

The model (two convolutions with BatchNorm, 7 classes, 48 px RGB) is defined here, written beside the
config as the user's own module, and audited from saved weights (a safetensors file and a torch state dict)
through the CLI and through `giaudit.audit`, untrained and briefly trained. Bad input (a factory that
raises, returns something else or needs an argument; weights that do not fit or hold objects; a mean of the
wrong length) fails as one line naming the key or file, exit 2, with nothing written.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import giaudit
from giaudit.cli import main
from giaudit.config import load_config
from giaudit.errors import ConfigError
from giaudit.fl import normalisation_of
from giaudit.scenario.build import global_model, load_data
from giaudit.scenario.client import pretrain
from giaudit.scenario.factory import call_factory, import_user_module
from giaudit.scenario.models import seeded_init

# The user's module: what a deployment's own code looks like (not giaudit's).
MODULE = "own_twoconv_net"
SOURCE = '''
import torch
from torch import nn


class TwoConv(nn.Module):
    def __init__(self, classes, width, size):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * (size // 2) ** 2, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


def make_net(classes, width=16, size=48):
    return TwoConv(classes, width, size)


def linear(classes, size=48):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, classes))


def broken(classes):
    raise RuntimeError("no GPU weights here")


def not_a_model(classes):
    return {"classes": classes}
'''
# Seven real RGB photographs shipped with scikit-image, one class each.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]
ARGS = {"classes": 7, "width": 16}
# IG's bar on the batch-1 image: the uniform start is about 8 dB from these photographs; 200 iterations reached
# 14.6-27.1 dB untrained and 25.9-28.0 dB briefly trained over eight initialisations of the model
# (benchmarks/own_model.py --inits 8); the tests use initialisation 0.
PSNR_BAR = 14.0


def config_text(weights: str = "untrained.safetensors", *, scenario: str = "", mean: list[float] = MEAN,
                model: str = f"{MODULE}:make_net", args: str = "{ classes = 7, width = 16 }") -> str:
    return f"""
name = "own"
seeds = [0]
[data]
source = "folder"
path = "photos"
size = 48
mean = {mean}
std = {STD[:len(mean)]}
pool_every = 1
[scenario]
model = "{model}"
model_args = {args}
weights = "{weights}"
bn_mode = "eval"
{scenario}
[attacks.ig]
iterations = 200
tv_weight = 0.1
[output]
lpips = false
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Path:
    """The user's folder: their model module, their photos, the untrained and a briefly trained state."""
    import skimage.data

    root = tmp_path_factory.mktemp("deployment")
    (root / f"{MODULE}.py").write_text(SOURCE)
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()[..., :3]
        (root / "photos" / name).mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(4):
            s = int(min(h, w) * rng.uniform(0.8, 1.0))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            Image.fromarray(img[y:y + s, x:x + s]).resize((48, 48), Image.BILINEAR).save(root / "photos" / name
                                                                                         / f"{i}.png")
    untrained = seeded_init(lambda: call_factory("scenario.model", f"{MODULE}:make_net", ARGS, root),
                            torch.Generator().manual_seed(0))
    save_file(untrained.state_dict(), root / "untrained.safetensors")
    (root / "audit.toml").write_text(config_text())
    spec = load_config(root / "audit.toml")
    images = load_data(spec.data)
    trained, _ = global_model(spec.data, spec.scenario, images.spec, torch.Generator().manual_seed(1), root)
    # Briefly: five SGD steps at lr 0.005 (accuracy on these images 0.7-1.0 over four initialisations). Trained
    # harder (lr 0.02) the model is certain of some images, their gradient is exactly zero in float32 and
    # nothing is left to invert.
    pretrain(trained, images, 5, torch.Generator().manual_seed(2), lr=0.005, batch_size=8)
    torch.save(trained.state_dict(), root / "trained.pt")
    return root


def test_lookup_order_sys_path_then_cwd_then_config_folder(tmp_path, monkeypatch):
    cwd, base = tmp_path / "cwd", tmp_path / "base"
    for folder, where in ((cwd, "cwd"), (base, "base")):
        folder.mkdir()
        (folder / "own_lookup_probe.py").write_text(f"WHERE = {where!r}\n")
        (folder / "own_lookup_only_base.py").write_text(f"WHERE = {where!r}\n") if where == "base" else None
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(cwd))])
    for name in ("own_lookup_probe", "own_lookup_only_base", "json"):
        monkeypatch.delitem(sys.modules, name, raising=False) if name != "json" else None
    assert import_user_module("k", "own_lookup_probe", base).WHERE == "cwd"
    assert import_user_module("k", "own_lookup_only_base", base).WHERE == "base"
    (base / "json.py").write_text("WHERE = 'base'\n")
    assert not hasattr(import_user_module("k", "json", base), "WHERE")  # sys.path first: the standard library's
    with pytest.raises(ConfigError, match="k: no module 'own_nowhere'"):
        import_user_module("k", "own_nowhere", base)


def _psnr_and_model(records) -> tuple[float, dict]:
    (rec,) = records
    return rec.metrics["psnr_db_mean"], dict(rec.model)


def test_own_model_from_safetensors_through_the_cli(deployment, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["audit", str(deployment / "audit.toml"), "--out", str(out), "--no-progress", "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    store = giaudit.results.load_results(out)
    psnr, model = _psnr_and_model(store.records)
    assert psnr > PSNR_BAR
    weights = deployment / "untrained.safetensors"
    assert model == {"factory": f"{MODULE}:make_net", "args": ARGS, "weights": str(weights),
                     "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert store.records[0].scenario == f"folder48-{MODULE}.make_net-fedsgd-b1"


def test_trained_state_dict_through_the_api(deployment):
    spec = load_config(deployment / "audit.toml")
    spec = spec.replace(scenario={**spec.raw["scenario"], "weights": str(deployment / "trained.pt")})
    # The state the audit attacks is the file's: the cell's global model holds the trained weights.
    images = load_data(spec.data)
    model, digest = global_model(spec.data, spec.scenario, images.spec, torch.Generator().manual_seed(5),
                                 spec.base)
    saved = torch.load(deployment / "trained.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert normalisation_of(model) is not None and normalisation_of(model).mean == tuple(MEAN)
    untrained = call_factory("scenario.model", f"{MODULE}:make_net", ARGS, deployment)
    untrained.load_state_dict(load_file_state(deployment / "untrained.safetensors"))
    untrained.register_forward_pre_hook(normalisation_of(model))
    with torch.no_grad():
        accuracy = [float((m.eval()(images.images).argmax(1) == images.labels).float().mean())
                    for m in (untrained, model)]
    assert accuracy[1] > accuracy[0] + 0.3  # the file's state is the trained one
    result = giaudit.audit(spec)
    psnr, info = _psnr_and_model(result.records)
    assert psnr > PSNR_BAR
    assert info["weights_sha256"] == digest == hashlib.sha256((deployment / "trained.pt").read_bytes()).hexdigest()
    assert result.frame["weights_sha256"].tolist() == [digest]


def test_normalisation_is_the_first_operation_of_forward(deployment):
    spec = load_config(deployment / "audit.toml")
    model, _ = global_model(spec.data, spec.scenario, load_data(spec.data).spec, torch.Generator().manual_seed(0),
                            spec.base)
    plain = call_factory("scenario.model", f"{MODULE}:make_net", ARGS, deployment)
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    x = torch.rand((2, 3, 48, 48), generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-6)
    assert list(model.state_dict()) == list(plain.state_dict())  # the deployment's names, nothing added


def _bad_weights(deployment: Path, tmp: Path) -> dict[str, Path]:
    state = load_file_state(deployment / "untrained.safetensors")
    missing = {k: v for k, v in state.items() if k != "bn1.running_mean"}
    unexpected = {**state, "extra.weight": torch.zeros(3)}
    shape = {**state, "head.weight": torch.zeros(5, 4)}
    out = {}
    for name, st in (("missing", missing), ("unexpected", unexpected), ("shape", shape)):
        out[name] = tmp / f"{name}.safetensors"
        save_file(st, out[name])
    out["objects"] = tmp / "objects.pt"
    torch.save({"model": state, "optimizer": Exploit()}, out["objects"])
    return out


class Exploit:
    """An object a pickle would construct (and run code for) if it were unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def load_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


BAD = {
    "factory raises": (dict(model=f"{MODULE}:broken", args="{ classes = 7 }"),
                       f"scenario.model: {MODULE}:broken(classes=7) raised RuntimeError: no GPU weights here"),
    "not a module": (dict(model=f"{MODULE}:not_a_model", args="{ classes = 7 }"),
                     f"scenario.model: {MODULE}:not_a_model returned a dict, not a torch.nn.Module"),
    "missing argument": (dict(args="{ width = 16 }"),
                         f"scenario.model_args: {MODULE}:make_net cannot be called with these arguments "
                         "(missing a required argument: 'classes'"),
    "unknown module": (dict(model="own_absent_module:make"), "scenario.model: no module 'own_absent_module'"),
    "missing key": (dict(weights="missing"), "does not fit the model: missing keys bn1.running_mean"),
    "unexpected key": (dict(weights="unexpected"), "does not fit the model: unexpected keys extra.weight"),
    "wrong shape": (dict(weights="shape"),
                    "shape mismatch head.weight (5, 4) in the file, (7, 9216) in the model"),
    "pickled objects": (dict(weights="objects"), "holds objects other than tensors, which are never unpickled"),
    "mean length": (dict(mean=[0.5]), "data.mean: 1 values, but the images have 3 channels"),
    "classes": (dict(scenario="num_classes = 9"), "scenario.num_classes: the model from"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_input_is_one_line_naming_the_key(case, deployment, tmp_path, capsys):
    kw, expected = BAD[case]
    weights = kw.pop("weights", None)
    files = _bad_weights(deployment, tmp_path) if weights else {}
    text = config_text(str(files[weights]) if weights else str(deployment / "untrained.safetensors"), **kw)
    path = tmp_path / "bad.toml"
    path.write_text(text.replace('path = "photos"', f'path = "{deployment / "photos"}"'))
    out = tmp_path / "out"
    code = main(["audit", str(path), "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "unpickled!" not in err, err
    assert expected in err, err
    if weights:
        assert str(files[weights]) in err  # the file is named
    assert not out.exists()  # nothing written


def test_bad_factory_through_a_real_cli_process(deployment, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(config_text(str(deployment / "untrained.safetensors"), model=f"{MODULE}:broken",
                                args="{ classes = 7 }").replace('path = "photos"',
                                                                f'path = "{deployment / "photos"}"'))
    path.with_name(f"{MODULE}.py").write_text(SOURCE)
    proc = subprocess.run([sys.executable, "-m", "giaudit.cli", "audit", str(path), "--out", str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"giaudit: error: scenario.model: {MODULE}:broken(classes=7) raised RuntimeError: no GPU weights here"]
    assert not (tmp_path / "out").exists()


def test_a_capture_builds_its_model_through_the_same_factory(deployment, tmp_path):
    from giaudit.scenario.capture import CaptureScenario, write_capture
    from giaudit.threat import threat_model

    ref = f"{MODULE}:linear"
    state = {k: v.detach().numpy() for k, v in call_factory("k", ref, {"classes": 7}, deployment).state_dict().items()}
    folder = write_capture(tmp_path / "c", global_arrays=state, update_arrays={k: v + 0.01 for k, v in state.items()},
                           meta={"training": {"lr": 0.1, "local_epochs": 1, "batch_size": 1, "num_examples": 1},
                                 "data": {"shape": [3, 48, 48], "num_classes": 7}})
    scen = CaptureScenario.build(folder, ref, threat_model(), base=deployment, factory_args={"classes": 7},
                                 normalisation=(tuple(MEAN), tuple(STD)))
    assert normalisation_of(scen.model) is not None and scen.model[1].out_features == 7
    obs, _ = scen.simulate()
    assert all(torch.allclose(t, torch.full_like(t, 0.01), atol=1e-6) for t in obs.update.tensors)
    with pytest.raises(ConfigError, match="scenario.model_args: .*missing a required argument: 'classes'"):
        CaptureScenario.build(folder, ref, threat_model(), base=deployment, factory_args={})


def test_new_weights_under_the_same_name_recompute_the_cells(deployment, tmp_path):
    from giaudit.orchestration.plan import plan_cells

    path = tmp_path / "global.safetensors"
    path.write_bytes((deployment / "untrained.safetensors").read_bytes())
    text = config_text(str(path)).replace('path = "photos"', f'path = "{deployment / "photos"}"')
    (tmp_path / "a.toml").write_text(text)
    before = plan_cells(load_config(tmp_path / "a.toml"), "none")[0].config_hash
    trained = torch.load(deployment / "trained.pt", weights_only=True)
    save_file(trained, path)
    after = plan_cells(load_config(tmp_path / "a.toml"), "none")[0].config_hash
    assert before != after


@pytest.mark.parametrize("config, expected", [
    ({"scenario": {"model": "lenet", "model_args": {"k": 1}}}, "scenario.model_args: keyword arguments of a factory"),
    ({"scenario": {"model": "mynet"}}, "scenario.model: unknown model 'mynet'"),
    ({"scenario": {"model": "my-net:build"}}, "scenario.model: expected 'package.module:factory'"),
    ({"scenario": {"model": "m:f", "width": 8}}, "scenario.width: sets the size of a built-in model"),
    ({"scenario": {"model": "ddpm_unet", "num_classes": 3}}, "scenario.num_classes: a DDPM has no classes"),
    ({"scenario": {"model": "lenet", "num_classes": 1}}, "scenario.num_classes: must be >= 2"),
    ({"data": {"mean": [0.5]}}, "data.std: data.mean and data.std go together"),
    ({"data": {"mean": [0.5, 0.5], "std": [0.2]}}, "data.std: has 1 values, data.mean has 2"),
    ({"data": {"mean": [0.5], "std": [0.0]}}, "data.std: every value must be > 0"),
    ({"scenario": {"weights": "nowhere.safetensors"}}, "scenario.weights: file"),
])
def test_model_keys_checked_while_the_config_is_parsed(config, expected, tmp_path):
    from giaudit.config import parse_config

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_config(config, str(tmp_path / "c.toml"))
