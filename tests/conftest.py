"""Shared fixtures and factories. Tests never touch the network; face data in ../shared/data is optional."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from giaudit.attacks.base import Attack, Budget
from giaudit.data import ImageDataset, load_mnist5k
from giaudit.metrics.image import psnr, ssim
from giaudit.metrics.matching import match
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, GroundTruth, Observation

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One xdist worker per core: each worker's torch keeps to one thread, so two workers never run four.
    torch.set_num_threads(1)

Case = tuple[Observation, GroundTruth]


@pytest.fixture(scope="session")
def mnist32() -> ImageDataset:
    return load_mnist5k(size=32)


@pytest.fixture(scope="session")
def unseen_pool(mnist32: ImageDataset) -> ImageDataset:
    """MNIST-5k images with index % 5 == 0: excluded from the shipped priors' training (holdout_mod 5)."""
    return mnist32.subset(torch.arange(0, len(mnist32), 5))


def client_scenario(pool: ImageDataset, batch: int = 1, *, model: str = "lenet_relu", seed: int = 0,
                    protocol: ClientProtocol | None = None, num_classes: int = 10,
                    generator: torch.Generator | None = None, model_kw: dict[str, Any] | None = None,
                    **granted: bool) -> Scenario:
    """A 32 px, one-channel classifier `model` initialised from `generator` (else seeded `seed`) and one
    client's `protocol` (FedSGD by default) on `pool`, with the threat model granting `granted` (e.g.
    surrogate_data=True)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    m = build_model(model, channels=1, num_classes=num_classes, size=32, generator=g, **(model_kw or {}))
    return Scenario(m, pool, protocol or ClientProtocol(), batch, threat_model(**granted))


@pytest.fixture(scope="session")
def observe(mnist32: ImageDataset) -> Callable[..., Case]:
    """observe(batch, seed=, model=, pool=, defense=, protocol=, model_kw=, **granted) -> (obs, truth).

    The pattern most tests repeat: ONE generator seeded `seed` initialises the model and then draws the
    client's batch (and the defense's noise); `pool` defaults to the whole MNIST-5k at 32 px."""
    def make(batch: int = 1, *, seed: int = 0, pool: ImageDataset | None = None, defense: Any = None,
             **kw: Any) -> Case:
        g = torch.Generator().manual_seed(seed)
        scen = client_scenario(pool if pool is not None else mnist32, batch, generator=g, **kw)
        return scen.simulate(defense, generator=g)
    return make


@pytest.fixture(scope="session")
def prior_scenario(unseen_pool: ImageDataset) -> Callable[..., Scenario]:
    """prior_scenario(batch, surrogate=True, seed=0): LeNet-ReLU clients on digits the shipped priors never saw."""
    def make(batch: int, *, surrogate: bool = True, seed: int = 0) -> Scenario:
        return client_scenario(unseen_pool, batch, seed=seed, surrogate_data=surrogate)
    return make


def reconstruction_quality(attack: Attack, cases: Sequence[Case], iterations: int) -> tuple[float, float]:
    """Mean (PSNR dB, SSIM) over cases [(obs, truth)], images paired by the metrics' matching; the attack of
    case i starts from a generator seeded i."""
    ps, ss = [], []
    for i, (obs, truth) in enumerate(cases):
        r = attack.reconstruct(obs, budget=Budget(iterations=iterations), rng=torch.Generator().manual_seed(i))
        rec = r.images[match(r.images, truth.images)]
        ps.append(float(psnr(rec, truth.images).mean()))
        ss.append(float(ssim(rec, truth.images).mean()))
    return sum(ps) / len(ps), sum(ss) / len(ss)


@pytest.fixture(scope="session")
def quality() -> Callable[[Attack, Sequence[Case], int], tuple[float, float]]:
    return reconstruction_quality


@pytest.fixture(autouse=True)
def _private_utility_cache(monkeypatch, tmp_path_factory):
    """Utility results a test computes never land in the user's ~/.cache."""
    monkeypatch.setenv("GIAUDIT_CACHE", str(tmp_path_factory.getbasetemp() / "giaudit-cache"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network socket fails the test."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):  # type: ignore[no-untyped-def]
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (face data lives in ../shared/data beside the repo, for development and CI)")
    return path


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: on a shared 2-core machine two threads made a tiny UNet update 50x
    slower (7 s vs 0.1 s); the thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
