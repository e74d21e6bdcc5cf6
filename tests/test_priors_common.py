"""Shared set-up for the generative-prior attack tests: MNIST-5k client batches the shipped prior never saw."""
from __future__ import annotations

import torch

from giaudit.attacks.base import Budget
from giaudit.metrics.image import psnr, ssim
from giaudit.metrics.matching import match
from giaudit.scenario.client import Scenario
from giaudit.data import ImageDataset, load_mnist5k
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol

_POOL: ImageDataset | None = None


def unseen_pool() -> ImageDataset:
    """MNIST-5k images with index % 5 == 0: excluded from the shipped prior's training (holdout_mod 5)."""
    global _POOL
    if _POOL is None:
        d = load_mnist5k(size=32)
        idx = torch.arange(len(d))
        _POOL = d.subset(idx[idx % 5 == 0])
    return _POOL


def scenario(batch: int, *, surrogate: bool = True, seed: int = 0) -> Scenario:
    model = build_model("lenet_relu", channels=1, num_classes=10, size=32,
                        generator=torch.Generator().manual_seed(seed))
    return Scenario(model, unseen_pool(), ClientProtocol(), batch, threat_model(surrogate_data=surrogate))


def quality(attack, cases, iterations: int) -> tuple[float, float]:
    """Mean (PSNR dB, SSIM) over cases [(obs, truth)], images paired by the metrics' matching."""
    ps, ss = [], []
    for i, (obs, truth) in enumerate(cases):
        r = attack.reconstruct(obs, budget=Budget(iterations=iterations), rng=torch.Generator().manual_seed(i))
        rec = r.images[match(r.images, truth.images)]
        ps.append(float(psnr(rec, truth.images).mean()))
        ss.append(float(ssim(rec, truth.images).mean()))
    return sum(ps) / len(ps), sum(ss) / len(ss)
