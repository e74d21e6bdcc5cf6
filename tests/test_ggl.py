"""GGL (seed 004): latent-only search with CMA-ES / BO / Adam, adaptive to disclosed defenses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.ggl import GGL, functional_update_fn, kl_to_standard_normal
from giaudit.attacks.ig import InvertingGradients
from giaudit.defenses import build_chain
from giaudit.defenses.clip import ClipReplay
from giaudit.defenses.sparsify import SparsifyReplay
from giaudit.errors import ConfigError
from giaudit.replay import Replay
from giaudit.types import ClientProtocol, Disclosure

torch.set_num_threads(1)


def test_population_batched_equals_looped_fedsgd_and_fedavg(prior_scenario) -> None:
    obs, truth = prior_scenario(2).simulate(generator=torch.Generator().manual_seed(3))
    a = GGL(prior="mnist32")
    z = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(0))
    fast = a.evaluate_population(obs, truth.labels, z)
    slow = a.evaluate_population(obs, truth.labels, z, batched=False)
    assert fast.shape == (6,) and torch.allclose(fast, slow, rtol=1e-4, atol=1e-6)
    avg = dataclasses.replace(obs, protocol=ClientProtocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=1))
    from giaudit.fl import compute_update
    fn = functional_update_fn(obs.model, avg.protocol)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    for got, want in zip(fn(x, truth.labels), compute_update(obs.model, x, truth.labels, avg.protocol)):
        assert torch.allclose(got, want, atol=1e-6)


def test_replay_of_the_disclosed_defenses() -> None:
    g = [torch.tensor([0.0, 2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])]
    t = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([5.0, 0.5, 1.0, 2.0])]
    def sparsify(mode: str, sparsity: float | None, k: int | None = None) -> tuple[Disclosure, ...]:
        return (Disclosure(0, "sparsify", {}, SparsifyReplay(mode, sparsity, k)),)

    masked = Replay.build(sparsify("topk", 0.5), g)(t)  # mask visible: use the zeros of g*
    assert torch.equal(masked[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    noisy = [x + 0.01 for x in g]  # noise hid the mask: replay top-k at the disclosed level
    topk = Replay.build(sparsify("topk", 0.75), noisy)(t)
    assert torch.equal(topk[1], torch.tensor([5.0, 0.0, 0.0, 0.0]))
    glob = Replay.build(sparsify("topk_global", None, 2), noisy)(t)
    assert torch.equal(glob[1], torch.tensor([5.0, 0.0, 0.0, 2.0])) and not glob[0].any()
    clipped = Replay.build((Disclosure(0, "clip", {"clip_norm": 1.0}, ClipReplay(1.0)),), noisy)(t)
    norm = torch.sqrt(sum((x * x).sum() for x in clipped))
    assert abs(float(norm) - 1.0) < 1e-5
    assert not Replay.build((Disclosure(0, "noise", {"noise_sigma": 0.1}),), g)  # nothing deterministic to replay
    assert float(kl_to_standard_normal(torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)))) < 1e-2


def test_adaptive_option_reaches_the_base_and_the_population(prior_scenario) -> None:
    obs, truth = prior_scenario(1).simulate(generator=torch.Generator().manual_seed(3))
    obs = dataclasses.replace(obs, disclosed=(Disclosure(0, "clip", {"clip_norm": 1e-3}, ClipReplay(1e-3)),))
    assert GGL(prior="mnist32").adaptive and not GGL(prior="mnist32", adaptive=False).adaptive
    z = torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(0))
    values = {}
    for adaptive in (True, False):
        a = GGL(prior="mnist32", adaptive=adaptive)
        fast = a.evaluate_population(obs, truth.labels, z)
        slow = a.evaluate_population(obs, truth.labels, z, batched=False)  # through Attack.trial_update
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-6)
        values[adaptive] = fast
    assert not torch.allclose(values[True], values[False])  # the clip replay changes the objective


def test_options_and_all_optimisers_run(prior_scenario) -> None:
    with pytest.raises(ConfigError, match="attacks.ggl.optimizer"):
        build_attack("ggl", optimizer="sgd")
    obs, _ = prior_scenario(1).simulate(generator=torch.Generator().manual_seed(4))
    for opts, iters in (({"optimizer": "cma", "population": 8}, 3), ({"optimizer": "adam"}, 4),
                        ({"optimizer": "bo", "bo_sampler": "tpe", "bo_initial": 6}, 9),
                        ({"optimizer": "bo", "bo_sampler": "gp", "bo_initial": 6}, 8)):
        a = GGL(prior="mnist32", **opts)
        r = a.reconstruct(obs, budget=Budget(iterations=iters))
        assert r.images.shape == (1, 1, 32, 32) and r.trace.iterations == iters
        if opts["optimizer"] != "adam":  # best-so-far curves never go up
            assert all(b <= a_ + 1e-12 for a_, b in zip(r.trace.losses, r.trace.losses[1:]))
        assert r.trace.extra["prior_data"] == "mnist5k"
        assert a.params()["optimizer"] == opts["optimizer"]


@pytest.mark.parametrize("defense", [{"name": "noise", "sigma": 0.01}, {"name": "sparsify", "sparsity": 0.99}])
def test_ggl_beats_ig_under_defenses(prior_scenario, quality, defense: dict) -> None:
    chain = build_chain([defense])
    sc = prior_scenario(1)
    cs = [sc.simulate(chain, generator=torch.Generator().manual_seed(1000 + i)) for i in range(3)]
    # 20 generations x 50 candidates (measured, IG vs GGL: noise 11.7 / 0.45 vs 13.2 / 0.37, sparsify 10.0 / 0.20
    # vs 12.8 / 0.28; 50 generations added 0.3 dB)
    ig = quality(InvertingGradients(), cs, 200)
    ggl = quality(GGL(prior="mnist32", optimizer="cma"), cs, 20)
    print(f"{defense['name']}: IG {ig[0]:.2f} dB / {ig[1]:.3f}, GGL {ggl[0]:.2f} dB / {ggl[1]:.3f}")
    assert ggl[0] > ig[0] or ggl[1] > ig[1]
