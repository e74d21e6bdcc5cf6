"""`attack_update`: attack a (model, update) pair someone already holds, outside an audit config."""
from __future__ import annotations

import json

import pytest
import torch

from giaudit.attacks import attack_update
from giaudit.errors import ConfigError
from giaudit.fl import compute_update
from giaudit.metrics.image import psnr
from giaudit.scenario.models import build_model
from giaudit.types import ClientProtocol

FEDAVG = ClientProtocol("fedavg", local_steps=2, local_lr=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(mnist32):
    """A LeNet (ReLU) and the real FedSGD gradient of one MNIST digit."""
    model = build_model("lenet_relu", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))
    x, y = mnist32.images[7:8].clone(), mnist32.labels[7:8].clone()
    return model, x, y, compute_update(model, x, y)


def test_reconstruction_is_closer_than_the_random_start_and_names_what_it_used(case):
    model, x, y, grad = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = attack_update(model, grad, data_shape=(1, 32, 32), budget={"iterations": 100})
    # One iteration returns the start itself (the best iterate so far is the one before the first step).
    start = attack_update(model, grad, data_shape=(1, 32, 32), budget={"iterations": 1})
    assert out.images.shape == (1, 1, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1
    assert float(psnr(out.images, x)[0]) > float(psnr(start.images, x)[0]) + 5
    assert out.labels.tolist() == y.tolist()
    r = out.record
    assert json.loads(json.dumps(r)) == r
    assert (r["attack"], r["display_name"], r["label_source"]) == ("ig", "Inverting Gradients", "idlg")
    assert r["iterations"] == len(r["losses"]) == 100 and r["restarts"] == 1 and r["wall_s"] > 0
    assert r["num_classes"] == 10 and r["batch_size"] == 1 and r["params"]["lr"] == 0.1
    assert r["threat"]["granted"] == ["batch_size"] and r["threat"]["used"] == ["batch_size"]
    assert r["threat"]["sok_class"] == "B" and r["losses"][-1] < r["losses"][0]
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])


def test_dict_and_tuple_forms_agree_and_shapes_with_or_without_the_batch(case):
    model, _, _, grad = case
    named = {n: g for (n, _), g in zip(model.named_parameters(), grad)}
    budget = {"iterations": 5}
    a = attack_update(model, grad, data_shape=(1, 32, 32), budget=budget)
    b = attack_update(model, named, data_shape=(1, 1, 32, 32), budget=budget, device="cpu")
    c = attack_update(model, list(grad), data_shape=[1, 32, 32], batch_size=1, budget=budget)
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert a.record["losses"] == b.record["losses"]
    other = attack_update(model, grad, data_shape=(1, 32, 32), budget=budget, seed=1)
    assert not torch.equal(a.images, other.images)


def test_given_labels_are_an_oracle_and_a_delta_needs_training_details(case, mnist32):
    model, x, y, grad = case
    out = attack_update(model, grad, data_shape=(1, 32, 32), labels=y.tolist(), budget={"iterations": 2})
    assert out.record["label_source"] == "oracle" and "true_labels" in out.record["threat"]["used"]
    assert out.record["threat"]["oracles"]
    xs, ys = mnist32.images[:2], mnist32.labels[:2]
    delta = compute_update(model, xs, ys, FEDAVG)
    d = attack_update(model, delta, data_shape=(2, 1, 32, 32), kind="delta", protocol=FEDAVG,
                      budget={"iterations": 2, "restarts": 2, "workers": 1})
    assert d.images.shape == (2, 1, 32, 32) and d.record["restarts"] == 2 and len(d.record["restart_losses"]) == 2
    assert "training_details" in d.record["threat"]["used"] and d.record["kind"] == "delta"
    with pytest.raises(ConfigError, match="protocol: kind='delta' needs"):
        attack_update(model, delta, data_shape=(2, 1, 32, 32), kind="delta")
    with pytest.raises(ConfigError, match="protocol: a fedavg protocol"):
        attack_update(model, grad, data_shape=(1, 32, 32), protocol=FEDAVG)


def test_a_prior_attack_is_granted_its_prior(case):
    model, _, _, grad = case
    out = attack_update(model, grad, data_shape=(1, 32, 32), attack="gias_z", budget={"iterations": 2})
    assert out.record["display_name"] == "GIAS (latent only)"
    assert "surrogate_data" in out.record["threat"]["granted"] and out.record["threat"]["sok_class"] == "D"
    assert out.record["params"]["prior_spec"] == "mnist32"


@pytest.mark.parametrize("kwargs, message", [
    ({"update": "missing"}, r"update\['fc.bias'\]: missing"),
    ({"update": "extra"}, r"update\['head.weight'\]: not a parameter"),
    ({"update": "misshapen"}, r"update\['body.0.weight'\]: shape \(12, 1, 5\), the parameter's is \(12, 1, 5, 5\)"),
    ({"update": "short"}, r"update: 7 tensors for the model's 8 parameters"),
    ({"update": "nan"}, r"update\[0\] \(parameter 'body.0.weight'\): holds non-finite"),
    ({"attack": "nope"}, r"attack: unknown attack 'nope'; known: .*ig"),
    ({"lr": -1.0}, r"attacks\.ig\.lr: must be > 0"),
    ({"bogus": 1}, r"attacks\.ig\.bogus: unknown option"),
    ({"iterations": 5}, r"attacks\.ig\.iterations: a budget key"),
    ({"budget": {"iterations": 0}}, r"attacks\.ig\.iterations: must be >= 1"),
    ({"budget": {"iteration": 3}}, r"attacks\.ig\.iteration: unknown"),
    ({"kind": "weights"}, r"kind: expected 'gradient' or 'delta'"),
    ({"data_shape": (32, 32)}, r"data_shape: expected \(C, H, W\)"),
    ({"data_shape": (2, 1, 32, 32), "batch_size": 3}, r"batch_size: 3 disagrees"),
    ({"labels": [1, 2], "data_shape": (1, 1, 32, 32)}, r"labels: 2 labels for a batch of 1"),
    ({"labels": [10]}, r"labels: class indices must lie in \[0, 9\]"),
    ({"num_classes": 1}, r"num_classes: must be >= 2"),
    ({"seed": 1.5}, r"seed: expected an integer"),
])
def test_bad_input_names_what_is_wrong(case, kwargs, message):
    model, _, _, grad = case
    named = {n: g for (n, _), g in zip(model.named_parameters(), grad)}
    updates = {
        "missing": {k: v for k, v in named.items() if k != "fc.bias"},
        "extra": {**named, "head.weight": grad[0]},
        "misshapen": {**named, "body.0.weight": grad[0][..., 0]},
        "short": list(grad)[:-1],
        "nan": [torch.full_like(grad[0], float("nan")), *grad[1:]],
    }
    kwargs = dict(kwargs)
    update = updates[kwargs.pop("update")] if "update" in kwargs else grad
    kwargs.setdefault("data_shape", (1, 32, 32))
    kwargs.setdefault("budget", {"iterations": 1})
    with pytest.raises(ConfigError, match=message):
        attack_update(model, update, **kwargs)


def test_not_a_module_is_named(case):
    with pytest.raises(ConfigError, match="model: expected a torch.nn.Module, got dict"):
        attack_update({"w": 1}, case[3], data_shape=(1, 32, 32))


def test_num_classes_needs_a_linear_layer_or_the_argument():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    grad = tuple(torch.zeros_like(p) for p in conv.parameters())
    with pytest.raises(ConfigError, match="num_classes: the model has no nn.Linear"):
        attack_update(conv, grad, data_shape=(1, 8, 8))
