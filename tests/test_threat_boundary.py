"""No attack can reach the ground truth (issue 2, "Proof").

The private batch is marked with a pattern no real image has; we then walk
everything an attack receives (the observation's fields, the model's state,
the update, the disclosed values) and check the marked tensors are not there,
neither as the same storage nor as equal values. A spy attack also records
every tensor it is handed during `reconstruct`.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from giaudit.attacks.base import Attack, Budget, RestartResult
from giaudit.data import ImageDataset
from giaudit.errors import ThreatModelError
from giaudit.scenario import Scenario, build_model
from giaudit.threat import threat_model
from giaudit.types import Capability, ClientProtocol, DataSpec, GroundTruth, Observation


def _marked_pool(n: int = 20) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand((n, 1, 32, 32), generator=g)
    images[:, :, 0, :4] = torch.tensor([0.123456, 0.654321, 0.111111, 0.999999])  # the mark
    return ImageDataset(images, torch.arange(n) % 10, DataSpec(1, 32, 32, 10, (0.0, 1.0), "marked"))


def _tensors(obj, seen=None):
    """Every tensor reachable from an observation (dataclass fields, modules, mappings, sequences)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict().values()
        for v in vars(obj).values():
            if not isinstance(v, (dict, nn.Module)):
                yield from _tensors(v, seen)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), seen)
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors(v, seen)


def _contains_mark(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1).float()
    return bool(torch.isclose(flat, torch.tensor(0.654321), atol=0, rtol=0).any() and
                torch.isclose(flat, torch.tensor(0.123456), atol=0, rtol=0).any())


class Spy(Attack):
    name = "spy"
    seen: list[torch.Tensor] = []

    def run_restart(self, obs, labels, budget, generator, progress):
        Spy.seen = list(_tensors(obs)) + [labels]
        x = self.initial_images(obs, obs.batch_size, generator)
        return RestartResult(x, labels, [0.0], 0.0)


@pytest.mark.parametrize("granted", [dict(), dict(true_labels=True, bn_statistics=True)])
@pytest.mark.parametrize("protocol", [ClientProtocol(), ClientProtocol("fedavg", 2, 0.1, 2)])
def test_marked_ground_truth_never_reaches_an_attack(granted, protocol):
    pool = _marked_pool()
    g = torch.Generator().manual_seed(1)
    model = build_model("convnet", channels=1, num_classes=10, size=32, width=4, generator=g)
    obs, truth = Scenario(model, pool, protocol, 4, threat_model(**granted)).simulate(generator=g)
    assert isinstance(truth, GroundTruth) and _contains_mark(truth.images)
    assert not any(isinstance(getattr(obs, f.name), GroundTruth) for f in dataclasses.fields(Observation))
    assert "images" not in {f.name for f in dataclasses.fields(Observation)}
    truth_ptrs = {truth.images.data_ptr(), truth.labels.data_ptr()}
    Spy().reconstruct(obs, budget=Budget(iterations=1), rng=g)
    for t in Spy.seen:
        assert t.data_ptr() not in truth_ptrs
        assert not _contains_mark(t)
    if granted:
        # The oracle labels are a copy, granted on purpose; images still never cross.
        assert torch.equal(obs.labels, truth.labels) and obs.labels.data_ptr() != truth.labels.data_ptr()
    else:
        assert obs.labels is None and obs.bn_statistics is None


def test_attack_refuses_capability_not_granted():
    class NeedsBN(Spy):
        name = "needs_bn"
        requires = frozenset({Capability.BN_STATISTICS})

    pool = _marked_pool()
    g = torch.Generator().manual_seed(0)
    model = build_model("lenet", channels=1, num_classes=10, size=32, generator=g)
    obs, _ = Scenario(model, pool, ClientProtocol(), 1, threat_model()).simulate(generator=g)
    with pytest.raises(ThreatModelError, match="bn_statistics"):
        NeedsBN().reconstruct(obs, budget=Budget(iterations=1), rng=g)


def test_attacker_model_is_the_global_model_before_the_client_step():
    pool = _marked_pool()
    g = torch.Generator().manual_seed(0)
    model = build_model("convnet", channels=1, num_classes=10, size=32, width=4, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obs, _ = Scenario(model, pool, ClientProtocol("fedavg", 2, 0.1), 4, threat_model()).simulate(generator=g)
    for k, v in obs.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # includes BN running statistics
