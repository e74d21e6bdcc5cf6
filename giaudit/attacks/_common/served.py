"""What a malicious server's attack puts in front of the agreed model (shared by the active attacks)."""
from __future__ import annotations

from torch import Tensor, nn


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
