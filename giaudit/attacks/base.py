"""Attack base class: the shared work done once.

`Attack.reconstruct` is the one way every attack runs, and no subclass may override it (a subclass that
tries fails when it is defined). It checks the threat model once, calls the `before_restarts` hook (e.g.
GIML meta-learns from the target when it was given no other observations), recovers labels (or uses the
oracle when granted), seeds K restarts from the caller's generator, runs them (`giaudit.attacks.restarts`:
serially, one single-threaded process per core, or by successive halving), keeps the restart with the
lowest final value of the attack's own objective, and times everything. A subclass implements
`run_restart`, or `descend` (a generator that yields after every iteration) when its restarts can be
paused.

Honesty: nothing here sees the ground truth. Restarts are ranked by the matching loss the attack itself
computes from the observation, and the attacker works on its own copy of the observation's model.

Attacks register with `@ATTACKS.register("name")`; their keyword-only constructor arguments are their config
options (validated by the registry while the config is parsed) and `params()` reports them. `display_name`
is the name reports print (default: the registered name). Explicit hooks replace special cases in the
orchestrator: `capabilities_used(obs)` (what this configuration actually used, for the report's threat
model), `prepare(others)` with `others_wanted()` (other clients' observations, e.g. GIML's meta-learning),
and `before_restarts(obs, budget)`.

Active attacks (a malicious server, SoK classes F-H) require a malicious server's capability (`active` in
the capability table). Those that require `Capability.MODIFIES_MODEL` (`modifies()`) implement
`modify`: the server step that turns the agreed global model into the one the server sends. `serve` is its
one entry point (it checks the threat model first); the scenario sends what it returns, the clients compute
their updates on it under every configured defense, and `reconstruct` then reads the observation as usual
(its model is the one the server sent). `modification(model)` describes the change for the record. One that
requires `Capability.SELECTS_CLIENTS` reads the round the scenario ran again without the audited client
(`Observation.without_client`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, final

import torch
from torch import Tensor, nn

from giaudit.attacks.labels import LABEL_METHODS, recover_labels
from giaudit.attacks.restarts import (
    Descent,
    Progress,
    RestartResult,
    drive,
    run_restarts,
    workers_for,
)
from giaudit.device import to_model
from giaudit.errors import ThreatModelError
from giaudit.fl import compute_update
from giaudit.registry import Configurable, Registry, check_choice, check_number
from giaudit.replay import replay_for
from giaudit.threat import check
from giaudit.types import (
    CAPABILITIES,
    Capability,
    ClientProtocol,
    DataSpec,
    Observation,
    Reconstruction,
    ThreatModel,
    Trace,
)

__all__ = ["ATTACKS", "Attack", "Budget", "Descent", "Plateau", "Progress", "RestartResult", "device_of", "drive"]


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How long an attack may run; these keys sit beside the attack's options in ``[attacks.<name>]``."""

    iterations: int = 1000
    restarts: int = 1
    # None: one process per core when restarts > 1, serial inside an engine worker (giaudit.attacks.restarts)
    workers: int | None = None
    patience: int | None = None     # stop after this many iterations without improvement
    min_delta: float = 1e-4         # relative improvement that counts as progress
    halving: int | None = None      # successive halving of restarts: iterations before the first cut

    def __post_init__(self) -> None:
        for key in ("iterations", "restarts", "workers", "halving"):
            check_number(key, getattr(self, key), low=1)
        check_number("patience", self.patience, low=0)
        check_number("min_delta", self.min_delta, low=0.0)


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


def device_of(obs: Observation) -> torch.device:
    """The device the observation's model lives on: every tensor an attack creates goes there."""
    p = next(obs.model.parameters(), None)
    return p.device if p is not None else obs.update.tensors[0].device


@dataclass(frozen=True)
class Dim:
    """One dimension of an attack's search space for tuning on surrogate clients: a float on a log scale
    ("log"), a float or an integer on a linear scale ("float", "int") between `low` and `high`, or one of
    `choices` ("choice")."""

    kind: Literal["log", "float", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()


# The label methods a tuned attack may choose among: every one but the oracle (true labels are not the
# server's to choose).
LABEL_DIM = Dim("choice", choices=tuple(m for m in LABEL_METHODS if m != "oracle"))


class Attack(Configurable):
    """Base of every attack. Subclasses register a name, set `requires` and implement `run_restart` (or
    `descend`); they never override `reconstruct`."""

    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    # The name reports print; `ATTACKS.register` gives a class that sets none its registered name.
    display_name: ClassVar[str] = ""
    # One representative image per user batch (DiffULA) rather than one image per sample: an audit that runs
    # such an attack scores every attack of the run at user level as well (metrics.evaluate, user_ keys).
    user_level: ClassVar[bool] = False
    # The options a server may tune on clients it simulates from its own data (`attacks.NAME.tune`); empty:
    # the attack has nothing to tune (analytic, or too costly to repeat per trial).
    search_space: ClassVar[Mapping[str, Dim]] = {}
    # Recovers in closed form from the update (Robbing the Fed's imprint): no iterations, the budget unused.
    analytic: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for final_method in ("reconstruct", "serve"):
            if final_method in vars(cls):
                raise TypeError(f"{cls.__qualname__} overrides Attack.{final_method}, which is final: put per-run "
                                "setup in before_restarts(obs, budget), the optimisation in run_restart or descend "
                                "and a malicious server's change of the model in modify")

    def __init__(self, *, labels: str = "auto", adaptive: bool = False) -> None:
        check_choice("labels", labels, LABEL_METHODS)
        self.label_method = labels
        # Defense-aware matching (GGL's adaptive attack): replay the deterministic
        # part of the disclosed defenses on the trial update before comparing.
        self.adaptive = adaptive

    # -- hooks ---------------------------------------------------------------------------------
    def run_restart(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator,
                    progress: Progress | None) -> RestartResult:
        """One restart from the start `generator` draws. Attacks with `descend` need not override this."""
        if not self.pausable():
            raise NotImplementedError(f"attack {self.name!r} implements neither run_restart nor descend")
        return drive(self.descend(obs, labels, budget, generator), progress)

    def descend(self, obs: Observation, labels: Tensor, budget: Budget, generator: torch.Generator) -> Descent:
        """The restart as a generator: yield the lowest matching loss so far after each iteration.

        Optional; attacks that implement it can be run with successive halving of their restarts.
        """
        raise NotImplementedError

    @classmethod
    def pausable(cls) -> bool:
        """True when the attack implements `descend` (its restarts can be paused and halved)."""
        return cls.descend is not Attack.descend

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

    def threat_record(self, obs: Observation, label_source: str,
                      also_used: Sequence[Capability] = ()) -> dict[str, Any]:
        """The threat model a reconstruction of `obs` actually used, as plain data: the capabilities granted,
        those used (`capabilities_used`, plus the true labels when they came from the oracle), the oracles
        among them and the SoK letter (the higher of the used capabilities' and the attack's own). `also_used`:
        what the run used besides the reconstruction (surrogate data for an attack tuned on the server's own
        clients)."""
        used = self.capabilities_used(obs) | set(also_used)
        if label_source == "oracle":
            used.add(Capability.TRUE_LABELS)
        return self._threat(obs.threat, used, self.modification(obs.model))

    def planned_threat(self, threat: ThreatModel, sent: nn.Module | None = None) -> dict[str, Any]:
        """`threat_record` of a run with no observation (its client refused `sent`, the model the server
        sent): what the attack requires, under the granted `threat`."""
        return self._threat(threat, set(self.requires), self.modification(sent) if sent is not None else {})

    def _threat(self, threat: ThreatModel, used: set[Capability], modification: dict[str, Any]) -> dict[str, Any]:
        used_model = ThreatModel(frozenset(used))
        record: dict[str, Any] = {"sok_class": max(used_model.sok_class, self.sok_class),
                                  "granted": sorted(c.value for c in threat.granted),
                                  "used": sorted(c.value for c in used), "oracles": list(used_model.oracles)}
        if self.active():
            record.update(active=True, modification=modification)
        return record

    @classmethod
    def active(cls) -> bool:
        """A malicious server's attack: it requires a capability the capability table marks as a malicious
        server's (it changes the global model, or chooses which clients take part)."""
        return any(CAPABILITIES[c].active for c in cls.requires)

    @classmethod
    def modifies(cls) -> bool:
        """The attack has a server step: it changes the global model before the clients compute (`modify`)."""
        return Capability.MODIFIES_MODEL in cls.requires

    def modify(self, model: nn.Module, data_spec: DataSpec, surrogate: Tensor | None,
               generator: torch.Generator) -> nn.Module:
        """The server step of an active attack: the global model to send instead of `model` (the attacker's
        own copy of the agreed one, free to change or wrap). `surrogate`: images the server holds (N,C,H,W,
        never the audited client's), given only when the threat model grants surrogate data."""
        raise NotImplementedError(f"attack {self.name!r} is passive: it does not modify the model")

    def modification(self, model: nn.Module) -> dict[str, Any]:
        """What the server changed to make `model` (the one it sent), as plain data for the record; {}: nothing
        found."""
        return {}

    @final
    def serve(self, model: nn.Module, data_spec: DataSpec, threat: ThreatModel, surrogate: Tensor | None,
              generator: torch.Generator) -> nn.Module:
        """The global model a malicious server sends in place of `model` (left as it was), in its train/eval
        mode, after checking that the threat model lets the server modify the model (and hold `surrogate`)."""
        if not self.modifies():
            raise ThreatModelError(f"attack {self.name!r} does not modify the model: its server sends the "
                                   "agreed model")
        check(self.name, self.requires, threat)
        data = surrogate if threat.has(Capability.SURROGATE_DATA) else None
        sent = self.modify(copy.deepcopy(model), data_spec, data, generator)
        return sent.train(model.training)

    def others_wanted(self) -> int:
        """How many other clients' observations `prepare` wants (0: none)."""
        return 0

    def prepare(self, others: Sequence[Observation]) -> None:
        """Learn from other clients' observations before attacking (GIML's meta-learning); default: nothing."""

    def before_restarts(self, obs: Observation, budget: Budget) -> None:
        """Per-target setup within `budget`, called by `reconstruct` once after the threat check and before
        labels, seeds and restarts, with the attacker's own copy of the observation (GIML meta-learns here).
        Not timed in `Trace.wall_s`; default: nothing."""

    def labels_for(self, obs: Observation, generator: torch.Generator) -> tuple[Tensor, str]:
        """The labels the attack uses and where they came from (attacks on unlabelled models override)."""
        return recover_labels(obs, self.label_method, generator, self.name)

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
        """Uniform in the data range, drawn on the CPU generator and moved to the observation's device and dtype."""
        lo, hi = obs.data_spec.value_range
        x = lo + (hi - lo) * torch.rand((n, *obs.data_spec.shape), generator=generator, device=generator.device)
        return to_model(x, obs.model)

    @final
    def reconstruct(self, obs: Observation, *, budget: Budget = Budget(), rng: torch.Generator | None = None,
                    progress: Progress | None = None) -> Reconstruction:
        """Reconstruct the client's batch from `obs` within `budget`; `rng` seeds the labels and the restarts
        (seed 0 when None). The observation, its model included, is left as it was."""
        check(self.name, self.requires, obs.threat)
        if budget.halving is not None and budget.restarts > 1 and not self.pausable():
            raise ThreatModelError(f"attacks.{self.name}.halving: {self.name} cannot pause its restarts, so "
                                   "they cannot be halved; remove the key or use an attack that can (e.g. ig)")
        # The attacker works on its own copy: BN layers in train mode move their
        # running statistics on every forward.
        obs_local = dataclasses.replace(obs, model=copy.deepcopy(obs.model))
        self.before_restarts(obs_local, budget)
        gen = rng if rng is not None else torch.Generator().manual_seed(0)
        start = time.perf_counter()
        labels, source = self.labels_for(obs, gen)
        seeds = [int(s) for s in torch.randint(0, 2**62, (budget.restarts,), generator=gen, device=gen.device)]
        outcome = run_restarts(
            seeds, partial(self.run_restart, obs_local, labels, budget),
            start=partial(self.descend, obs_local, labels, budget) if self.pausable() else None,
            workers=workers_for(budget.restarts, budget.workers, device_of(obs)),
            halving=budget.halving, progress=progress)
        r = outcome.result
        lo, hi = obs.data_spec.value_range
        trace = Trace(losses=tuple(r.losses), restart_losses=tuple(outcome.final_losses), best_restart=outcome.best,
                      iterations=len(r.losses), wall_s=time.perf_counter() - start,
                      stopped_early=r.stopped_early, extra={**outcome.log, **r.extra})
        return Reconstruction(r.images.detach().clamp(lo, hi), r.labels.detach(),
                              source if "label_source" not in r.extra else r.extra["label_source"], trace)


class AttackRegistry(Registry[Attack]):
    """The attack registry: registering also gives a class without its own `display_name` its registered name
    (a subclass never shows its parent's name)."""

    def register(self, name: str) -> Callable[[type[Attack]], type[Attack]]:
        register = super().register(name)

        def deco(cls: type[Attack]) -> type[Attack]:
            register(cls)
            if not vars(cls).get("display_name"):
                cls.display_name = name
            return cls

        return deco


ATTACKS: AttackRegistry = AttackRegistry("attack")
