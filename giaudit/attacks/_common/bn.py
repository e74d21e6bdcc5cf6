"""Batch statistics that BatchNorm layers see, recorded by forward hooks.

Written once for both sides: the client reports them (detached) when the
threat model grants `bn_statistics`, and an attack with the BN prior of Yin
et al. 2021 records those of its candidate (differentiable) to match them.
"""
from __future__ import annotations

from torch import Tensor, nn


class BNStatsRecorder:
    """Records (mean, variance) of the input of each BN layer on the first forward after `take()`."""

    def __init__(self, model: nn.Module, *, detach: bool) -> None:
        self.detach = detach
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats: list[tuple[Tensor, Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, _module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        # Only the first forward counts (FedAvg runs several; the reported statistics are the first batch's).
        if len(self.stats) < len(self.layers):
            x = inputs[0].detach() if self.detach else inputs[0]
            dims = [0] + list(range(2, x.ndim))
            self.stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    def take(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """The statistics recorded so far; recording starts afresh."""
        out, self.stats = tuple(self.stats), []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
