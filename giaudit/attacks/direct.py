"""Attack one update you already hold: `attack_update(model, update, data_shape=...)`.

For a model and the update one client shared with it (from your own federated pipeline, outside an audit
config): the FedSGD gradient of the client's mean cross-entropy loss, or its FedAvg weight difference
(w_after - w_before, ``kind="delta"``). The attack is any registered one (`ATTACKS`), built and validated as
a config's ``[attacks.<name>]`` table is; the observation is built by `giaudit.threat.observe`, like every
other observation, under the threat model stated here:

- the batch size is known (SoK class B): `data_shape` (N, C, H, W) or `batch_size` gives it;
- the client's training details (local learning rate, local steps, mini-batch size: class C) are known for
  a delta only, from `protocol`; a gradient needs none;
- the true labels are given (an oracle) only when `labels` is passed;
- surrogate data (a prior trained on similar data: class D) is granted when the attack requires it: choosing
  GIAS, GGL or DiffULA states that you hold its prior;
- never the client's BatchNorm statistics.

The model is used as passed (its weights and its train/eval mode, the mode the client computed the update
in) and must take images in [0, 1]; it is copied first, so the caller's model is neither moved nor changed.
The record says which capabilities the attack actually used.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from giaudit.attacks.base import ATTACKS, Budget
from giaudit.errors import ConfigError
from giaudit.registry import build_from, check_value, options
from giaudit.threat import observe, threat_model
from giaudit.types import Capability, ClientProtocol, DataSpec, SharedUpdate

KINDS = ("gradient", "delta")
VALUE_RANGE = (0.0, 1.0)  # the images the model takes and the attack returns


@dataclass(frozen=True)
class UpdateReconstruction:
    """What `attack_update` returns: the reconstructed batch and a plain-data record of how it was found."""

    images: Tensor            # N,C,H,W in [0, 1], on the attack's device
    labels: Tensor            # N, the labels the attack used
    record: dict[str, Any]    # JSON-ready: attack, display name, params, labels, threat, iterations, losses, time


def attack_update(model: nn.Module, update: Sequence[Tensor] | Mapping[str, Tensor], *,
                  data_shape: Sequence[int], attack: str = "ig", kind: str = "gradient",
                  num_classes: int | None = None, labels: Tensor | Sequence[int] | None = None,
                  batch_size: int | None = None, budget: Budget | Mapping[str, Any] | None = None, seed: int = 0,
                  device: torch.device | str | None = None, protocol: ClientProtocol | None = None,
                  **opts: Any) -> UpdateReconstruction:
    """Reconstruct the batch behind `update` with the attack `attack`.

    `update`: one tensor per parameter in `model.parameters()` order, or a dict keyed by
    `model.named_parameters()` names. `data_shape`: (C, H, W), with the batch size from `batch_size`, from
    `labels` or 1; or (N, C, H, W). `num_classes`: by default the `out_features` of the model's last
    `nn.Linear`. `budget`: a `Budget` or its keys as a dict (``{"iterations": 200, "restarts": 2}``);
    default `Budget()`. `seed` seeds label recovery and the restarts (the same seed gives the same images
    on every device: starts are drawn on the CPU). `device`: where the model copy, the update and every
    tensor of the attack live (default: the model's). `protocol`: the client's FedAvg training details,
    required with ``kind="delta"``. Other keywords are the attack's options (``lr=0.1`` for ``ig``).

    Every argument is checked before anything is computed; a bad one raises ConfigError naming it (attack
    options and budget keys as ``attacks.<attack>.<key>``, like a config).
    """
    cls = ATTACKS.get(attack, "attack")
    where = f"attacks.{attack}"
    budget_keys = set(options(Budget))
    for key in opts:
        if key in budget_keys:
            raise ConfigError(f"{where}.{key}: a budget key; pass it as budget={{{key!r}: ...}}")
    attacker = ATTACKS.build(attack, opts, where)
    if budget is None:
        budget = Budget()
    elif isinstance(budget, Mapping):
        budget = build_from(Budget, budget, where)
    elif not isinstance(budget, Budget):
        raise ConfigError(f"budget: expected a Budget or a dict of its keys, got {budget!r}")
    seed = check_value("seed", seed, int)
    if kind not in KINDS:
        raise ConfigError(f"kind: expected 'gradient' or 'delta', got {kind!r}")
    protocol = _protocol(kind, protocol)

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if not named:
        raise ConfigError("model: it has no parameters, so it has no update to attack")
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        raise ConfigError(f"model: parameter {frozen[0]!r} does not require grad; the attack matches the update "
                          "of every parameter in model.parameters(), so unfreeze it")
    dev = torch.device(device) if device is not None else named[0][1].device
    shape = _data_shape(data_shape)
    n = _batch(shape, batch_size, labels)
    channels, height, width = shape[-3:]
    classes = _num_classes(model, num_classes)
    label_tensor = _labels(labels, n, classes, dev)
    tensors = _update(update, named, dev)

    local = copy.deepcopy(model).to(dev)
    spec = DataSpec(channels, height, width, classes, VALUE_RANGE, name="attack_update")
    threat = threat_model(batch_size=True, training_details=kind == "delta",
                          surrogate_data=Capability.SURROGATE_DATA in cls.requires,
                          true_labels=label_tensor is not None)
    obs = observe(model=local, update=SharedUpdate(tensors, "delta" if kind == "delta" else "gradient"),
                  data_spec=spec, threat=threat, batch_size=n, protocol=protocol, labels=label_tensor,
                  bn_statistics=None)
    rec = attacker.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(seed))
    t = rec.trace
    record = {
        "attack": attack, "display_name": cls.display_name, "params": attacker.params(),
        "label_source": rec.label_source, "threat": attacker.threat_record(obs, rec.label_source),
        "kind": kind, "batch_size": n, "data_shape": [channels, height, width], "num_classes": classes,
        "seed": seed, "device": str(dev), "iterations": t.iterations, "restarts": budget.restarts,
        "best_restart": t.best_restart, "losses": [float(v) for v in t.losses],
        "restart_losses": [float(v) for v in t.restart_losses], "stopped_early": t.stopped_early,
        "wall_s": t.wall_s,
    }
    return UpdateReconstruction(rec.images, rec.labels, record)


def _protocol(kind: str, protocol: ClientProtocol | None) -> ClientProtocol:
    if protocol is not None and not isinstance(protocol, ClientProtocol):
        raise ConfigError(f"protocol: expected a giaudit.types.ClientProtocol, got {protocol!r}")
    if kind == "gradient":
        if protocol is not None and protocol.name != "fedsgd":
            raise ConfigError(f"protocol: a {protocol.name} protocol shares a weight difference; pass "
                              "kind='delta' with it, or no protocol for a gradient")
        return protocol or ClientProtocol()
    if protocol is None or protocol.name != "fedavg":
        raise ConfigError("protocol: kind='delta' needs the client's training details, e.g. "
                          "ClientProtocol('fedavg', local_steps=1, local_lr=0.1, local_batch_size=None)")
    return protocol


def _data_shape(data_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(data_shape) if isinstance(data_shape, (tuple, list, torch.Size)) else ()
    if len(shape) not in (3, 4) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                           for d in shape):
        raise ConfigError(f"data_shape: expected (C, H, W) or (N, C, H, W) of positive integers, got {data_shape!r}")
    return shape


def _batch(shape: tuple[int, ...], batch_size: int | None, labels: Tensor | Sequence[int] | None) -> int:
    if batch_size is not None:
        check_value("batch_size", batch_size, int)
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if len(shape) == 4:
        if batch_size is not None and batch_size != shape[0]:
            raise ConfigError(f"batch_size: {batch_size} disagrees with data_shape {shape}")
        return shape[0]
    if batch_size is not None:
        return batch_size
    return len(labels) if labels is not None else 1


def _num_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is not None:
        check_value("num_classes", num_classes, int)
        if num_classes < 2:
            raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
        return num_classes
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError("num_classes: the model has no nn.Linear layer to read it from; pass num_classes")
    return int(linear[-1].out_features)


def _labels(labels: Tensor | Sequence[int] | None, n: int, classes: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    try:
        out = torch.as_tensor(labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"labels: expected N class indices, got {labels!r}") from None
    if out.dtype.is_floating_point or out.dtype == torch.bool or out.ndim != 1:
        raise ConfigError(f"labels: expected a 1-d sequence of integer class indices, got shape "
                          f"{tuple(out.shape)} of {out.dtype}")
    if out.numel() != n:
        raise ConfigError(f"labels: {out.numel()} labels for a batch of {n}")
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= classes):
        raise ConfigError(f"labels: class indices must lie in [0, {classes - 1}], got {out.tolist()}")
    return out.long()


def _update(update: Sequence[Tensor] | Mapping[str, Tensor], named: list[tuple[str, nn.Parameter]],
            device: torch.device) -> tuple[Tensor, ...]:
    """The update as one tensor per parameter in `model.parameters()` order, on `device`."""
    names = [n for n, _ in named]
    if isinstance(update, Mapping):
        extra = [k for k in update if k not in names]
        if extra:
            raise ConfigError(f"update[{extra[0]!r}]: not a parameter of the model (model.named_parameters() "
                              f"names: {', '.join(names)})")
        missing = [n for n in names if n not in update]
        if missing:
            raise ConfigError(f"update[{missing[0]!r}]: missing; the update needs one tensor per parameter "
                              f"({len(missing)} of {len(names)} missing)")
        given = [(f"update[{n!r}]", update[n]) for n in names]
    elif isinstance(update, Sequence) and not isinstance(update, (str, bytes)):
        if len(update) != len(names):
            raise ConfigError(f"update: {len(update)} tensors for the model's {len(names)} parameters "
                              "(one per model.parameters() entry, in that order, or a dict by name)")
        given = [(f"update[{i}] (parameter {n!r})", t) for i, (n, t) in enumerate(zip(names, update))]
    else:
        raise ConfigError(f"update: expected a sequence of tensors or a dict of them by parameter name, "
                          f"got {type(update).__name__}")
    out = []
    for (where, t), (_, p) in zip(given, named):
        if not isinstance(t, Tensor):
            raise ConfigError(f"{where}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(p.shape):
            raise ConfigError(f"{where}: shape {tuple(t.shape)}, the parameter's is {tuple(p.shape)}")
        if not t.dtype.is_floating_point:
            raise ConfigError(f"{where}: expected floating-point values, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{where}: holds non-finite values")
        out.append(t.detach().to(device=device, dtype=p.dtype))
    return tuple(out)
