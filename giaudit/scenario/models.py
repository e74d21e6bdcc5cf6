"""Federated models the audited client trains.

- LeNet as in DLG (Zhu et al. 2019): three stride-2/1 5x5 convolutions with
  sigmoid activations and one linear layer. Sigmoid is twice differentiable
  everywhere, which is what makes DLG's L-BFGS matching work; a ReLU variant
  is provided for Inverting Gradients.
- ConvNet as in Geiping et al. 2020 (breaching's `ConvNet`, width 64): eight
  conv-BN-ReLU blocks with two max-pools and a linear head.
- ResNet-18, CIFAR variant (3x3 stem, no max-pool).

All take images in [0, 1] directly. A deployment's input normalisation
(``data.mean`` / ``data.std``) is added to any model, built-in or the user's,
by `normalise_inputs`: (x - mean) / std becomes the first operation of its
forward, so attacks, priors and metrics keep working on images in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from giaudit.errors import ConfigError
from giaudit.priors.ddpm import DDPMConfig, build_unet


class LeNet(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, size: int = 32,
                 activation: str = "sigmoid") -> None:
        super().__init__()
        act: Callable[[], nn.Module] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), act(),
        )
        side = -(-size // 4)  # two stride-2 convs with padding 2: ceil(ceil(size / 2) / 2) = ceil(size / 4)
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class ConvNet(nn.Module):
    """Geiping et al.'s ConvNet (width w): 8 conv blocks, 2 max-pools, linear head."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 64, size: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        layers += _conv_bn(channels, w)
        layers += _conv_bn(w, 2 * w)
        layers += _conv_bn(2 * w, 2 * w)
        layers += _conv_bn(2 * w, 4 * w)
        layers += _conv_bn(4 * w, 4 * w)
        layers += _conv_bn(4 * w, 4 * w)
        layers += [nn.MaxPool2d(3)]
        layers += _conv_bn(4 * w, 4 * w)
        layers += _conv_bn(4 * w, 4 * w)
        layers += [nn.MaxPool2d(3)]
        self.body = nn.Sequential(*layers)
        side = (size // 3) // 3
        self.fc = nn.Linear(4 * w * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 px inputs (3x3 stem, no max-pool), as used for CIFAR."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layers(x)).flatten(1))


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: how it is built and what the scenario needs to know about it.

    `build(channels, num_classes, size, width)`; `takes_width`: `scenario.width` sets its size;
    `diffusion`: the federated model is a DDPM noise predictor, so the client is the diffusion client
    (`giaudit.scenario.diffusion`) and its attacks invert a diffusion model; `uniform_init`: weights drawn
    uniformly in [-a, a] instead of PyTorch's default (DLG's sigmoid LeNet: with the default init its
    gradients are too flat to invert well; the ReLU variant keeps the default, since with this init its
    logits explode and the softmax saturates, leaving no gradient).
    """

    build: Callable[[int, int, int, int | None], nn.Module]
    takes_width: bool = False
    diffusion: bool = False
    uniform_init: float | None = None


MODELS: dict[str, ModelEntry] = {
    "lenet": ModelEntry(lambda c, k, s, w: LeNet(c, k, s, "sigmoid"), uniform_init=0.5),
    "lenet_relu": ModelEntry(lambda c, k, s, w: LeNet(c, k, s, "relu")),
    "convnet": ModelEntry(lambda c, k, s, w: ConvNet(c, k, w or 64, s), takes_width=True),
    "resnet18": ModelEntry(lambda c, k, s, w: ResNet18(c, k, w or 64), takes_width=True),
    # The federated DDPM noise predictor; width = the UNet's base channels.
    "ddpm_unet": ModelEntry(lambda c, k, s, w: build_unet(DDPMConfig(
        size=s, channels=c, block_out_channels=(w or 32, 2 * (w or 32), 2 * (w or 32)))), takes_width=True,
        diffusion=True),
}


def seeded_init(build: Callable[[], nn.Module], generator: torch.Generator | None) -> nn.Module:
    """`build()` with the global RNG forked and seeded from `generator`, on the CPU: the initial weights depend
    only on `generator` (the same on every device), and the caller's global RNG state is untouched."""
    seed = 0
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        return build()


def build_model(name: str, *, channels: int, num_classes: int, size: int,
                width: int | None = None, generator: torch.Generator | None = None) -> nn.Module:
    """Build a model with weights drawn from `generator` (reproducible init)."""
    if name not in MODELS:
        raise ConfigError(f"scenario.model: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    if width is not None and not entry.takes_width:
        raise ConfigError(f"scenario.width: {name} takes no width; models that do: "
                          f"{', '.join(n for n, e in MODELS.items() if e.takes_width)}")

    def build() -> nn.Module:
        model = entry.build(channels, num_classes, size, width)
        if entry.uniform_init is not None:
            for p in model.parameters():
                p.data.uniform_(-entry.uniform_init, entry.uniform_init)
        return model

    # nn.Module initialisers draw from the global RNG: forked, so the weights depend only on `generator`.
    return seeded_init(build, generator)

