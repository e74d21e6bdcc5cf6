"""Successive halving of restarts: the cut follows the attack's own loss, and processes do not matter.

No ground truth is involved: a restart's rank is the lowest matching loss it
has reached, which the attack computes from the observation alone.
"""
from __future__ import annotations

import math

import pytest
import torch

from giaudit.attacks import Budget, build_attack
from giaudit.errors import ThreatModelError
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol


@pytest.fixture(scope="module")
def obs(observe):
    return observe(2, seed=5)[0]


def _halved(obs, workers):
    attack = build_attack("ig")
    budget = Budget(iterations=80, restarts=5, halving=8, workers=workers)
    return attack, budget, attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(11))


def test_cut_keeps_the_lowest_loss_and_matches_independent_restarts(obs):
    attack, budget, rec = _halved(obs, workers=1)
    log = rec.trace.extra["halving"]
    assert [c["at"] for c in log["cuts"]] == [8, 16]          # 5 -> 2 -> 1
    # Replay every restart alone with the same seed: its best loss after `at` iterations is what the cut saw.
    gen = torch.Generator().manual_seed(11)
    labels, _ = attack.labels_for(obs, gen)
    seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=gen)]
    alone = [attack.run_restart(obs, labels, Budget(iterations=80), torch.Generator().manual_seed(s), None)
             for s in seeds]
    for cut in log["cuts"]:
        seen = {int(i): v for i, v in cut["losses"].items()}
        for i, v in seen.items():
            assert v == pytest.approx(min(alone[i].losses[:cut["at"]]), rel=1e-5, abs=1e-7)
        lowest = min(seen, key=lambda i: seen[i])
        assert lowest in cut["kept"], "the restart with the lowest matching loss was discarded"
        assert len(cut["kept"]) == max(1, len(seen) // 2)
    winner = rec.trace.best_restart
    assert winner == log["cuts"][-1]["kept"][0]
    assert rec.trace.losses == pytest.approx(alone[winner].losses, rel=1e-5, abs=1e-7)
    # Halving did less work than five full restarts, and the winner ran its whole schedule.
    assert log["total_iterations"] < 5 * 80 and log["restart_iterations"][winner] == len(alone[winner].losses)
    assert rec.trace.restart_losses[winner] == min(rec.trace.restart_losses)


def test_parallel_equals_serial(obs):
    _, _, serial = _halved(obs, workers=1)
    _, _, parallel = _halved(obs, workers=2)
    assert parallel.trace.extra["workers"] == 2
    assert serial.trace.best_restart == parallel.trace.best_restart
    assert [c["kept"] for c in serial.trace.extra["halving"]["cuts"]] == \
        [c["kept"] for c in parallel.trace.extra["halving"]["cuts"]]
    assert torch.allclose(serial.images, parallel.images, atol=1e-4)
    assert math.isclose(serial.trace.restart_losses[serial.trace.best_restart],
                        parallel.trace.restart_losses[parallel.trace.best_restart], rel_tol=1e-4)


def test_attack_without_pausable_restarts_says_so(obs):
    attack = build_attack("dlg")
    assert not attack.pausable()
    with pytest.raises(ThreatModelError, match="halving"):
        attack.reconstruct(obs, budget=Budget(iterations=3, restarts=2, halving=1, workers=1))


def test_gias_restarts_halve_through_both_phases(observe):
    """The prior attacks share the descent loop, so they halve too: the winner equals its restart run alone."""
    obs = observe(1, seed=5, surrogate_data=True)[0]
    attack = build_attack("gias", prior="mnist32")
    assert attack.pausable()
    budget = Budget(iterations=24, restarts=3, halving=4, workers=1)
    rec = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(2))
    log = rec.trace.extra["halving"]
    assert [c["at"] for c in log["cuts"]] == [4]
    gen = torch.Generator().manual_seed(2)
    labels, _ = attack.labels_for(obs, gen)
    seeds = [int(s) for s in torch.randint(0, 2**62, (3,), generator=gen)]
    alone = attack.run_restart(obs, labels, Budget(iterations=24), torch.Generator().manual_seed(
        seeds[rec.trace.best_restart]), None)
    assert rec.trace.extra["theta_iterations"] > 0          # the winner went through the parameter phase
    assert rec.trace.losses == pytest.approx(alone.losses, rel=1e-5, abs=1e-7)
    assert torch.allclose(rec.images, alone.images.clamp(0, 1), atol=1e-5)


def test_gidm_plus_restarts_halve_through_both_phases():
    """GIDM and GIDM+ run on the same pausable two-phase loop: a halved GIDM+ run's winner (image, t, eps and
    timestep distribution carried across the pause) equals its restart run alone."""
    from giaudit.data import load_digits
    from giaudit.priors.ddpm import DDPMConfig, untrained_ddpm
    from giaudit.scenario.diffusion import DiffusionScenario

    fed = untrained_ddpm(DDPMConfig(size=16, channels=1, block_out_channels=(8, 16), norm_num_groups=4), 0)
    sc = DiffusionScenario(fed.unet, fed.alphas_cumprod, load_digits(size=16), ClientProtocol(), 1,
                           threat_model(diffusion_noise=False))
    obs = sc.simulate(generator=torch.Generator().manual_seed(5))[0]
    attack = build_attack("gidm_plus", latent_iterations=4, pixel_iterations=8, sampler_steps=2)
    assert attack.pausable() and build_attack("gidm").pausable()
    rec = attack.reconstruct(obs, budget=Budget(iterations=12, restarts=4, halving=3, workers=1),
                             rng=torch.Generator().manual_seed(2))
    assert [c["at"] for c in rec.trace.extra["halving"]["cuts"]] == [3, 6]   # one cut inside each phase
    gen = torch.Generator().manual_seed(2)
    labels, _ = attack.labels_for(obs, gen)
    seeds = [int(s) for s in torch.randint(0, 2**62, (4,), generator=gen)]
    alone = attack.run_restart(obs, labels, Budget(iterations=12), torch.Generator().manual_seed(
        seeds[rec.trace.best_restart]), None)
    assert rec.trace.losses == pytest.approx(alone.losses, rel=1e-5, abs=1e-7)
    assert rec.trace.extra["t_probs"][0] == pytest.approx(alone.extra["t_probs"][0], rel=1e-5)
    assert torch.allclose(rec.images, alone.images, atol=1e-5)


def test_an_error_inside_a_restart_process_reaches_the_caller(obs):
    """A restart that fails in its worker process raises the attack's own error, not a broken pipe."""
    attack = build_attack("ig", bn_weight=0.1)  # the observation carries no BN statistics
    with pytest.raises(ThreatModelError, match="bn_statistics"):
        attack.reconstruct(obs, budget=Budget(iterations=10, restarts=2, halving=2, workers=2))
