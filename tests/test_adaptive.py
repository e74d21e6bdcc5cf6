"""Defense-aware matching (GGL's adaptive attack, seed 004): the shared replay, in and out of vmap.

Oracle: replayed on the client's true update, the disclosed defenses' deterministic
part reproduces what the server observed (or, when noise came after, the update
before the noise).
"""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from torch import nn
from torch.func import vmap

from giaudit import replay as replay_module
from giaudit.attacks.dlg import DLG
from giaudit.attacks.ggl import GGL, functional_update_fn
from giaudit.attacks.gias import GIAS
from giaudit.attacks.giml import GIML
from giaudit.attacks.ig import InvertingGradients
from giaudit.defenses import build_chain
from giaudit.fl import compute_update
from giaudit.replay import Replay, adapt_trial, replay_for
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, SharedUpdate

torch.set_num_threads(1)
FEDAVG = ClientProtocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=1)

CASES = {
    "clip": ([{"name": "clip", "max_norm": 0.05}], "0:clip:clip"),
    "topk": ([{"name": "sparsify", "sparsity": 0.9}], "0:sparsify:observed_mask"),
    "topk_hidden": ([{"name": "sparsify", "sparsity": 0.9}, {"name": "noise", "sigma": 1e-3}],
                    "0:sparsify:topk_0.9"),
    "global_k_hidden": ([{"name": "sparsify", "mode": "topk_global", "k": 300}, {"name": "noise", "sigma": 1e-3}],
                        "0:sparsify:topk_global_k300"),
    "clip_then_topk": ([{"name": "clip", "max_norm": 0.05}, {"name": "sparsify", "sparsity": 0.8}],
                       "0:clip:clip,1:sparsify:observed_mask"),
    "topk_then_clip_hidden": ([{"name": "sparsify", "sparsity": 0.8}, {"name": "clip", "max_norm": 0.05},
                               {"name": "noise", "sigma": 1e-3}], "0:sparsify:topk_0.8,1:clip:clip"),
    # Two defenses of one kind: each discloses under its own place, both are replayed, in order.
    "clip_noise_clip": ([{"name": "clip", "max_norm": 0.05}, {"name": "noise", "sigma": 1e-3},
                         {"name": "clip", "max_norm": 0.02}], "0:clip:clip,2:clip:clip"),
}


@pytest.fixture(scope="module")
def pool(mnist32):
    return mnist32.subset(torch.arange(200))


def lenet() -> nn.Module:
    return build_model("lenet_relu", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))


def observe(pool, tables, batch: int = 2, protocol: ClientProtocol = ClientProtocol()):
    scen = Scenario(lenet(), pool, protocol, batch, threat_model())
    return scen.simulate(build_chain(tables), generator=torch.Generator().manual_seed(1))


def expected(obs, truth, tables):
    """What the server saw, before any noise: the deterministic part of the chain on the true update."""
    clean = build_chain([t for t in tables if t["name"] != "noise"])
    true = compute_update(obs.model, truth.images, truth.labels, obs.protocol or ClientProtocol())
    return clean.transform(SharedUpdate(tuple(t.detach() for t in true), obs.update.kind),
                           torch.Generator().manual_seed(0)).tensors


def max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_replay_at_the_true_batch_reproduces_the_update_in_and_out_of_vmap(pool, case):
    tables, steps = CASES[case]
    obs, truth = observe(pool, tables)
    replay = Replay.build(obs.disclosed, obs.update.tensors, obs.batch_size, obs.update.kind)
    assert ",".join(replay.names) == steps
    want = expected(obs, truth, tables)
    if not any(t["name"] == "noise" for t in tables):
        assert max_diff(want, obs.update.tensors) < 1e-7  # the oracle is the observation itself
    true = compute_update(obs.model, truth.images, truth.labels)
    assert max_diff(replay(true), want) < 1e-6
    assert max_diff(adapt_trial(true, obs.disclosed, obs.update.tensors, obs.batch_size), want) < 1e-6

    # Inside vmap, as GGL evaluates a population: candidate 0 is the true batch, 1 and 2 are not.
    other = torch.rand((2, *truth.images.shape), generator=torch.Generator().manual_seed(5))
    x = torch.cat([truth.images[None], other])
    trials = vmap(functional_update_fn(obs.model, ClientProtocol()), in_dims=(0, None))(x, truth.labels)
    batched = vmap(lambda *t: replay(t))(*trials)
    assert max_diff([b[0] for b in batched], want) < 1e-6
    for i in (1, 2):
        one = replay(compute_update(obs.model, x[i], truth.labels))
        assert max_diff([b[i] for b in batched], one) < 1e-6


def test_replay_on_a_fedavg_delta_and_dpsgd_at_batch_one(pool):
    tables = [{"name": "clip", "max_norm": 0.01}, {"name": "sparsify", "sparsity": 0.5}]
    obs, truth = observe(pool, tables, protocol=FEDAVG)
    assert obs.update.kind == "delta"
    true = compute_update(obs.model, truth.images, truth.labels, FEDAVG)
    assert max_diff(replay_for(obs)(true), obs.update.tensors) < 1e-7
    dp = [{"name": "dpsgd", "max_grad_norm": 0.05, "noise_multiplier": 0.0}]
    obs, truth = observe(pool, dp, batch=1)
    replay = replay_for(obs)
    assert replay.names == ("0:dpsgd:dpsgd_clip",)
    true = compute_update(obs.model, truth.images, truth.labels)
    assert max_diff(replay(true), obs.update.tensors) < 1e-6  # Opacus sums per-sample grads: float rounding
    obs2, _ = observe(pool, dp, batch=2)  # per-sample clipping of 2 samples is not a whole-update clip
    assert not replay_for(obs2)


def test_replay_is_differentiable_and_cached_per_observation(pool):
    obs, truth = observe(pool, CASES["clip_then_topk"][0])
    assert replay_for(obs) is replay_for(obs)
    other = dataclasses.replace(obs, disclosed=())
    assert replay_for(other) is not replay_for(obs) and not replay_for(other)
    # Away from the truth (where the loss is at its minimum, with a zero gradient).
    x = torch.rand(truth.images.shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    trial = compute_update(obs.model, x, truth.labels, create_graph=True)
    loss = sum(((a - o) ** 2).sum() for a, o in zip(replay_for(obs)(trial), obs.update.tensors))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    n = len(replay_module._CACHE)
    del other
    gc.collect()
    assert len(replay_module._CACHE) == n - 1  # entries go with their observation
    with pytest.raises(ValueError, match="tensors"):
        replay_for(obs)(trial[:-1])


def test_every_gradient_matching_attack_takes_adaptive(pool):
    obs, truth = observe(pool, CASES["clip"][0])
    for cls, default in ((DLG, False), (InvertingGradients, False), (GIAS, False), (GIML, False), (GGL, True)):
        assert cls().adaptive is default and cls(adaptive=not default).adaptive is (not default)
        assert cls(adaptive=True).params()["adaptive"] is True
    x = truth.images
    plain = GIAS(adaptive=False).trial_update(obs, obs.model, x, truth.labels, create_graph=False)
    adapted = GIAS(adaptive=True).trial_update(obs, obs.model, x, truth.labels, create_graph=False)
    assert max_diff(adapted, obs.update.tensors) < 1e-7 < max_diff(plain, obs.update.tensors)
    # GIML's objective (cosine: blind to the clip's scale, not to the mask) goes through the replay too.
    obs, truth = observe(pool, CASES["topk"][0])
    match = {a: float(GIML(adaptive=a, tv_weight=0.0).objective(obs, truth.labels, truth.images)[0].detach())
             for a in (False, True)}
    assert match[True] < 1e-5 < match[False]


def test_a_chain_with_two_clips_discloses_both(pool):
    """clip 0.5 -> noise -> clip 2.0: both bounds are disclosed, each under its own place."""
    tables = [{"name": "clip", "max_norm": 0.5}, {"name": "noise", "sigma": 1e-3}, {"name": "clip", "max_norm": 2.0}]
    obs, _ = observe(pool, tables)
    assert [(d.key, d.params.get("clip_norm")) for d in obs.disclosed] == [
        ("0:clip", 0.5), ("1:noise", None), ("2:clip", 2.0)]
    # A large second bound changes nothing after a small first one; the reverse order would.
    x = [torch.full((3,), 10.0)]
    assert float(Replay.build(obs.disclosed, x)(x)[0].norm()) == pytest.approx(0.5, rel=1e-5)
