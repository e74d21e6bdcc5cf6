"""Robbing the Fed: the imprint attack (Fowl, Geiping, Czaja, Goldblum, Goldstein, ICLR 2022).

Threat model: a malicious server, SoK class G (it modifies the model and holds surrogate data). Its server
step puts an imprint block in front of the agreed image classifier (any module taking N,C,H,W images: a
built-in model or the user's own): a linear layer of k bins whose rows all read one linear measurement of the
image (its brightness, or a random direction) with biases minus the thresholds q_0 < q_1 < ... < q_{k-1},
a ReLU, and a linear layer mapping the bins back onto the image (every weight 1/k), added to the input.
q_0 lies below any image; q_1 .. q_{k-1} are the quantiles at 1/k, ..., (k-1)/k of the measurement: by
default, as in the paper, those of a normal distribution with the mean and standard deviation of the
measurement over the server's surrogate images (``quantiles = "empirical"``: the surrogate images' own).
Bin i fires for every image whose measurement exceeds q_i, and the loss gradient reaching it, g(x), is the
same for every bin that fires (every column of the map back is the same), so the weight and bias gradients
of bin i are sums over those images of g(x) x and g(x). The difference of adjacent bins keeps only the
images between q_i and q_{i+1}: an image alone there is their ratio, exactly (up to float rounding), with no
optimisation. Sums over clients (secure aggregation) and over a batch stay separable by bin, so neither
protects; with bins equally likely under the data, a share (1 - 1/k)^(n - 1) of n images is alone in its
bin. A FedAvg delta of one local step is the gradient times -lr: the ratio is the same.

The attack returns the image of every occupied bin (a bin holding several images gives their g-weighted
mean), padded to the batch size with mid-range images when fewer bins are occupied; the metrics pair each
private image with a distinct one of them. Labels: the server classifies each recovered image with the
agreed model (label source "classified"); the paper recovers none. Deviations: the map back is added to
the input (a residual block) so the classifier after it still sees the image; the paper's variants connect
it in other ways with the same gradient structure.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from giaudit.attacks._common.served import Prepended, agreed_part, block_gradients, classified
from giaudit.attacks.base import ATTACKS, Attack, Budget, Progress, RestartResult, device_of
from giaudit.errors import ThreatModelError
from giaudit.registry import check_choice, check_number
from giaudit.types import Capability, DataSpec, Observation

MEASUREMENTS = ("brightness", "random")
QUANTILES = ("normal", "empirical")
# A bin is occupied when its bias-gradient difference exceeds this share of the largest bias gradient: an
# empty bin's difference is float rounding of two sums over the same images, an occupied one's is one
# image's gradient share.
OCCUPIED = 1e-5


class ImprintBlock(nn.Module):
    """x -> x + back(ReLU(imprint(flat x))): k cumulative bins of one linear measurement of the image."""

    def __init__(self, shape: tuple[int, int, int], direction: Tensor, thresholds: Tensor) -> None:
        super().__init__()
        self.shape = tuple(shape)
        size, bins = math.prod(shape), int(thresholds.numel())
        self.imprint = nn.Linear(size, bins, device=direction.device, dtype=direction.dtype)
        self.back = nn.Linear(bins, size, device=direction.device, dtype=direction.dtype)
        with torch.no_grad():
            self.imprint.weight.copy_(direction.reshape(1, size).expand(bins, size))
            self.imprint.bias.copy_(-thresholds.to(direction))
            self.back.weight.fill_(1.0 / bins)
            self.back.bias.zero_()

    @property
    def bins(self) -> int:
        return self.imprint.out_features

    def forward(self, x: Tensor) -> Tensor:
        return x + self.back(torch.relu(self.imprint(x.flatten(1)))).view_as(x)


def measurement_direction(kind: str, shape: tuple[int, int, int], generator: torch.Generator,
                          like: Tensor) -> Tensor:
    """The measurement as a unit-sum (brightness: every pixel 1/D) or unit-norm (random) direction, on the
    device and dtype of `like`; the random one is drawn on the CPU generator."""
    size = math.prod(shape)
    if kind == "brightness":
        return torch.full((size,), 1.0 / size, device=like.device, dtype=like.dtype)
    d = torch.randn(size, generator=generator, dtype=torch.float64, device=generator.device)
    return (d / d.norm()).to(device=like.device, dtype=like.dtype)


def bin_thresholds(measured: Tensor, bins: int, floor: float, fit: str = "normal") -> Tensor:
    """q_0 = `floor` (below any image), then the quantiles at 1/k, ..., (k-1)/k of the measured values: of the
    normal distribution with their mean and standard deviation (`fit` "normal"), or their own ("empirical")."""
    levels = torch.arange(1, bins, dtype=torch.float64, device=measured.device) / bins
    m = measured.to(torch.float64)
    if fit == "normal":
        q = m.mean() + m.std() * math.sqrt(2.0) * torch.erfinv(2 * levels - 1)
    else:
        q = torch.quantile(m, levels)
    return torch.cat([q.new_tensor([floor]), q.clamp_min(floor)]).to(measured.dtype)


def separate_bins(weight_grad: Tensor, bias_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Each bin's share of the cumulative gradients: (sum of g(x) x, sum of g(x)) over the images in bin i
    (between q_i and q_{i+1}; the last bin above q_{k-1})."""
    w = torch.cat([weight_grad[:-1] - weight_grad[1:], weight_grad[-1:]])
    b = torch.cat([bias_grad[:-1] - bias_grad[1:], bias_grad[-1:]])
    return w, b


def recover(weight_grad: Tensor, bias_grad: Tensor) -> tuple[Tensor, Tensor]:
    """The image of every occupied bin (flat, one row per bin) and the indices of those bins."""
    w, b = separate_bins(weight_grad, bias_grad)
    scale = bias_grad.abs().max()
    occupied = (b.abs() > OCCUPIED * scale).nonzero().flatten() if scale > 0 else b.new_zeros(0, dtype=torch.long)
    return w[occupied] / b[occupied, None], occupied


def find_block(model: nn.Module) -> ImprintBlock | None:
    return next((m for m in model.modules() if isinstance(m, ImprintBlock)), None)


@ATTACKS.register("imprint")
class Imprint(Attack):
    requires: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.BATCH_SIZE, Capability.MODIFIES_MODEL, Capability.SURROGATE_DATA})
    sok_class: ClassVar[str] = "G"
    display_name: ClassVar[str] = "Robbing the Fed (imprint)"
    analytic: ClassVar[bool] = True

    def __init__(self, *, bins: int = 128, measurement: str = "brightness", quantiles: str = "normal") -> None:
        super().__init__()
        check_number("bins", bins, low=2)
        check_choice("measurement", measurement, MEASUREMENTS)
        check_choice("quantiles", quantiles, QUANTILES)
        self.bins, self.measurement, self.quantiles = int(bins), measurement, quantiles

    def modify(self, model: nn.Module, data_spec: DataSpec, surrogate: Tensor | None,
               generator: torch.Generator) -> nn.Module:
        if surrogate is None or surrogate.shape[0] == 0:
            raise ThreatModelError(f"attack {self.name!r} sets its bins on surrogate images: set "
                                   "threat.surrogate_data = true and keep a held-out split (data.holdout > 0)")
        like = next(model.parameters())
        direction = measurement_direction(self.measurement, data_spec.shape, generator, like)
        measured = surrogate.to(device=like.device, dtype=like.dtype).flatten(1) @ direction
        lo, hi = data_spec.value_range
        floor = float(torch.minimum(direction * lo, direction * hi).sum()) - 1.0
        if measured.numel() < 2:
            raise ThreatModelError(f"attacks.{self.name}: the server needs at least 2 surrogate images to set its "
                                   "bins; raise data.holdout")
        block = ImprintBlock(data_spec.shape, direction, bin_thresholds(measured, self.bins, floor, self.quantiles))
        return Prepended(block, model)

    def modification(self, model: nn.Module) -> dict[str, Any]:
        block = find_block(model)
        if block is None:
            return {}
        inner = agreed_part(model)
        return {"block": "imprint", "bins": block.bins, "measurement": self.measurement,
                "placed": f"in front of {type(inner).__name__}",
                "parameters_added": sum(p.numel() for p in block.parameters())}

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        # The server classifies the recovered images itself (run_restart): no label recovery from the update.
        return torch.zeros(0, dtype=torch.long, device=device_of(obs)), "classified"

    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        block = find_block(obs.model)
        if block is None:
            raise ThreatModelError(f"attack {self.name!r}: the observed model holds no imprint block; the update "
                                   "was not computed on the model this attack's server step sends")
        flat, occupied = recover(*block_gradients(obs, block.imprint))
        images, predicted = classified(obs, flat)
        return RestartResult(images, predicted, [], 0.0,
                             extra={"label_source": "classified", "occupied_bins": int(occupied.numel()),
                                    "bins": block.bins})
