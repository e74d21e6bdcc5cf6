"""The model and data of the example Flower app (shared by the app and the audit's model factory)."""
from __future__ import annotations

import torch
from torch import nn

from giaudit.data import load_mnist5k
from giaudit.scenario.models import build_model


def make_model() -> nn.Module:
    """The deployed model: DLG's sigmoid LeNet for 32 px digits (the audit's `model_factory`)."""
    return build_model("lenet", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))


def client_batch(partition_id: int, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The private batch of one client: `batch_size` MNIST-5k digits, 32 px, in [0, 1]."""
    data = load_mnist5k(size=32)
    start = 17 + 101 * partition_id
    return data.images[start:start + batch_size], data.labels[start:start + batch_size]
