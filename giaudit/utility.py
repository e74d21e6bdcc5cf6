"""What a defense costs the model: test accuracy after a short federated training.

A privacy number means little without its price. For one scenario and one
defense configuration we run a short FedSGD / FedAvg training (McMahan et
al. 2017) from the scenario's global model: each round `clients` IID clients
draw batches from the scenario's data pool and compute their update exactly
as the audited client does (the same `ClientStep` hooks: sampler, targets,
compute, then the defense's transforms), and the server averages the updates
(FedSGD: a step of `server_lr` along the mean gradient; FedAvg: the mean
weight difference is added). Utility is the accuracy on the held-out split of
`build_scenario`, which no client ever draws from, compared with the same
training without the defense (same seed, same client batches where the
defense does not change them).

Each client has its own defense chain and state dict (`ClientStep.context
["client_state"]`), so stateful defenses such as DGC error feedback carry
their residual across that client's rounds. Defenses that act only on what
the server can see (`aggregation_only`: secure aggregation) do not change the
averaged model and are left out here.

This is a cheap proxy (tens of rounds, seconds per defense), not a converged
accuracy: read it as a relative cost.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from giaudit.audit import build_scenario, stable_seed
from giaudit.data import ImageDataset
from giaudit.defenses import Chain, ClientStep, build_chain
from giaudit.errors import ConfigError
from giaudit.types import ClientProtocol, SharedUpdate


@dataclass(frozen=True)
class UtilitySettings:
    rounds: int = 100
    clients: int = 8
    server_lr: float | None = None  # FedSGD server step; None: the protocol's local_lr
    eval_limit: int | None = 1000   # held-out images used for the accuracy (None: all)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("utility.rounds: must be >= 1")
        if self.clients < 1:
            raise ConfigError("utility.clients: must be >= 1")
        if self.server_lr is not None and self.server_lr <= 0:
            raise ConfigError("utility.server_lr: must be > 0")


def _client_chain(tables: Sequence[Mapping[str, Any]]) -> Chain:
    chain = build_chain([dict(t) for t in tables], where="defenses")
    return Chain([d for d in chain.defenses if not getattr(d, "aggregation_only", False)])


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageDataset, limit: int | None = None, batch: int = 500) -> float:
    n = len(data) if limit is None else min(limit, len(data))
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, n, batch):
        correct += int((model(data.images[i:min(i + batch, n)]).argmax(1) == data.labels[i:min(i + batch, n)]).sum())
    model.train(was)
    return correct / max(n, 1)


def federated_training(model: nn.Module, pool: ImageDataset, protocol: ClientProtocol, batch_size: int,
                       tables: Sequence[Mapping[str, Any]], settings: UtilitySettings, seed: int) -> nn.Module:
    """Train a copy of `model` for `settings.rounds` rounds with the defense on every client; return it.

    Client c's batch in round r comes from its own generator seeded by (seed, r, c), and its transforms draw
    from another: a defense that draws extra randomness does not shift the batches, so the defended and the
    undefended runs see the same data wherever the defense leaves the sampler alone (paired comparison).
    """
    k = pool.spec.num_classes
    chains = [_client_chain(tables) for _ in range(settings.clients)]
    states: list[dict[str, Any]] = [{} for _ in range(settings.clients)]
    global_model = copy.deepcopy(model)
    # A defense may change the architecture itself (DP-SGD's BatchNorm -> GroupNorm): train that model.
    probe = chains[0].configure(ClientStep(protocol, batch_size, k, context={"pool": pool, "model": global_model}))
    global_model = probe.context.get("model", global_model)
    lr = settings.server_lr if settings.server_lr is not None else protocol.local_lr
    for r in range(settings.rounds):
        updates = []
        for c, (chain, state) in enumerate(zip(chains, states)):
            generator = torch.Generator().manual_seed(stable_seed(seed, r, c, 0))
            step = chain.configure(ClientStep(protocol, batch_size, k,
                                              context={"pool": pool, "model": global_model, "client_state": state}))
            idx = step.sampler(pool.labels, step.batch_size, generator)
            x, y = pool.images[idx], pool.labels[idx]
            tensors = step.compute(copy.deepcopy(global_model), x, step.targets(y, k), step.protocol)
            kind: Literal["gradient", "delta"] = "gradient" if step.protocol.name == "fedsgd" else "delta"
            noise_gen = torch.Generator().manual_seed(stable_seed(seed, r, c, 1))
            updates.append(chain.transform(SharedUpdate(tuple(t.detach() for t in tensors), kind), noise_gen).tensors)
        mean = [torch.stack(ts).mean(0) for ts in zip(*updates)]
        with torch.no_grad():
            for p, u in zip(global_model.parameters(), mean):
                p.add_(u, alpha=-lr if protocol.name == "fedsgd" else 1.0)
    return global_model


def measure_utility(model: nn.Module, pool: ImageDataset, held_out: ImageDataset, protocol: ClientProtocol,
                    batch_size: int, tables: Sequence[Mapping[str, Any]], *, seed: int,
                    settings: UtilitySettings = UtilitySettings(),
                    baseline_accuracy: float | None = None) -> dict[str, Any]:
    """Held-out accuracy after training with `tables`' defenses, and the same without them.

    Pass `baseline_accuracy` (this function's `accuracy` for `tables = []`, same seed and settings) to skip
    retraining the undefended model for every defense."""
    if len(held_out) == 0:
        raise ConfigError("data.holdout: the held-out split is empty; set data.holdout > 0 to measure utility")
    start = time.perf_counter()
    if not tables and baseline_accuracy is not None:
        acc = baseline_accuracy  # no defense: the baseline itself
    else:
        trained = federated_training(model, pool, protocol, batch_size, tables, settings, seed)
        acc = accuracy(trained, held_out, settings.eval_limit)
    defended_s = time.perf_counter() - start
    if baseline_accuracy is None and tables:
        base = federated_training(model, pool, protocol, batch_size, [], settings, seed)
        baseline_accuracy = accuracy(base, held_out, settings.eval_limit)
    base_acc = acc if baseline_accuracy is None else baseline_accuracy
    return {"accuracy": acc, "baseline_accuracy": base_acc, "accuracy_drop": base_acc - acc,
            "initial_accuracy": accuracy(model, held_out, settings.eval_limit), "seed": seed,
            "train_s": defended_s, **{f"settings_{k}": v for k, v in asdict(settings).items()}}


def utility_for_spec(spec: Any, tables: Sequence[Mapping[str, Any]], seed: int,
                     settings: UtilitySettings = UtilitySettings(),
                     baseline_accuracy: float | None = None) -> dict[str, Any]:
    """`measure_utility` on the scenario and held-out split `giaudit.audit.build_scenario` builds for `seed`."""
    scenario, held = build_scenario(spec, seed)
    return measure_utility(scenario.model, scenario.pool, held, scenario.protocol, scenario.batch_size, tables,
                           seed=seed, settings=settings, baseline_accuracy=baseline_accuracy)
