"""Attack base class: the shared work done once.

The base checks the threat model when the attack runs, recovers labels (or
uses the oracle when granted), seeds and runs K restarts, in parallel where
that pays (one single-threaded process per core: 1.25x more
restart-iterations per second than two threads in one process on the 2-core
CPU of ../shared/spec/performance.md; batching restarts into one graph gave
nothing), keeps the restart with the lowest final value of the attack's own
objective, and times everything. A subclass implements `run_restart` only.

Honesty: nothing here sees the ground truth. Restarts are ranked by the
matching loss the attack itself computes from the observation.

Attacks register with `@ATTACKS.register("name")`; their keyword-only
constructor arguments are their config options (validated by the registry
while the config is parsed) and `params()` reports them. Two explicit hooks
replace special cases in the orchestrator: `capabilities_used(obs)` (what
this configuration actually used, for the report's threat model) and
`prepare(others)` with `others_wanted()` (other clients' observations, e.g.
GIML's meta-learning).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from giaudit.attacks.labels import LABEL_METHODS, recover_labels
from giaudit.errors import ThreatModelError
from giaudit.fl import compute_update
from giaudit.registry import Configurable, Registry, check_choice, check_number
from giaudit.replay import replay_for
from giaudit.threat import check
from giaudit.types import Capability, ClientProtocol, Observation, Reconstruction, Trace

Progress = Callable[[int], None]  # called with the number of iterations just completed


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How long an attack may run; these keys sit beside the attack's options in ``[attacks.<name>]``."""

    iterations: int = 1000
    restarts: int = 1
    workers: int | None = None      # None: one process per core when restarts > 1
    patience: int | None = None     # stop after this many iterations without improvement
    min_delta: float = 1e-4         # relative improvement that counts as progress

    def __post_init__(self) -> None:
        for key in ("iterations", "restarts", "workers"):
            check_number(key, getattr(self, key), low=1)
        check_number("patience", self.patience, low=0)
        check_number("min_delta", self.min_delta, low=0.0)


@dataclass
class RestartResult:
    images: Tensor
    labels: Tensor
    losses: list[float]
    final_loss: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Plateau:
    """Tracks the best loss and says when `patience` iterations brought no relative gain."""

    def __init__(self, patience: int | None, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.since = 0

    def update(self, loss: float) -> bool:
        """Record `loss`; True when it is a new best."""
        if loss < self.best * (1 - self.min_delta) or self.best == math.inf:
            self.best, self.since = loss, 0
            return True
        self.best = min(self.best, loss)
        self.since += 1
        return False

    @property
    def stalled(self) -> bool:
        return self.patience is not None and self.since >= self.patience


_JOB: tuple[Any, ...] | None = None  # set before forking so workers inherit it without pickling


def _run_in_worker(args: tuple[int, int]) -> tuple[int, RestartResult]:
    index, seed = args
    torch.set_num_threads(1)
    attack, obs, labels, budget = _JOB  # type: ignore[misc]
    gen = torch.Generator().manual_seed(seed)
    return index, attack.run_restart(obs, labels, budget, gen, None)


class Attack(Configurable):
    """Base of every attack. Subclasses register a name, set `requires` and implement `run_restart`."""

    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"

    def __init__(self, *, labels: str = "auto", adaptive: bool = False) -> None:
        check_choice("labels", labels, LABEL_METHODS)
        self.label_method = labels
        # Defense-aware matching (GGL's adaptive attack): replay the deterministic
        # part of the disclosed defenses on the trial update before comparing.
        self.adaptive = adaptive

    # -- hooks ---------------------------------------------------------------------------------
    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """What `params()` adds beyond the constructor arguments (e.g. a prior's training data)."""
        return {}

    def params(self) -> dict[str, Any]:
        """Hyperparameters for the results and the report: the constructor's arguments, plus provenance."""
        return {**super().params(), **self.provenance()}

    def capabilities_used(self, obs: Observation) -> set[Capability]:
        """The capabilities this configuration uses on `obs` (the report's threat model; labels aside)."""
        used = set(self.requires)
        if obs.update.kind == "delta":
            used.add(Capability.TRAINING_DETAILS)  # unrolling local steps needs lr, steps, mini-batches
        return used

    def others_wanted(self) -> int:
        """How many other clients' observations `prepare` wants (0: none)."""
        return 0

    def prepare(self, others: Sequence[Observation]) -> None:
        """Learn from other clients' observations before attacking (GIML's meta-learning); default: nothing."""

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        """The labels the attack uses and where they came from (attacks on unlabelled models override)."""
        return recover_labels(obs, self.label_method, generator)

    # -- shared work ---------------------------------------------------------------------------
    def protocol_for(self, obs: Observation) -> ClientProtocol:
        """The client step the attacker mirrors: FedSGD unless it knows the training details."""
        if obs.update.kind == "delta":
            if obs.protocol is None:
                raise ThreatModelError(f"attack {self.name!r} on a FedAvg update needs the client's training "
                                       "details: set threat.training_details = true")
            return obs.protocol
        return obs.protocol or ClientProtocol()

    def trial_update(self, obs: Observation, model: torch.nn.Module, x: Tensor, labels: Tensor,
                     *, create_graph: bool = True) -> tuple[Tensor, ...]:
        trial = compute_update(model, x, labels, self.protocol_for(obs), create_graph=create_graph)
        if self.adaptive:
            # Built once per observation (masks, bounds), then reused every iteration.
            trial = replay_for(obs)(trial)
        return trial

    def initial_images(self, obs: Observation, n: int, generator: torch.Generator) -> Tensor:
        lo, hi = obs.data_spec.value_range
        return lo + (hi - lo) * torch.rand((n, *obs.data_spec.shape), generator=generator)

    def reconstruct(self, obs: Observation, *, budget: Budget = Budget(), rng: torch.Generator | None = None,
                    progress: Progress | None = None) -> Reconstruction:
        check(self.name, self.requires, obs.threat)
        gen = rng if rng is not None else torch.Generator().manual_seed(0)
        start = time.perf_counter()
        labels, source = self.labels_for(obs, gen)
        # The attacker works on its own copy: BN layers in train mode move their
        # running statistics on every forward.
        obs_local = dataclasses.replace(obs, model=copy.deepcopy(obs.model))
        seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=gen)]
        workers = self._workers(budget)
        if workers > 1:
            results = self._parallel(obs_local, labels, budget, seeds, workers, progress)
        else:
            results = [self.run_restart(obs_local, labels, budget, torch.Generator().manual_seed(s), progress)
                       for s in seeds]
        finals = [r.final_loss for r in results]
        best = min(range(len(results)), key=lambda i: (math.isnan(finals[i]), finals[i]))
        r = results[best]
        lo, hi = obs.data_spec.value_range
        trace = Trace(losses=tuple(r.losses), restart_losses=tuple(finals), best_restart=best,
                      iterations=len(r.losses), wall_s=time.perf_counter() - start,
                      stopped_early=r.stopped_early, extra={"workers": workers, **r.extra})
        return Reconstruction(r.images.detach().clamp(lo, hi), r.labels.detach(),
                              source if "label_source" not in r.extra else r.extra["label_source"], trace)

    def _workers(self, budget: Budget) -> int:
        if budget.restarts <= 1:
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        wanted = budget.workers if budget.workers is not None else cores
        return max(1, min(wanted, budget.restarts, cores))

    def _parallel(self, obs: Observation, labels: Tensor, budget: Budget, seeds: list[int], workers: int,
                  progress: Progress | None) -> list[RestartResult]:
        global _JOB
        _JOB = (self, obs, labels, budget)
        try:
            ctx = mp.get_context("fork")
            out: dict[int, RestartResult] = {}
            with ctx.Pool(workers) as pool:
                for i, res in pool.imap_unordered(_run_in_worker, list(enumerate(seeds))):
                    out[i] = res
                    if progress is not None:
                        progress(len(res.losses))
        finally:
            _JOB = None
        return [out[i] for i in range(len(seeds))]


ATTACKS: Registry[Attack] = Registry("attack")
