"""GIDM's L-BFGS pixel phase and its screening of latent starts, on a tiny untrained UNet at 32 px.

The federated model is that UNet and, with `sampler = "global"`, also the sampler: fast to differentiate
twice, and no surrogate data. The ground truth is read only by the assertions, never by the attacks.
"""
from __future__ import annotations

import pytest
import torch

from giaudit.attacks import Budget, build_attack
from giaudit.attacks.gidm import GIDM
from giaudit.errors import ConfigError
from giaudit.priors.ddpm import DDPMConfig, untrained_ddpm
from giaudit.scenario.diffusion import DiffusionScenario
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def observed(unseen_pool):
    fed = untrained_ddpm(DDPMConfig(size=32, channels=1, block_out_channels=(8, 16), norm_num_groups=4), 0)
    sc = DiffusionScenario(fed.unet, fed.alphas_cumprod, unseen_pool, ClientProtocol(), 1,
                           threat_model(diffusion_noise=True))
    return sc.simulate(generator=torch.Generator().manual_seed(100))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="pixel_optimiser"):
        build_attack("gidm", pixel_optimiser="sgd")
    with pytest.raises(ConfigError, match="screen"):
        build_attack("gidm", screen=-1)
    with pytest.raises(ConfigError, match="lbfgs_history"):
        build_attack("gidm", lbfgs_history=0)


def test_lbfgs_pixel_phase_counts_evaluations_and_beats_adam(observed):
    """L-BFGS from the same start as Adam: every line-search trial is one of the phase's update evaluations
    (never more than the budget), and at 15 evaluations its best loss is well below Adam's."""
    obs, _ = observed
    runs = {}
    for opt in ("adam", "lbfgs"):
        attack = GIDM(latent_iterations=0, pixel_iterations=15, pixel_optimiser=opt, pixel_lr=0.05)
        r = attack.reconstruct(obs, budget=Budget(iterations=15), rng=torch.Generator().manual_seed(0))
        losses = r.trace.extra["phase_losses"]["pixel"]
        assert len(losses) == r.trace.iterations == 15
        runs[opt] = losses
    assert runs["lbfgs"][0] == pytest.approx(runs["adam"][0], rel=1e-5)   # the same start
    assert min(runs["lbfgs"]) < 0.5 * min(runs["adam"]), runs


def test_lbfgs_restarts_halve(observed):
    """The L-BFGS phase pauses after every update evaluation, so its restarts can be halved."""
    obs, _ = observed
    attack = GIDM(latent_iterations=0, pixel_iterations=8, pixel_optimiser="lbfgs")
    r = attack.reconstruct(obs, budget=Budget(iterations=8, restarts=2, halving=3, workers=1),
                           rng=torch.Generator().manual_seed(0))
    assert r.trace.extra["halving"]["total_iterations"] == 3 + 8 and len(r.trace.losses) == 8


def test_screening_starts_from_the_best_draw_by_the_attacks_own_loss(observed):
    """With screen = 4 the latent phase starts from the draw whose sampled image has the lowest matching loss
    (its first latent-phase loss is that draw's screening loss); the same generator gives the same draws."""
    obs, _ = observed
    attack = GIDM(latent_iterations=2, pixel_iterations=0, sampler_steps=2, screen=4)
    r = attack.reconstruct(obs, budget=Budget(iterations=2), rng=torch.Generator().manual_seed(0))
    screened = r.trace.extra["screen_losses"]
    assert len(screened) == 4 and len(set(screened)) == 4
    assert r.trace.extra["phase_losses"]["latent"][0] == pytest.approx(min(screened), rel=1e-4)
    again = attack.reconstruct(obs, budget=Budget(iterations=2), rng=torch.Generator().manual_seed(0))
    assert again.trace.extra["screen_losses"] == screened
    plain = GIDM(latent_iterations=2, pixel_iterations=0, sampler_steps=2)
    assert "screen_losses" not in plain.reconstruct(obs, budget=Budget(iterations=2)).trace.extra
