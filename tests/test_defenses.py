"""Defenses: oracle tests for the maths, behavioural tests against attacks, and bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from giaudit.defenses import DEFENSES, build_chain, load_defense_file
from giaudit.defenses.base import Chain
from giaudit.errors import ConfigError
from giaudit.fl import compute_update
from giaudit.replay import adapt_trial
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, SharedUpdate, disclosed_values

REPO = Path(__file__).resolve().parents[1]
FEDAVG = ClientProtocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=2)


@pytest.fixture(scope="module")
def pool(mnist32):
    return mnist32.subset(torch.arange(600))


def lenet(seed: int = 0) -> nn.Module:
    return build_model("lenet_relu", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(seed))


def scenario(pool, batch_size: int = 4, protocol: ClientProtocol = ClientProtocol(), model: nn.Module | None = None):
    return Scenario(model or lenet(), pool, protocol, batch_size, threat_model())


def simulate(scen, tables, seed: int = 1):
    defense = build_chain(tables) if tables else Chain(())
    return scen.simulate(defense, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---- DP-SGD (Opacus) ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [ClientProtocol(), FEDAVG], ids=["fedsgd", "fedavg"])
def test_dpsgd_without_clipping_or_noise_is_the_plain_update(pool, protocol):
    scen = scenario(pool, 4, protocol)
    plain, truth0 = simulate(scen, [])
    dp, truth1 = simulate(scen, [{"name": "dpsgd", "max_grad_norm": math.inf, "noise_multiplier": 0.0}])
    assert torch.equal(truth0.images, truth1.images)  # same batch
    # Opacus sums per-sample gradients instead of backpropagating the mean loss: equal up to float rounding.
    assert max_diff(plain.update.tensors, dp.update.tensors) < 1e-6
    assert dp.update.kind == plain.update.kind


def test_dpsgd_clips_each_sample(pool):
    from giaudit.defenses.dpsgd import dp_update

    model, bound = lenet(), 0.05
    x, y = pool.images[:4], pool.labels[:4]
    per_sample = [compute_update(model, x[i:i + 1], y[i:i + 1]) for i in range(4)]
    norms = [float(torch.sqrt(sum((t * t).sum() for t in g))) for g in per_sample]
    assert min(norms) > bound  # every sample is actually clipped
    clipped = [[t * (bound / n) for t in g] for g, n in zip(per_sample, norms)]
    expected = [sum(c[j] for c in clipped) / 4 for j in range(len(clipped[0]))]
    got = dp_update(model, x, y, ClientProtocol(), noise_multiplier=0.0, max_grad_norm=bound, generator=None)
    assert max_diff(got, expected) < 1e-6
    for i in range(4):  # one sample's DP gradient has norm at most the bound
        single = dp_update(model, x[i:i + 1], y[i:i + 1], ClientProtocol(), noise_multiplier=0.0,
                           max_grad_norm=bound, generator=None)
        assert float(torch.sqrt(sum((t * t).sum() for t in single))) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_dpsgd_epsilon_is_opacus_accountant(pool, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    scen = scenario(pool, 4)
    obs, _ = simulate(scen, [{"name": "dpsgd", "max_grad_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5,
                              "rounds": 50, "accountant": accountant}])
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=4 / 600)
    dp = obs.disclosed[0].params
    assert dp["dp_sample_rate"] == pytest.approx(4 / 600)
    assert dp["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)


def test_dpsgd_target_epsilon_and_noise(pool):
    scen = scenario(pool, 1)
    obs, _ = simulate(scen, [{"name": "dpsgd", "max_grad_norm": 1.0, "epsilon": 2.0, "delta": 1e-5, "rounds": 20}])
    assert 1.9 <= obs.disclosed[0].params["epsilon"] <= 2.0
    sigma = obs.disclosed[0].params["dp_noise_multiplier"]
    assert sigma > 0
    again, _ = simulate(scen, [{"name": "dpsgd", "max_grad_norm": 1.0, "epsilon": 2.0, "delta": 1e-5, "rounds": 20}])
    other, _ = simulate(scen, [{"name": "dpsgd", "max_grad_norm": 1.0, "epsilon": 2.0, "delta": 1e-5, "rounds": 20}],
                        seed=2)
    assert max_diff(obs.update.tensors, again.update.tensors) == 0.0  # seeded noise
    assert max_diff(obs.update.tensors, other.update.tensors) > 0.0


def test_dpsgd_batchnorm_rejected_or_converted(pool):
    convnet = build_model("convnet", channels=1, num_classes=10, size=32, width=4,
                          generator=torch.Generator().manual_seed(0))
    scen = scenario(pool, 2, model=convnet)
    with pytest.raises(ConfigError, match=r"defenses\[0\].*BatchNorm cannot support training with differential"):
        simulate(scen, [{"name": "dpsgd", "max_grad_norm": 1.0, "noise_multiplier": 0.5}])
    chain = build_chain([{"name": "dpsgd", "max_grad_norm": 1.0, "noise_multiplier": 0.5, "convert_batchnorm": True}])
    from giaudit.defenses.base import ClientStep

    step = chain.configure(ClientStep(ClientProtocol(), 2, 10, context={"pool": pool, "model": convnet}))
    converted = step.context["model"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in converted.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in convnet.modules())  # the caller's model is untouched
    obs, _ = scen.simulate(chain, generator=torch.Generator().manual_seed(0))
    assert [t.shape for t in obs.update.tensors] == [p.shape for p in converted.parameters()]


# ---- additive noise -------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_has_the_configured_std(distribution):
    d = build_chain([{"name": "noise", "sigma": 0.5, "distribution": distribution}])
    u = SharedUpdate((torch.zeros(200, 200),))
    out = d.transform(u, torch.Generator().manual_seed(0)).tensors[0]
    assert float(out.std()) == pytest.approx(0.5, rel=0.02)
    zero = build_chain([{"name": "noise", "sigma": 0}]).transform(u, torch.Generator().manual_seed(0))
    assert torch.equal(zero.tensors[0], u.tensors[0])


def test_ig_psnr_falls_as_gaussian_sigma_rises(pool):
    """IG on the ReLU LeNet, batch 1: more noise, worse reconstructions (fixed seeds; measured at 100 iterations,
    mean PSNR 16.1, 11.2, 5.0 dB, the same order on seeds 2 and 3)."""
    from giaudit.attacks import Budget, build_attack
    from giaudit.metrics.image import psnr

    torch.set_num_threads(1)
    scen = scenario(pool, 1)
    means = []
    for sigma in (0.001, 0.01, 0.1):
        values = []
        for seed in (0, 1):
            obs, truth = simulate(scen, [{"name": "noise", "sigma": sigma}], seed=seed)
            rec = build_attack("ig").reconstruct(obs, budget=Budget(iterations=100),
                                                 rng=torch.Generator().manual_seed(0))
            values.append(float(psnr(rec.images, truth.images)))
        means.append(sum(values) / len(values))
    assert means[0] > means[1] + 2 and means[1] > means[2] + 1, means


# ---- clipping, sparsification, quantisation --------------------------------------------------------

def test_clip_bounds_the_norm():
    d = build_chain([{"name": "clip", "max_norm": 1.0}])
    big = SharedUpdate((torch.full((10,), 3.0), torch.full((5,), 4.0)))
    out = d.transform(big, torch.Generator())
    assert float(out.flat().norm()) == pytest.approx(1.0, rel=1e-6)
    small = SharedUpdate((torch.full((4,), 0.1),))
    assert torch.equal(d.transform(small, torch.Generator()).tensors[0], small.tensors[0])


def test_topk_keeps_exactly_k_per_layer(pool):
    scen = scenario(pool, 4)
    obs, _ = simulate(scen, [{"name": "sparsify", "mode": "topk", "k": 7}])
    plain, _ = simulate(scen, [])
    for t, p in zip(obs.update.tensors, plain.update.tensors):
        assert int((t != 0).sum()) == 7
        kept = t != 0
        # the kept entries are the largest in magnitude, unchanged
        assert float(p.abs()[kept].min()) >= float(p.abs()[~kept].max())
        assert torch.equal(t[kept], p[kept])


def test_topk_global_and_fraction_and_random(pool):
    u = SharedUpdate((torch.randn(100, generator=torch.Generator().manual_seed(0)),
                      torch.randn(10, 10, generator=torch.Generator().manual_seed(1))))
    g = build_chain([{"name": "sparsify", "mode": "topk_global", "k": 15}]).transform(u, torch.Generator())
    assert int((g.flat() != 0).sum()) == 15
    f = build_chain([{"name": "sparsify", "sparsity": 0.9}]).transform(u, torch.Generator())
    assert [int((t != 0).sum()) for t in f.tensors] == [10, 10]
    r = build_chain([{"name": "sparsify", "mode": "random", "k": 3}])
    a = r.transform(u, torch.Generator().manual_seed(0))
    b = r.transform(u, torch.Generator().manual_seed(1))
    assert [int((t != 0).sum()) for t in a.tensors] == [3, 3]
    assert not torch.equal(a.tensors[0] != 0, b.tensors[0] != 0)


def test_error_feedback_carries_what_was_not_sent():
    from giaudit.defenses.base import ClientStep

    d = build_chain([{"name": "sparsify", "k": 2, "error_feedback": True}])
    state: dict = {}
    g = torch.Generator().manual_seed(0)
    updates = [SharedUpdate((torch.randn(8, generator=g),)) for _ in range(3)]
    sent = []
    for u in updates:
        d.configure(ClientStep(ClientProtocol(), 1, 10, context={"client_state": state}))
        sent.append(d.transform(u, torch.Generator()).tensors[0])
    total = sum(u.tensors[0] for u in updates)
    assert torch.allclose(sum(sent) + state["residual"][0], total, atol=1e-6)
    # without a client state (the audited round) nothing carries over
    d.configure(ClientStep(ClientProtocol(), 1, 10))
    assert int((d.transform(updates[0], torch.Generator()).tensors[0] != 0).sum()) == 2


def test_quantize_sign_and_kbit():
    u = SharedUpdate((torch.randn(50, generator=torch.Generator().manual_seed(0)),))
    s = build_chain([{"name": "quantize", "mode": "sign"}]).transform(u, torch.Generator()).tensors[0]
    assert torch.allclose(s.abs(), torch.full_like(s, float(u.tensors[0].abs().mean())))
    assert torch.equal(torch.sign(s), torch.sign(u.tensors[0]))
    q = build_chain([{"name": "quantize", "mode": "kbit", "bits": 3}]).transform(u, torch.Generator()).tensors[0]
    assert torch.unique(q).numel() <= 2 ** 3 - 1
    assert float((q - u.tensors[0]).abs().max()) <= float(u.tensors[0].abs().max()) / 3 / 2 + 1e-6


# ---- large batch, label disguise, secure aggregation ---------------------------------------------

def test_large_batch_sets_the_batch(pool):
    obs, truth = simulate(scenario(pool, 1), [{"name": "large_batch", "batch_size": 16}])
    assert truth.images.shape[0] == 16 and obs.batch_size == 16


def test_label_disguise_lowers_label_recovery(pool):
    from giaudit.attacks.labels import recover_labels
    from giaudit.metrics.evaluate import label_accuracy

    scen = scenario(pool, 1)

    def accuracy(tables) -> float:
        accs = []
        for seed in range(12):
            obs, truth = simulate(scen, tables, seed=seed)
            labels, _ = recover_labels(obs)
            accs.append(label_accuracy(labels, truth.labels))
        return sum(accs) / len(accs)

    plain = accuracy([])
    disguised = accuracy([{"name": "label_disguise", "mix": 0.7}])
    assert plain == 1.0
    assert disguised <= 0.5, disguised


def test_label_disguise_spreads_the_batch_over_few_labels(pool):
    for seed in range(3):
        _, truth = simulate(scenario(pool, 8), [{"name": "label_disguise", "labels_per_batch": 2}], seed=seed)
        counts = torch.bincount(truth.labels)
        assert sorted(counts[counts > 0].tolist()) == [4, 4]


def test_secure_aggregation(pool):
    scen = scenario(pool, 2)
    plain, t0 = simulate(scen, [])
    one, t1 = simulate(scen, [{"name": "secure_agg", "clients": 1}])
    assert torch.equal(t0.images, t1.images)
    assert all(torch.equal(a, b) for a, b in zip(plain.update.tensors, one.update.tensors))
    agg, t3 = simulate(scen, [{"name": "secure_agg", "clients": 3}])
    again, _ = simulate(scen, [{"name": "secure_agg", "clients": 3}])
    assert torch.equal(t0.images, t3.images)  # the audited client's batch is unchanged
    assert max_diff(agg.update.tensors, again.update.tensors) == 0.0
    assert max_diff(agg.update.tensors, plain.update.tensors) > 1e-4
    assert agg.disclosed[0].params["secure_agg_clients"] == 3


# ---- adaptive matching ---------------------------------------------------------------------------

def test_adapt_trial_replays_clip_then_sparsify(pool):
    scen = scenario(pool, 1)
    tables = [{"name": "clip", "max_norm": 0.1}, {"name": "sparsify", "sparsity": 0.9}]
    obs, truth = simulate(scen, tables)
    assert [d.key for d in obs.disclosed] == ["0:clip", "1:sparsify"]
    true_grad = compute_update(obs.model, truth.images, truth.labels)
    adapted = adapt_trial(true_grad, obs.disclosed, obs.update.tensors, batch_size=1)
    assert max_diff(adapted, obs.update.tensors) < 1e-7
    x = truth.images.clone().requires_grad_(True)
    trial = compute_update(obs.model, x, truth.labels, create_graph=True)
    loss = sum(((a - o) ** 2).sum() for a, o in zip(adapt_trial(trial, obs.disclosed, obs.update.tensors), obs.update.tensors))
    (g,) = torch.autograd.grad(loss, x)  # differentiable
    assert torch.isfinite(g).all()


# ---- every registered defense through the same checks -----------------------------------------------

EXAMPLES = {
    "dpsgd": {"max_grad_norm": 1.0, "noise_multiplier": 0.5, "delta": 1e-5},
    "noise": {"sigma": 0.01},
    "clip": {"max_norm": 0.5},
    "sparsify": {"sparsity": 0.9},
    "quantize": {"mode": "kbit", "bits": 4},
    "large_batch": {"batch_size": 6},
    "label_disguise": {"mix": 0.5, "labels_per_batch": 2},
    "secure_agg": {"clients": 2},
    "model_validation": {"check": "architecture"},
}


def test_every_defense_has_an_example():
    assert set(EXAMPLES) == set(DEFENSES.names())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("protocol", [ClientProtocol(), FEDAVG], ids=["fedsgd", "fedavg"])
def test_defense_contract(pool, name, protocol):
    scen = scenario(pool, 4, protocol)
    tables = [{"name": name, **EXAMPLES[name]}]
    obs, truth = simulate(scen, tables)
    again, _ = simulate(scen, tables)
    shapes = [p.shape for p in scen.model.parameters()]
    assert [t.shape for t in obs.update.tensors] == shapes
    assert all(torch.isfinite(t).all() for t in obs.update.tensors)
    assert max_diff(obs.update.tensors, again.update.tensors) == 0.0  # reproducible from the seed
    plain = json.dumps(disclosed_values(obs.disclosed))  # disclosures are plain data
    assert [d.key for d in obs.disclosed] == [f"0:{name}"]
    assert "images" not in plain
    # The report's description names the defense and every configured parameter with its value.
    text = DEFENSES[name](**EXAMPLES[name]).describe()
    assert text.startswith(f"{name}(") and text.endswith(")"), text
    assert all(f"{key}={value}" in text for key, value in EXAMPLES[name].items()), text
    assert build_chain(tables).describe() == text


# ---- presets -----------------------------------------------------------------------------------------

def test_shipped_presets_load():
    files = sorted((REPO / "defenses").glob("*.toml"))
    assert len(files) >= 10
    labels = set()
    for f in files:
        label, tables = load_defense_file(f)
        labels.add(label)
    assert len(labels) == len(files)
    assert "none" in labels


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tables, message", [
    ([{"name": "nosie", "sigma": 1.0}], r"defenses\[0\]\.name: unknown defense 'nosie'; known: clip, dpsgd"),
    ([{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": -0.1}], r"defenses\[1\]\.sigma: must be >= 0"),
    ([{"name": "dpsgd", "epsilon": 8.0}], r"defenses\[0\]\.delta: required when epsilon is set"),
    ([{"name": "noise"}], r"defenses\[0\]\.sigma: required"),
    ([{"name": "noise", "sigma": "big"}], r"defenses\[0\]\.sigma: expected a number"),
    ([{"name": "sparsify", "k": True}], r"defenses\[0\]\.k: expected an integer"),
    ([{"name": "noise", "sigma": 1.0, "mean": 0}], r"defenses\[0\]\.mean: unknown option of noise"),
    ([{"name": "sparsify", "sparsity": 1.0}], r"defenses\[0\]\.sparsity: must be < 1"),
    ([{"name": "quantize", "mode": "ternary"}], r"defenses\[0\]\.mode: expected one of 'sign', 'kbit'"),
    ([{"name": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": math.inf}], r"defenses\[0\]\.max_grad_norm"),
    ([{"name": "secure_agg", "clients": 4}, {"name": "large_batch", "batch_size": 8}],
     r"defenses\[0\]: secure_agg must come after"),
    ([{"sigma": 1.0}], r"defenses\[0\]\.name: missing"),
])
def test_bad_tables(tables, message):
    with pytest.raises(ConfigError, match=message):
        build_chain(tables)


def test_k_larger_than_a_layer_names_the_field(pool):
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.k: 500 is larger than layer fc\.bias \(10 entries\)"):
        simulate(scenario(pool, 1), [{"name": "sparsify", "k": 500}])


def test_bad_preset_exits_2(tmp_path, capsys):
    from giaudit.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('label = "bad"\n[[defenses]]\nname = "noise"\nsigma = -1.0\n')
    assert main(["compare", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "defenses[0].sigma: must be >= 0" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('label = "u"\n[[defenses]]\nname = "blur"\n')
    assert main(["compare", str(unknown), "--out", str(tmp_path / "out")]) == 2
    assert "known: clip, dpsgd, label_disguise" in capsys.readouterr().err
