"""The federated training the utility measurement and the leakage-over-training audit share.

FedSGD / FedAvg (McMahan et al. 2017) from the scenario's global model: each
round `clients` IID clients draw batches from the scenario's data pool and
compute their update exactly as the audited client does (the same
`ClientStep` hooks: sampler, targets, compute, then the defense's
transforms); the server averages the updates (FedSGD: a step of `server_lr`
along the mean gradient; FedAvg: the mean weight difference is added).

Every client draws from the whole pool, as the audited client does, so a
DP-SGD client's sampling rate is (its mini-batch) / (pool size), the rate its
accountant uses; the accounting here is per client (each simulated client's
own data is the pool). Each client has its own defense chain and state dict
(`ClientStep.context["client_state"]`): stateful defenses such as DGC error
feedback carry their residual across that client's rounds. Defenses that act
only on what the server sees (`aggregation_only`: secure aggregation) do not
change the averaged model and are left out.

`train` returns the held-out accuracy curve, the model's state at requested
rounds (the checkpoints an audit attacks) and, per defense, what its
accountant says the run spent (`Defense.spent(rounds)`: DP-SGD's epsilon for
exactly the rounds trained). Client c's batch in round r comes from a
generator seeded by (seed, r, c) and its transforms draw from another, so a
defended and an undefended run see the same data wherever the defense leaves
the sampler alone (a paired comparison).
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from giaudit.data import ImageDataset
from giaudit.defenses import Chain, ClientStep, build_chain
from giaudit.defenses.base import default_compute
from giaudit.device import to_model
from giaudit.errors import ConfigError
from giaudit.fl import classification_loss
from giaudit.types import ClientProtocol, SharedUpdate


def stable_seed(*parts: Any) -> int:
    """A stable 62-bit seed from parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """How the federated training runs. `target_accuracy` stops the no-defense baseline; the defended runs
    then train exactly as many rounds (same length, paired)."""

    clients: int = 8                        # clients per round
    max_rounds: int = 3000                  # round budget
    target_accuracy: float | None = 0.95    # stop the baseline at the first evaluation reaching it
    eval_every: int = 50                    # rounds between held-out evaluations
    server_lr: float | None = None          # FedSGD server step; None: the protocol's local_lr
    eval_limit: int | None = None           # held-out images used for the accuracy (None: all)
    batch_size: int | None = None           # each training client's batch (None: the scenario's)

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError("utility.clients: must be >= 1")
        if self.max_rounds < 1:
            raise ConfigError("utility.max_rounds: must be >= 1")
        if self.eval_every < 1:
            raise ConfigError("utility.eval_every: must be >= 1")
        if self.server_lr is not None and self.server_lr <= 0:
            raise ConfigError("utility.server_lr: must be > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("utility.batch_size: must be >= 1")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError("utility.target_accuracy: must be in (0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingRun:
    model: nn.Module                         # the global model after `rounds` rounds
    rounds: int
    curve: list[tuple[int, float]]           # (round, held-out accuracy), round 0 included
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # round -> state_dict (requested rounds)
    spent: dict[str, Any] = field(default_factory=dict)  # what the defenses' accountants say the run spent
    train_s: float = 0.0

    def accuracy_at(self, round_: int) -> float | None:
        return next((a for r, a in self.curve if r == round_), None)


def client_chain(tables: Sequence[Mapping[str, Any]]) -> Chain:
    chain = build_chain([dict(t) for t in tables], where="defenses")
    return Chain([d for d in chain.defenses if not getattr(d, "aggregation_only", False)])


def _has_buffers(model: nn.Module) -> bool:
    return any(True for _ in model.buffers())


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageDataset, limit: int | None = None, batch: int = 500) -> float:
    n = len(data) if limit is None else min(limit, len(data))
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, n, batch):
        x, y = to_model(data.images[i:min(i + batch, n)], model), to_model(data.labels[i:min(i + batch, n)], model)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / max(n, 1)


def train(model: nn.Module, pool: ImageDataset, held_out: ImageDataset, protocol: ClientProtocol, batch_size: int,
          tables: Sequence[Mapping[str, Any]], settings: TrainingSettings, seed: int, *, rounds: int,
          keep: Sequence[int] = (), stop_at: float | None = None) -> TrainingRun:
    """Train a copy of `model` for `rounds` rounds (or until held-out accuracy >= `stop_at`, checked every
    `settings.eval_every` rounds) with `tables`' defenses on every client.

    `keep`: rounds whose global model state is returned (0 = the starting model); each is also evaluated.
    """
    start = time.perf_counter()
    batch_size = settings.batch_size or batch_size
    k = pool.spec.num_classes
    chains = [client_chain(tables) for _ in range(settings.clients)]
    global_model = copy.deepcopy(model)
    steps = []
    for chain in chains:
        step = chain.configure(ClientStep(protocol, batch_size, k,
                                          context={"pool": pool, "model": global_model, "client_state": {}}))
        steps.append(step)
    # A defense may change the architecture itself (DP-SGD's BatchNorm -> GroupNorm): train that model.
    global_model = steps[0].context.get("model", global_model)
    lr = settings.server_lr if settings.server_lr is not None else protocol.local_lr
    keep_set = {int(r) for r in keep}
    states: dict[int, dict[str, Tensor]] = {}
    curve: list[tuple[int, float]] = []

    def snapshot(r: int) -> bool:
        """Evaluate (and keep) at round r; True when the stop level is reached."""
        if r in keep_set:
            # On the CPU: checkpoints go back to the driver and into cells on any device.
            states[r] = {n: t.detach().cpu().clone() for n, t in global_model.state_dict().items()}
        if r in keep_set or r % settings.eval_every == 0 or r == rounds:
            acc = accuracy(global_model, held_out, settings.eval_limit)
            curve.append((r, acc))
            return stop_at is not None and acc >= stop_at
        return False

    # FedSGD clients with the plain update function and equal batches: one vmapped gradient for all of them
    # (the same per-client gradient of the mean loss, without 8 Python round trips per round).
    batched = (all(s.compute is default_compute and s.protocol.name == "fedsgd" for s in steps)
               and len({s.batch_size for s in steps}) == 1 and not _has_buffers(global_model))
    names = [n for n, _ in global_model.named_parameters()]

    def loss_of(params: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return classification_loss(functional_call(global_model, dict(zip(names, params)), (x,)), y)

    per_client = vmap(grad(loss_of), in_dims=(None, 0, 0))
    done = 0
    if not snapshot(0):
        for r in range(1, rounds + 1):
            batches = []
            for c, step in enumerate(steps):
                generator = torch.Generator(device="cpu").manual_seed(stable_seed(seed, r - 1, c, 0))
                idx = step.sampler(pool.labels, step.batch_size, generator)
                batches.append((to_model(pool.images[idx], global_model),
                                to_model(step.targets(pool.labels[idx], k), global_model)))
            if batched:
                params = tuple(p.detach() for p in global_model.parameters())
                grads = per_client(params, torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
                computed = [tuple(g[c] for g in grads) for c in range(len(steps))]
            else:
                computed = [step.compute(copy.deepcopy(global_model), x, y, step.protocol)
                            for step, (x, y) in zip(steps, batches)]
            updates = []
            for c, (chain, tensors) in enumerate(zip(chains, computed)):
                kind: Literal["gradient", "delta"] = "gradient" if steps[c].protocol.name == "fedsgd" else "delta"
                noise_gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, r - 1, c, 1))
                updates.append(chain.transform(SharedUpdate(tuple(t.detach() for t in tensors), kind),
                                               noise_gen).tensors)
            mean = [torch.stack(ts).mean(0) for ts in zip(*updates)]
            with torch.no_grad():
                for p, u in zip(global_model.parameters(), mean):
                    p.add_(u, alpha=-lr if protocol.name == "fedsgd" else 1.0)
            done = r
            if snapshot(r):
                break
    spent: dict[str, Any] = {}
    for i, d in enumerate(chains[0].defenses):
        info = dict(d.spent(done))
        if info:
            spent[f"{i}:{d.name}"] = info
    return TrainingRun(global_model, done, curve, states, spent, time.perf_counter() - start)
