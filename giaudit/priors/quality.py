"""Measured (not eyeballed) sample quality of an image prior on digits.

`digit_classifier` trains a small CNN on held-out digits (the audit pool, which the priors never see);
`confident_share` is the share of samples it labels with confidence >= 0.9: a sample that looks like a
digit gets a confident label, a smudge does not. DiffULA's test uses the same classifier to read the digit
of a representative image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitNet(nn.Module):
    def __init__(self, channels: int = 1, size: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def digit_classifier(images: Tensor, labels: Tensor, *, steps: int = 600, batch_size: int = 64, seed: int = 0,
                     augment: bool = True) -> nn.Module:
    """A CNN trained with Adam on `images` (N,C,H,W in [0,1]) with small random shifts; returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet(images.shape[1], images.shape[-1], int(labels.max()) + 1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
            x = images[idx]
            if augment:
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
                x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def confident_share(classifier: nn.Module, images: Tensor, threshold: float = 0.9) -> tuple[float, Tensor]:
    """(share of images whose top softmax probability is >= threshold, predicted labels)."""
    probs = torch.softmax(classifier(images), dim=1)
    conf, pred = probs.max(1)
    return float((conf >= threshold).float().mean()), pred
