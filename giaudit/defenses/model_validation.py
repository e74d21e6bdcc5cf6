"""Model validation: the client refuses a global model that is not the agreed one.

The counter-measure a deployment can run against a malicious server (SoK classes F-H) that changes the
model it sends (Fowl et al. 2022, Boenisch et al. 2023 and Wen et al. 2022 each note that a client which
checks the model it receives defeats their server step; Boenisch et al. discuss it as the natural
defense). The client compares a fingerprint of the model it received with the one the federation agreed on
before computing anything:

- ``check = "architecture"``: the module tree (names and classes) and every parameter's name, shape and
  dtype. It catches an added block (the imprint of Robbing the Fed), not new values in agreed layers.
- ``check = "parameters"`` (default): the architecture and a hash of every parameter's values, which a
  client can check when it knows the agreed weights (e.g. the published aggregate of the last round). It
  also catches changed weights (trap weights, a fished last layer).

A model that differs is refused: the client sends no update, and the audit's record of the attack is
"blocked" (nothing leaked), which the report states apart from an attack that ran and failed. The model
the server sent is ``ClientStep.context["served_model"]`` and the agreed one
``ClientStep.context["agreed_model"]`` (set by the scenario); a step without them (the federation's own
training of utility and checkpoints, whose server is honest by construction) is left as it is.

Threat model: any server; the defense only ever refuses a modified model, so an honest-but-curious server
sees exactly what it saw without it.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from torch import nn

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.errors import ModelRefused
from giaudit.registry import check_choice

CHECKS = ("architecture", "parameters")


def architecture(model: nn.Module) -> list[str]:
    """The module tree and parameter shapes, one entry per module and per parameter, in order."""
    modules = [f"module {name or '<root>'}: {type(m).__module__}.{type(m).__qualname__}"
               for name, m in model.named_modules()]
    params = [f"parameter {name}: {tuple(p.shape)} {p.dtype}" for name, p in model.named_parameters()]
    return modules + params


def parameter_hashes(model: nn.Module) -> list[str]:
    """One entry per parameter: its name and a hash of its values."""
    return [f"parameter {name} values {hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}"
            for name, p in model.named_parameters()]


def fingerprint(model: nn.Module, check: str = "parameters") -> list[str]:
    """What a client compares (`check`: "architecture" or "parameters", the architecture and the values)."""
    return architecture(model) + (parameter_hashes(model) if check == "parameters" else [])


def first_difference(agreed: list[str], served: list[str]) -> str | None:
    """The first entry where two fingerprints differ, in words; None when they are equal."""
    for a, b in zip(agreed, served):
        if a != b:
            return f"the agreed model has {a.split(' values ')[0]!r}, the server's {b.split(' values ')[0]!r}" \
                if a.split(" values ")[0] != b.split(" values ")[0] else f"{a.split(' values ')[0]} has other values"
    if len(agreed) != len(served):
        longer, which = (served, "server's") if len(served) > len(agreed) else (agreed, "agreed")
        return f"the {which} model also has {longer[min(len(agreed), len(served))]!r}"
    return None


@register("model_validation")
class ModelValidation(RegisteredDefense):
    def __init__(self, *, check: Literal["architecture", "parameters"] = "parameters") -> None:
        check_choice("check", check, CHECKS)
        self.check = check

    def configure(self, step: ClientStep) -> ClientStep:
        served, agreed = step.context.get("served_model"), step.context.get("agreed_model")
        if served is None or agreed is None or served is agreed:
            return step
        diff = first_difference(fingerprint(agreed, self.check), fingerprint(served, self.check))
        if diff is not None:
            raise ModelRefused(f"{self.where} (model_validation, check = {self.check!r}) refused the server's "
                               f"model: {diff}")
        return step
