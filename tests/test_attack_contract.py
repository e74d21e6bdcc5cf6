"""Every registered attack keeps the same contract (as every defense does in test_defenses.py).

Each attack in `ATTACKS.names()` builds from its defaults, has a display name and JSON-ready parameters,
refuses an observation whose threat model lacks a capability it requires (naming it), and on the smallest
scenario it accepts returns a `Reconstruction` of the batch's shape, finite and in the data range, with a
`Trace`; the same seed gives the same images, and the observation (its model's weights, buffers and mode,
and the update) is left as it was. The classifier scenario uses a ConvNet with BatchNorm in train mode, so an
attack that ran a forward pass on the observation's own model would move its running statistics.

A new attack must be added to CASES (the test fails otherwise), with options that only shrink its cost.
A malicious server's attack (`Attack.active()`) runs on the "served" scenario: the classifier client
computing on the model the attack's own server step sent; it may return more images than the batch (a set
recovered from an aggregate), and an analytic one (`Attack.analytic`) iterates nothing.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from giaudit import engine
from giaudit.attacks import ATTACKS, Attack, Budget, build_attack
from giaudit.attacks.restarts import workers_for
from giaudit.errors import ThreatModelError
from giaudit.scenario import Scenario, build_model
from giaudit.threat import threat_model
from giaudit.types import Capability, ClientProtocol, Observation, Reconstruction, Trace

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool(mnist32):
    return mnist32.subset(torch.arange(200))


@pytest.fixture(scope="module")
def digits16():
    from giaudit.data import load_digits

    return load_digits(size=16)


def classifier(pool, batch: int = 2, **threat: bool) -> Observation:
    """FedSGD on a BatchNorm ConvNet (train mode), batch of 2 MNIST digits at 32 px."""
    m = build_model("convnet", channels=1, num_classes=10, size=32, width=4, generator=torch.Generator().manual_seed(0))
    sc = Scenario(m, pool, ClientProtocol(), batch, threat_model(**threat))
    return sc.simulate(generator=torch.Generator().manual_seed(1))[0]


def served(pool, name: str, options: dict[str, Any], batch: int = 2, **threat: bool) -> Observation:
    """The classifier client computing on the model the active attack `name` sends (its server step granted
    everything it needs; the observation carries `threat`)."""
    m = build_model("convnet", channels=1, num_classes=10, size=32, width=4, generator=torch.Generator().manual_seed(0))
    server = threat_model(modifies_model=True)
    sent = build_attack(name, **options).serve(m, pool.spec, server, pool.images[100:], torch.Generator())
    sc = Scenario(m, pool.subset(torch.arange(100)), ClientProtocol(), batch, threat_model(**threat), served=sent)
    return sc.simulate(generator=torch.Generator().manual_seed(1))[0]


def diffusion(digits, **threat: bool) -> Observation:
    """FedSGD on a tiny untrained DDPM UNet at 16 px, one digit."""
    from giaudit.priors.ddpm import DDPMConfig, untrained_ddpm
    from giaudit.scenario.diffusion import DiffusionScenario

    fed = untrained_ddpm(DDPMConfig(size=16, channels=1, block_out_channels=(8, 16), norm_num_groups=4), 0)
    sc = DiffusionScenario(fed.unet, fed.alphas_cumprod, digits, ClientProtocol(), 1, threat_model(**threat))
    return sc.simulate(generator=torch.Generator().manual_seed(5))[0]


@dataclass(frozen=True)
class Case:
    scenario: str                                        # "classifier", "diffusion" or "served"
    threat: dict[str, bool] = field(default_factory=dict)  # what the scenario grants beyond the defaults
    options: dict[str, Any] = field(default_factory=dict)  # only options that make the run cheaper
    iterations: int = 3


CASES = {
    "ig": Case("classifier"),
    "dlg": Case("classifier", options={"max_eval": 2}, iterations=2),
    "gias": Case("classifier", {"surrogate_data": True}, iterations=4),  # both phases
    "gias_z": Case("classifier", {"surrogate_data": True}),
    "giml": Case("classifier", options={"meta_steps": 1, "inner_z_steps": 1, "inner_theta_steps": 1}, iterations=4),
    "ggl": Case("classifier", {"surrogate_data": True}, {"population": 4}, iterations=2),
    "diffula": Case("classifier", {"surrogate_data": True}, {"denoise_steps": 2}, iterations=2),
    "gidm": Case("diffusion", {"diffusion_noise": True}, {"sampler_steps": 1}),
    "gidm_plus": Case("diffusion", options={"sampler_steps": 1, "t_grid": 2}),
    "imprint": Case("served", {"modifies_model": True}, {"bins": 16}),
    "trap_weights": Case("served", {"modifies_model": True}, {"neurons": 50}),
    "fishing": Case("served", {"modifies_model": True}),
    "differencing": Case("classifier", {"selects_clients": True}),  # no aggregation: the second round is empty
}


@pytest.fixture(scope="module")
def observe(pool, digits16) -> Callable[[str, dict[str, bool]], Observation]:
    def make(scenario: str, threat: dict[str, bool], name: str = "") -> Observation:
        if scenario == "served":
            return served(pool, name, CASES[name].options, **threat)
        return classifier(pool, **threat) if scenario == "classifier" else diffusion(digits16, **threat)

    return make


def test_every_registered_attack_has_a_case():
    assert sorted(CASES) == ATTACKS.names()


def test_display_names_are_set_and_distinct():
    names = {n: ATTACKS[n].display_name for n in ATTACKS.names()}
    assert all(isinstance(d, str) and d.strip() for d in names.values()), names
    assert len(set(names.values())) == len(names), names  # a subclass never shows its parent's name
    assert names["ig"] == "Inverting Gradients" and names["gidm_plus"] == "GIDM+"


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_from_defaults_with_json_parameters(name):
    attack = build_attack(name)
    assert isinstance(attack, ATTACKS[name]) and attack.name == name
    params = attack.params()
    assert json.loads(json.dumps(params)) == params
    assert set(ATTACKS.options(name)) <= set(params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refuses_a_threat_model_without_what_it_requires(name, observe):
    case = CASES[name]
    attack = build_attack(name, **case.options)
    assert attack.requires, name
    for cap in sorted(attack.requires, key=lambda c: c.value):
        obs = observe(case.scenario, {**case.threat, cap.value: False}, name)
        assert cap not in obs.threat.granted
        with pytest.raises(ThreatModelError, match=cap.value):
            attack.reconstruct(obs, budget=Budget(iterations=case.iterations))


def _state(obs: Observation) -> tuple[dict[str, torch.Tensor], list[bool], list[torch.Tensor]]:
    return ({k: v.detach().clone() for k, v in obs.model.state_dict().items()},
            [m.training for m in obs.model.modules()], [t.clone() for t in obs.update.tensors])


@pytest.mark.parametrize("name", sorted(CASES))
def test_reconstruction_contract(name, observe):
    case = CASES[name]
    obs = observe(case.scenario, case.threat, name)
    attack = build_attack(name, **case.options)
    weights, modes, update = _state(obs)
    budget = Budget(iterations=case.iterations)
    a = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(3))
    b = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(3))

    assert isinstance(a, Reconstruction) and isinstance(a.trace, Trace)
    n = obs.batch_size
    assert n is not None
    if attack.active():  # a set recovered from the aggregate: at least the batch
        assert a.images.shape[0] >= n and a.images.shape[1:] == obs.data_spec.shape
        assert a.labels.shape == (a.images.shape[0],)
    else:
        assert a.images.shape == (n, *obs.data_spec.shape) and a.labels.shape == (n,)
    lo, hi = obs.data_spec.value_range
    assert torch.isfinite(a.images).all() and a.images.min() >= lo and a.images.max() <= hi
    assert isinstance(a.label_source, str) and a.label_source
    t = a.trace
    assert (t.iterations == 0 if attack.analytic else 1 <= t.iterations <= case.iterations)
    assert len(t.losses) == t.iterations
    assert len(t.restart_losses) == budget.restarts and t.best_restart == 0
    assert all(math.isfinite(v) for v in t.losses) and t.wall_s >= 0
    json.dumps(dict(t.extra), default=str)  # the record stores it

    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.trace.losses == b.trace.losses

    after_weights, after_modes, after_update = _state(obs)
    assert after_weights.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(after_weights[k], v), f"{name} changed the observation's model: {k}"
    assert after_modes == modes
    assert all(torch.equal(x, y) for x, y in zip(after_update, update))


def test_reconstruct_is_final():
    assert getattr(Attack.reconstruct, "__final__", False)
    with pytest.raises(TypeError, match="final"):
        class Overrides(Attack):
            def reconstruct(self, obs, **kw):
                return None


def test_restarts_run_serially_inside_an_engine_worker(pool, monkeypatch):
    """An engine worker already runs one cell per core: its restarts do not fork a process per core each,
    unless the budget names a worker count; outside a worker they use the cores."""
    cores = engine.cores()
    assert workers_for(3, None, CPU) == min(3, cores)
    assert workers_for(1, None, CPU) == 1 and workers_for(3, 8, CPU) == min(3, cores)
    monkeypatch.setattr(engine, "_IN_WORKER", True)
    assert engine.in_worker()
    assert workers_for(3, None, CPU) == 1
    assert workers_for(3, 2, CPU) == min(2, cores)
    obs = classifier(pool, batch=1)
    rec = build_attack("ig").reconstruct(obs, budget=Budget(iterations=2, restarts=2),
                                         rng=torch.Generator().manual_seed(0))
    assert rec.trace.extra["workers"] == 1 and len(rec.trace.restart_losses) == 2


def test_restarts_on_an_accelerator_run_in_the_calling_process():
    assert workers_for(4, None, torch.device("meta")) == 1
    assert workers_for(4, 4, torch.device("meta")) == 1


def test_giml_learns_again_for_each_target_without_other_observations(pool):
    """A prior meta-learned from one target never serves another target as if it were that target's."""
    first = classifier(pool)
    other = Scenario(first.model, pool, ClientProtocol(), 2, first.threat).simulate(
        generator=torch.Generator().manual_seed(9))[0]
    budget, opts = Budget(iterations=2), CASES["giml"].options

    def run(attack, obs):
        return attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(0))

    attack = build_attack("giml", **opts)
    run(attack, first)
    second = run(attack, other)
    alone = run(build_attack("giml", **opts), other)
    assert "target update only" in second.trace.extra["meta_source"]
    assert torch.equal(second.images, alone.images) and second.trace.extra["meta_losses"] == \
        alone.trace.extra["meta_losses"]
    # What reusing the first target's prior would have given instead:
    borrowed = build_attack("giml", **opts)
    borrowed.observe_many([first])
    reused = run(borrowed, other)
    assert reused.trace.extra["meta_source"] == "1 observed updates"
    assert not torch.equal(reused.images, alone.images)


def test_label_errors_name_the_attacks_key(pool):
    obs = classifier(pool)
    with pytest.raises(ThreatModelError, match=r"attacks\.ig\.labels = 'oracle'"):
        build_attack("ig", labels="oracle").reconstruct(obs, budget=Budget(iterations=1))
    with pytest.raises(ThreatModelError, match=r"attacks\.ig\.bn_weight"):
        build_attack("ig", bn_weight=0.1).reconstruct(obs, budget=Budget(iterations=1))
    assert Capability.BN_STATISTICS not in obs.threat.granted
