"""Federated-learning primitives shared by the client, the defenses and the attacks.

One floor below `scenario`, `defenses` and `attacks`, so each can use them
without importing the others:

- `compute_update`, the client's update function, written once: the scenario
  computes the real update with it and every gradient-matching attack computes
  its trial update with it, so attack and client cannot drift apart (same
  loss, same mini-batch order, same local steps);
- `classification_loss` and `minibatches`, the pieces DP-SGD's per-sample
  step reuses;
- `Normalise`, the input normalisation a model applies as its first operation
  (a forward pre-hook), which stacked attack solvers recognise and apply;
- `BNStatsRecorder`, the batch statistics BatchNorm layers see: the client
  reports them (detached) when the threat model grants `bn_statistics`, and an
  attack with the BN prior of Yin et al. 2021 records those of its candidate
  (differentiable) to match them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from giaudit.types import ClientProtocol


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy; `labels` are class indices (long) or per-class probabilities (float)."""
    if labels.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, labels)
    return classification_losses(logits, labels).mean()


def classification_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """The per-sample terms of `classification_loss`, over any leading axes of `logits` (..., classes) and
    `labels` (..., class indices or ..., classes probabilities)."""
    if labels.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               reduction="none").reshape(labels.shape)
    return -(labels * F.log_softmax(logits, dim=-1)).sum(-1)


def minibatches(n: int, size: int | None) -> list[slice]:
    """Fixed, ordered mini-batches: the FedAvg client's data order (known to a class-C attacker)."""
    size = n if size is None or size >= n else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def local_batches(protocol: ClientProtocol, n: int) -> list[slice | list[int]]:
    """The FedAvg client's local steps over its `n` samples, in order: the recorded `protocol.order` when the
    deployment recorded it (a shuffling data loader), else `local_steps` epochs of `minibatches`."""
    if protocol.order is not None:
        bad = [i for step in protocol.order for i in step if not 0 <= i < n]
        if bad:
            raise ValueError(f"the recorded local-step order names sample {bad[0]}, but the client has {n}")
        return [list(step) for step in protocol.order]
    return [sl for _ in range(protocol.local_steps) for sl in minibatches(n, protocol.local_batch_size)]


def compute_update(model: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol | None = None,
                   *, create_graph: bool = False,
                   params: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
    """FedSGD: gradient of the mean loss. FedAvg: w_after - w_before of SGD over the client's
    `local_batches` (`local_steps` epochs of ordered mini-batches, or the recorded order).

    With `create_graph=True` the result is differentiable in `x` (and in `y`
    when soft), which is what a gradient-matching attack optimises.
    """
    protocol = protocol or ClientProtocol()
    names = [n for n, _ in model.named_parameters()]
    start = list(params) if params is not None else [p for p in model.parameters()]
    if protocol.name == "fedsgd":
        logits = functional_call(model, dict(zip(names, start)), (x,))
        return tuple(torch.autograd.grad(classification_loss(logits, y), start, create_graph=create_graph))
    current = start
    for sl in local_batches(protocol, x.shape[0]):
        logits = functional_call(model, dict(zip(names, current)), (x[sl],))
        grads = torch.autograd.grad(classification_loss(logits, y[sl]), current, create_graph=create_graph)
        current = [p - protocol.local_lr * g for p, g in zip(current, grads)]
    return tuple(c - s for c, s in zip(current, start))


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


class Normalise:
    """Forward pre-hook: the model's input x (N, C, H, W in [0, 1]) becomes (x - mean) / std per channel.

    A hook rather than a wrapper module, so the model keeps its state-dict names, its parameter order and its
    attributes (the deployment's weights, captures and checkpoints match it name for name). The constants
    follow the input's device and dtype."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, *rest = args
        if x.shape[1] != len(self.mean):
            raise ValueError(f"data.mean: {len(self.mean)} values for an input of {x.shape[1]} channels")
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std, *rest)


def normalise_inputs(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """`model` with (x - mean) / std as the first operation of its forward (a `Normalise` pre-hook)."""
    model.register_forward_pre_hook(Normalise(mean, std))
    return model


def normalisation_of(model: nn.Module) -> Normalise | None:
    """The `Normalise` hook on `model`, if it has one."""
    return next((h for h in model._forward_pre_hooks.values() if isinstance(h, Normalise)), None)
