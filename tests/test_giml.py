"""GIML (seed 002): a generator meta-learned from other clients' gradients beats an untrained one."""
from __future__ import annotations

import pytest
import torch

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.gias import GIAS
from giaudit.attacks.giml import GIML
from giaudit.errors import ConfigError
from giaudit.priors import GeneratorConfig, untrained_prior

torch.set_num_threads(1)


def test_giml_beats_gias_with_an_untrained_generator(prior_scenario, quality) -> None:
    sc = prior_scenario(1, surrogate=False)  # GIML needs no surrogate data
    others = [sc.simulate(generator=torch.Generator().manual_seed(2000 + i))[0] for i in range(12)]
    targets = [sc.simulate(generator=torch.Generator().manual_seed(3000 + i)) for i in range(3)]
    # Measured: meta loss 0.63 -> 0.51 over 10 steps; GIML 11.3 dB / 0.10 vs untrained GIAS 6.6 dB / 0.007.
    giml = GIML(meta_steps=10, inner_z_steps=10, tasks_per_step=3)
    assert giml.meta_observations > 0
    giml.observe_many(others)
    assert len(giml.meta_losses) == 10
    # The attack's own figure of merit falls as meta-learning proceeds.
    assert sum(giml.meta_losses[-3:]) < sum(giml.meta_losses[:3])
    same = GIAS(prior=untrained_prior(GeneratorConfig(latent_dim=giml.latent_dim, width=giml.width)))
    learned = quality(giml, targets, 50)
    sc_d = prior_scenario(1)  # the untrained-GIAS control runs under class D (GIAS's requirement), same batches
    control = [sc_d.simulate(generator=torch.Generator().manual_seed(3000 + i)) for i in range(3)]
    untrained = quality(same, control, 50)
    print(f"GIML {learned[0]:.2f} dB / {learned[1]:.3f}, untrained GIAS {untrained[0]:.2f} dB / {untrained[1]:.3f}")
    assert learned[0] > untrained[0] and learned[1] > untrained[1]
    r = giml.reconstruct(targets[0][0], budget=Budget(iterations=4))
    assert r.trace.extra["meta_losses"] == giml.meta_losses
    assert r.trace.extra["meta_source"] == "12 observed updates"
    assert giml.params()["prior_data"].startswith("meta-learned from 12")


def test_without_other_observations_it_learns_from_the_target_and_says_so(prior_scenario) -> None:
    obs, _ = prior_scenario(1, surrogate=False).simulate(generator=torch.Generator().manual_seed(5))
    seen = []
    g = GIML(meta_steps=2, inner_z_steps=2, inner_theta_steps=1, snapshot_every=1)
    r = g.reconstruct(obs, budget=Budget(iterations=4))
    assert "target update only" in r.trace.extra["meta_source"] and len(r.trace.extra["meta_losses"]) == 2
    assert sorted(g.snapshots) == [1, 2]
    g2 = GIML(meta_steps=2, inner_z_steps=2, inner_theta_steps=1)
    g2.observe_many([obs], on_step=lambda step, prior: seen.append((step, prior.training["steps"])))
    assert seen == [(1, 1), (2, 2)]
    with pytest.raises(ConfigError, match="meta_lr"):
        build_attack("giml", meta_lr=2.0)
