"""The models and data of the example Flower app (shared by the app and the audit's model factory)."""
from __future__ import annotations

import torch
from torch import nn

from giaudit.data import load_mnist5k
from giaudit.scenario.models import build_model

BN_SIZE = 16  # the BatchNorm variant's image size (px)


def make_model() -> nn.Module:
    """The deployed model: DLG's sigmoid LeNet for 32 px digits (the audit's `model_factory`)."""
    return build_model("lenet", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))


def make_bn_model(activation: str = "tanh") -> nn.Module:
    """The BatchNorm variant's deployed model: two 3x3 convolutions with BatchNorm for 16 px digits.

    `activation` ("tanh" is the deployed one) lets a test build a model with the same tensor shapes that
    computes another function, which the capture's fingerprint must refuse.
    """
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), act(),
                         nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), act(),
                         nn.Flatten(), nn.Linear(12 * (BN_SIZE // 2) ** 2, 10))


def client_batch(partition_id: int, batch_size: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The private data of one client: `batch_size` MNIST-5k digits at `size` px, in [0, 1], 499 apart in the
    file (which is sorted by label), so a client's digits are different digits."""
    data = load_mnist5k(size=size)
    idx = [17 + 101 * partition_id + 499 * j for j in range(batch_size)]
    return data.images[idx], data.labels[idx]
