"""Fishing for User Data: class fishing (Wen, Geiping, Fowl, Goldblum, Goldstein, "Fishing for User Data in
Large-Batch Federated Learning via Gradient Magnification", ICML 2022), composed with Inverting Gradients.

Threat model: a malicious server, SoK class F: it modifies the model and needs no data. Its server step
changes the last layer of the agreed image classifier (any model whose last parameterised module is an
``nn.Linear`` with one output per class: a built-in model or the user's own). Every row but the target
class's gets weight 0 and bias `margin` (large); the target row keeps its agreed weights and bias. An image of
another class then has (to float precision, e^-margin) probability 0 for the target class and equal
probabilities over the others, so its loss gradient reaching the features is zero and it adds nothing to any
parameter but the non-target rows of the last layer. An image of the target class is misclassified by about
`margin`: its gradient is at full strength, w_t^T dh/dtheta below the last layer, -h(x) and -1 in the target
row. The sum over a batch and over the clients of a round (secure aggregation, a large batch), restricted to
the parameters the fishing isolates (all of them but the non-target rows of the last layer, which the server
itself zeroed), is therefore the gradient of the target-class images alone.

The attack reads from the isolated update how many images it caught: the target row's bias gradient is -1
per caught image, scaled as the client's step scales it (the mean over its batch: 1/B; a FedAvg delta: lr x
epochs / mini-batch size), summed over clients of the same batch size. It then runs Inverting Gradients (the
`ig` attack's own loop, options `lr`, `tv_weight`, `distance`, `schedule`) on the isolated update as a batch of
that many images (a batch of one when one image was caught, or none: the record says how many), every label the
target class, matching the same restricted parameters. The result is padded to the batch size with mid-range
images; the metrics pair each private image with a distinct one of them, so an image caught from another client
of the aggregate matches none of the audited client's.

The target class is a declared option (`target_class`, default 0): the server chooses which class it fishes
for before it sees any update; nothing is chosen from the ground truth. Deviations: the paper then fishes for
one image within a class by a feature's value (feature fishing) and the server may run several rounds; this
is the class attack of one round, so when several images of the target class fall into the aggregate IG
recovers them as a batch. BatchNorm in train mode mixes a client's batch (the paper's caveat): the isolation is
exact for models without it. A FedAvg delta of several local steps is matched by unrolling the client's
protocol on the caught images alone (an approximation when mini-batches would have mixed them with others).
The change keeps the architecture: model_validation with check = "architecture" lets it through, the default
parameter check refuses it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from giaudit.attacks._common.served import padded
from giaudit.attacks.base import ATTACKS, Budget, Descent, Dim, RestartResult, device_of
from giaudit.attacks.ig import InvertingGradients
from giaudit.errors import ThreatModelError
from giaudit.registry import check_number
from giaudit.types import Capability, DataSpec, Observation, SharedUpdate


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier's last layer: the last `nn.Linear` of `model`, whose weight and bias must be the model's
    last two parameters (the logits come straight out of it)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    params = list(model.parameters())
    if not linears or linears[-1][1].bias is None or len(params) < 2 \
            or params[-2] is not linears[-1][1].weight or params[-1] is not linears[-1][1].bias:
        raise ThreatModelError(f"attack 'fishing' changes the last layer of the classifier: {type(model).__name__}'s "
                               "last parameters are not those of an nn.Linear with a bias")
    return linears[-1]


def fish(layer: nn.Linear, target: int, margin: float) -> None:
    """Class fishing on the last layer, in place: every row but `target` gets weight 0 and bias `margin`."""
    with torch.no_grad():
        keep_w, keep_b = layer.weight[target].clone(), layer.bias[target].clone()
        layer.weight.zero_()
        layer.bias.fill_(margin)
        layer.weight[target] = keep_w
        layer.bias[target] = keep_b


def isolating_mask(model: nn.Module, target: int) -> list[Tensor | None]:
    """Per parameter of `model`, the mask of the entries the fishing isolates (None: all of them): the last
    layer's target row and bias entry; every parameter below it."""
    masks: list[Tensor | None] = [None for _ in model.parameters()]
    _name, layer = last_linear(model)
    w = torch.zeros_like(layer.weight)
    b = torch.zeros_like(layer.bias)
    w[target] = 1
    b[target] = 1
    masks[-2], masks[-1] = w, b
    return masks


def isolated(tensors: tuple[Tensor, ...], masks: list[Tensor | None]) -> tuple[Tensor, ...]:
    """The entries of an update (or a trial) the fishing isolates; the others set to zero."""
    return tuple(t if m is None else t * m for t, m in zip(tensors, masks))


def caught(obs: Observation, target: int, steps_per_image: float) -> float:
    """How many images of the target class the isolated update holds, from the target row's bias entry: -1
    per image, times `steps_per_image` (the client's scaling), summed over the clients of the round."""
    bias = obs.update.tensors[-1][target]
    value = float(-bias if obs.update.kind == "gradient" else bias)
    return value / steps_per_image


@ATTACKS.register("fishing")
class Fishing(InvertingGradients):
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE, Capability.MODIFIES_MODEL})
    sok_class: ClassVar[str] = "F"
    display_name: ClassVar[str] = "Fishing for user data (class fishing + IG)"
    search_space: ClassVar[Mapping[str, Dim]] = {}

    def __init__(self, *, target_class: int = 0, margin: float = 1000.0, lr: float = 0.1, tv_weight: float = 1e-4,
                 distance: str = "cosine", schedule: str = "steps") -> None:
        super().__init__(lr=lr, tv_weight=tv_weight, distance=distance, schedule=schedule)
        check_number("target_class", target_class, low=0)
        check_number("margin", margin, low=0.0, strict_low=True)
        self.target_class, self.margin = int(target_class), float(margin)

    def _target(self, num_classes: int) -> int:
        if self.target_class >= num_classes:
            raise ThreatModelError(f"attacks.{self.name}.target_class: {self.target_class} is not a class of "
                                   f"the data ({num_classes} classes)")
        return self.target_class

    def modify(self, model: nn.Module, data_spec: DataSpec, surrogate: Tensor | None,
               generator: torch.Generator) -> nn.Module:
        _name, layer = last_linear(model)
        if layer.out_features != data_spec.num_classes:
            raise ThreatModelError(f"attack {self.name!r}: the last layer of {type(model).__name__} has "
                                   f"{layer.out_features} outputs, the data {data_spec.num_classes} classes")
        fish(layer, self._target(data_spec.num_classes), self.margin)
        return model

    def modification(self, model: nn.Module) -> dict[str, Any]:
        name, layer = last_linear(model)
        others = [i for i in range(layer.out_features) if i != self.target_class]
        if not others or bool(layer.weight[others].detach().any()) \
                or not bool((layer.bias[others].detach() == self.margin).all()):
            return {}
        return {"did": f"changed the last layer ({name or type(layer).__name__}) of {type(model).__name__}",
                "target_class": self.target_class, "margin": self.margin, "rows_changed": len(others)}

    def capabilities_used(self, obs: Observation) -> set[Capability]:
        return set(self.requires) | ({Capability.TRAINING_DETAILS} if obs.update.kind == "delta" else set())

    def _steps_per_image(self, obs: Observation) -> float:
        batch = obs.batch_size or 1
        if obs.update.kind == "gradient":
            return 1.0 / batch
        protocol = self.protocol_for(obs)
        return protocol.local_lr * protocol.local_steps / (protocol.local_batch_size or batch)

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        if not self.modification(obs.model):
            raise ThreatModelError(f"attack {self.name!r}: the observed model's last layer is not fished for class "
                                   f"{self.target_class}; the update was not computed on the model this attack's "
                                   "server step sends")
        n = min(max(self._caught(obs), 1), obs.batch_size or 1)  # none caught: IG still tries one image
        return torch.full((n,), self.target_class, dtype=torch.long, device=device_of(obs)), "fished"

    def _caught(self, obs: Observation) -> int:
        return max(round(caught(obs, self._target(obs.data_spec.num_classes), self._steps_per_image(obs))), 0)

    def _masks(self, model: nn.Module) -> list[Tensor | None]:
        """`isolating_mask` of `model`, built once per model rather than at every iteration's trial update."""
        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached[0] is not model:
            cached = self._mask_cache = (model, isolating_mask(model, self.target_class))
        return cached[1]

    def trial_update(self, obs: Observation, model: torch.nn.Module, x: Tensor, labels: Tensor,
                     *, create_graph: bool = True) -> tuple[Tensor, ...]:
        trial = super().trial_update(obs, model, x, labels, create_graph=create_graph)
        return isolated(trial, self._masks(model))

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        update = SharedUpdate(isolated(obs.update.tensors, self._masks(obs.model)), obs.update.kind)
        # IG on the isolated update, as a batch of the caught images.
        fished = dataclasses.replace(obs, update=update, batch_size=labels.numel())
        result = yield from super().descend(fished, labels, budget, generator)
        images = padded(obs, result.images.detach())
        pad = images.shape[0] - labels.numel()
        return RestartResult(images, torch.cat([labels, labels.new_full((pad,), self.target_class)]), result.losses,
                             result.final_loss, result.stopped_early,
                             extra={"label_source": "fished", "target_class": self.target_class,
                                    "caught": self._caught(obs)})
