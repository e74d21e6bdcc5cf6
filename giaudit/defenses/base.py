"""The defense protocol: two hooks, how the update is computed and what is sent.

`configure(step)` may change how the client computes its update (DP-SGD, the
batch size, how the batch is drawn, the targets); `transform(update, rng)`
changes what is sent (noise, sparsification). `disclose(update)` names what a
server could know about the defense from the protocol (the clipping bound,
the sparsity, epsilon): it sees the update, never the private batch. A
defense a server could replay on a trial update (clipping, top-k, DP-SGD's
per-sample clip at batch 1) also returns its own `replay_rule()`; the chain
hands both to the server as one `Disclosure` per defense, under its place in
the chain, so two defenses of the same kind never overwrite each other.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from giaudit.errors import ConfigError
from giaudit.fl import compute_update
from giaudit.types import NO_DEFENSE, ClientProtocol, Disclosure, ReplayRule, SharedUpdate

Sampler = Callable[[Tensor, int, torch.Generator], Tensor]
Compute = Callable[[nn.Module, Tensor, Tensor, ClientProtocol], tuple[Tensor, ...]]


def uniform_sampler(labels: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """Draw `batch_size` distinct indices uniformly from the pool."""
    return torch.randperm(labels.numel(), generator=generator, device=generator.device)[:batch_size]


def one_label_sampler(labels: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """`batch_size` distinct images sharing one label, drawn uniformly among the labels that have that many:
    one user's batch when labels are people (ORL subfolders), the user-level setting of DiffULA (Li et al. 2023)."""
    counts = torch.bincount(labels)
    eligible = (counts >= batch_size).nonzero().flatten()
    if eligible.numel() == 0:
        raise ConfigError(f"scenario.client_data = 'one_label': no label has {batch_size} images in the pool "
                          f"(at most {int(counts.max())}); lower scenario.batch_size")
    label = eligible[torch.randint(0, eligible.numel(), (1,), generator=generator, device=generator.device)]
    idx = (labels == label).nonzero().flatten()
    return idx[torch.randperm(idx.numel(), generator=generator, device=generator.device)[:batch_size]]


# scenario.client_data: how a client's private batch is drawn from its pool.
SAMPLERS: dict[str, Sampler] = {"iid": uniform_sampler, "one_label": one_label_sampler}


def default_compute(model: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol) -> tuple[Tensor, ...]:
    return compute_update(model, x, y, protocol)


@dataclass(frozen=True)
class ClientStep:
    """How the audited client turns its private data into an update."""

    protocol: ClientProtocol
    batch_size: int
    num_classes: int
    sampler: Sampler = uniform_sampler
    compute: Compute = default_compute
    # Targets fed to the loss: the labels by default; label disguise may mix or smooth them.
    targets: Callable[[Tensor, int], Tensor] = lambda y, k: y
    context: Mapping[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> ClientStep:
        return replace(self, **changes)


class Defense:
    """Base class: both hooks default to doing nothing."""

    name: str = "defense"
    # "compute": the replayed operation happens inside the client's step (DP-SGD), before any transform.
    replay_stage: ClassVar[Literal["compute", "transform"]] = "transform"

    def configure(self, step: ClientStep) -> ClientStep:
        return step

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        return update

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {}

    def replay_rule(self) -> ReplayRule | None:
        """How a server that knows this defense replays it on a trial update; None: it cannot."""
        return None

    def spent(self, rounds: int) -> Mapping[str, Any]:
        """What a client running this defense for `rounds` rounds has spent (DP-SGD: its epsilon); {}: nothing."""
        return {}

    def describe(self) -> str:
        return self.name


class Chain:
    """Defenses applied in order: configure hooks first to last, then transforms first to last."""

    def __init__(self, defenses: Sequence[Defense]) -> None:
        self.defenses = tuple(defenses)
        self.name = "+".join(d.name for d in self.defenses) or NO_DEFENSE

    def configure(self, step: ClientStep) -> ClientStep:
        for d in self.defenses:
            step = d.configure(step)
        return step

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        for d in self.defenses:
            update = d.transform(update, rng)
        return update

    def disclosures(self, update: SharedUpdate) -> tuple[Disclosure, ...]:
        """What the server knows of each defense, under its own position, given the update it received."""
        return tuple(Disclosure(i, d.name, dict(d.disclose(update)), d.replay_rule(), d.replay_stage)
                     for i, d in enumerate(self.defenses))

    def describe(self) -> str:
        return " -> ".join(d.describe() for d in self.defenses) or NO_DEFENSE

    @property
    def is_identity(self) -> bool:
        """No defense: the update is sent as computed."""
        return not self.defenses
