"""DCGAN-style image generator and discriminator for 28-64 px images.

Architecture after Radford, Metz, Chintala (ICLR 2016, "DCGAN"): a linear map
from the latent code to a small feature map, then stride-2 transposed
convolutions, each followed by BatchNorm and ReLU, and a sigmoid at the end so
images land in [0, 1] (giaudit's data range) rather than DCGAN's tanh range.
The discriminator mirrors it with stride-2 convolutions and LeakyReLU, with
spectral normalisation for the non-saturating GAN loss and without any
normalisation for WGAN-GP (Gulrajani et al. 2017), whose gradient penalty is
per-sample and is broken by BatchNorm.

Attacks use the generator in eval mode: BatchNorm then is a fixed affine map,
so images in a batch do not depend on each other and one generator copy per
image (GIAS's GI-z+theta) behaves like the shared one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from giaudit.errors import ConfigError


def _base_and_ups(size: int) -> tuple[int, int]:
    """Side of the first feature map (4..7) and the number of x2 upsamplings to reach `size`."""
    if not 28 <= size <= 64:
        raise ConfigError(f"prior.size: {size} px is outside the supported 28..64 px range")
    ups, side = 0, size
    while side > 7:
        if side % 2:
            break
        side //= 2
        ups += 1
    if not 4 <= side <= 7 or ups < 2:
        raise ConfigError(f"prior.size: {size} px is not a small side (4..7) times a power of two; "
                          "use e.g. 28, 32, 48, 56 or 64")
    return side, ups


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild a generator (stored as JSON next to the weights)."""

    size: int = 32
    channels: int = 1
    latent_dim: int = 32
    width: int = 32          # channels of the last hidden layer; doubled per step towards the latent

    def __post_init__(self) -> None:
        _base_and_ups(self.size)
        if self.channels not in (1, 3):
            raise ConfigError(f"prior.channels: {self.channels}; use 1 (grey) or 3 (RGB)")
        if self.latent_dim < 1 or self.width < 1:
            raise ConfigError("prior.latent_dim / prior.width: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> GeneratorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{where}: unknown generator keys {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**{k: int(v) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: generator entries must be integers ({exc})") from exc


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, C, size, size) in [0, 1]."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        side, ups = _base_and_ups(config.size)
        self.side = side
        top = config.width * 2 ** (ups - 1)
        self.top = top
        self.project = nn.Sequential(nn.Linear(config.latent_dim, top * side * side, bias=False),
                                     nn.BatchNorm1d(top * side * side), nn.ReLU())
        layers: list[nn.Module] = []
        cin = top
        for _ in range(ups - 1):
            cout = cin // 2
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        layers += [nn.ConvTranspose2d(cin, config.channels, 4, 2, 1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], self.top, self.side, self.side)
        return self.body(h)


class Discriminator(nn.Module):
    """images -> one logit (GAN) or critic value (WGAN-GP) per image.

    `spectral=True` puts spectral normalisation (Miyato et al. 2018) on every layer, which keeps
    the plain GAN loss from collapsing on a small CPU budget (DCGAN's BatchNorm discriminator
    overpowered the generator here); WGAN-GP uses no normalisation (see module doc).
    """

    def __init__(self, config: GeneratorConfig, spectral: bool = False) -> None:
        super().__init__()
        side, ups = _base_and_ups(config.size)
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        layers: list[nn.Module] = []
        cin, cout = config.channels, config.width
        for _ in range(ups):
            layers += [sn(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2)]
            cin, cout = cout, cout * 2
        self.body = nn.Sequential(*layers)
        self.head = sn(nn.Linear(cin * side * side, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """DCGAN's initialisation (N(0, 0.02) weights, BN gamma N(1, 0.02)), drawn from `generator`."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            # Under spectral normalisation `weight` is computed: write the raw parameter.
            parametrized = nn.utils.parametrize.is_parametrized(m, "weight")
            w: Tensor = m.parametrizations.weight.original if parametrized else m.weight  # type: ignore[union-attr,assignment]
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=generator) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * 0.02)
                m.bias.zero_()


def build_generator(config: GeneratorConfig, generator: torch.Generator | None = None) -> Generator:
    """A fresh (untrained) generator with reproducible weights, built on the CPU (the same init everywhere)."""
    with torch.device("cpu"):
        g = Generator(config)
        init_weights(g, generator if generator is not None else torch.Generator().manual_seed(0))
    return g
