"""What a malicious server's attack puts in front of the agreed model (shared by the active attacks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from giaudit.types import Observation


class Prepended(nn.Module):
    """The model a malicious server sends: its `block`, then the agreed `model` (any module taking N,C,H,W)."""

    def __init__(self, block: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.block(x))


def agreed_part(model: nn.Module) -> nn.Module:
    """The agreed model inside a model the server sent (the model itself when nothing was prepended)."""
    return model.model if isinstance(model, Prepended) else model


def classify(model: nn.Module, images: Tensor) -> Tensor:
    """The agreed model's predicted class for each image (eval mode, restored after): the labels a server
    gives the images it recovered."""
    inner = agreed_part(model)
    was = inner.training
    inner.eval()
    try:
        out = inner(images).argmax(1)
    finally:
        inner.train(was)
    return out.detach()


def block_gradients(obs: Observation, layer: nn.Linear) -> tuple[Tensor, Tensor]:
    """The observed update's (weight, bias) entries of `layer`, a linear layer of the served model."""
    index = {id(p): i for i, p in enumerate(obs.model.parameters())}
    return obs.update.tensors[index[id(layer.weight)]], obs.update.tensors[index[id(layer.bias)]]


def padded(obs: Observation, images: Tensor) -> Tensor:
    """`images` padded with mid-range images to at least the batch size (an attack recovered fewer than the
    batch has): the metrics pair each private image with a distinct one of them."""
    lo, hi = obs.data_spec.value_range
    pad = max((obs.batch_size or 0) - images.shape[0], 0)
    return torch.cat([images, images.new_full((pad, *obs.data_spec.shape), (lo + hi) / 2)])


def classified(obs: Observation, flat: Tensor) -> tuple[Tensor, Tensor]:
    """The recovered rows `flat` as images of the data's shape, padded with mid-range images to at least the
    batch size (fewer bins or neurons held an image than the batch has), and the agreed model's label for each."""
    images = padded(obs, flat.reshape(-1, *obs.data_spec.shape))
    lo, hi = obs.data_spec.value_range
    with torch.no_grad():
        predicted = classify(obs.model, images.clamp(lo, hi))
    return images.detach(), predicted

