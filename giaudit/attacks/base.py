"""Attack base class: the shared work done once.

The base checks the threat model when the attack runs, recovers labels (or
uses the oracle when granted), seeds and runs K restarts, in parallel where
that pays (one single-threaded process per core: 1.25x more
restart-iterations per second than two threads in one process on the 2-core
CPU of ../shared/spec/performance.md; batching restarts into one graph gave
nothing), keeps the restart with the lowest final value of the attack's own
objective, and times everything. A subclass implements `run_restart`, or
`descend` (a generator that yields after every iteration) when its restarts
can be paused.

Successive halving (`Budget.halving = h`, for attacks with `descend`): all K
restarts run h iterations, the better half by the attack's own matching loss
goes on to 2h, the better half of those to 4h, and so on until one is left,
which runs to the end of its schedule. K restarts then cost about
K*h*(1 + log2(K)/2) + one full run instead of K full runs; the restart with
the lowest loss at a cut is never the one discarded. Each restart lives in its
own forked, single-threaded process and the driver advances at most `workers`
of them at a time, so the arithmetic of a restart does not depend on how many
run beside it (parallel equals serial).

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
import pickle
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar, TypeVar

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
# A pausable restart: yields the lowest matching loss so far after every iteration, returns its result.
Descent = Generator[float, None, "RestartResult"]


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How long an attack may run; these keys sit beside the attack's options in ``[attacks.<name>]``."""

    iterations: int = 1000
    restarts: int = 1
    workers: int | None = None      # None: one process per core when restarts > 1
    patience: int | None = None     # stop after this many iterations without improvement
    min_delta: float = 1e-4         # relative improvement that counts as progress
    halving: int | None = None      # successive halving of restarts: iterations before the first cut

    def __post_init__(self) -> None:
        for key in ("iterations", "restarts", "workers", "halving"):
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


def _descent_worker(conn: Connection, seed: int) -> None:
    """One restart in its own process: advance on request, report the best loss, send the result at the end."""
    torch.set_num_threads(1)
    attack, obs, labels, budget = _JOB  # type: ignore[misc]
    steps = _Steps(attack.descend(obs, labels, budget, torch.Generator().manual_seed(seed)))
    while True:
        command, n = conn.recv()
        if command == "advance":
            try:
                conn.send(("ok", steps.advance(n)))
            except Exception as exc:  # the driver raises it (a bad config must not surface as a broken pipe)
                conn.send(("error", exc))
                return
        elif command == "result":
            # Plain pickle (tensors by value): torch's reducers would pass file descriptors that die with us.
            conn.send_bytes(pickle.dumps(steps.result))
            return
        else:
            return


T = TypeVar("T")


def drive(steps: Generator[float, None, T], progress: Progress | None) -> T:
    """Run a step generator (a `Descent`, or one phase of it) to its end, reporting each step to `progress`."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(1)


class _Steps:
    """Drives a `Descent`: advance n iterations at a time, remember the best loss and the final result."""

    def __init__(self, gen: Descent) -> None:
        self.gen, self.best, self.count = gen, math.inf, 0
        self.result: RestartResult | None = None

    def advance(self, n: int, progress: Progress | None = None) -> tuple[float, int, bool]:
        """Run up to `n` more iterations; returns (best loss, iterations so far, finished)."""
        for _ in range(n):
            if self.result is not None:
                break
            try:
                self.best = next(self.gen)
                self.count += 1
                if progress is not None:
                    progress(1)
            except StopIteration as stop:
                self.result = stop.value
        return self.best, self.count, self.result is not None

    def finish(self, progress: Progress | None = None) -> RestartResult:
        while self.result is None:
            self.advance(1 << 30, progress)
        return self.result

    def close(self) -> None:
        self.gen.close()


class Attack(Configurable):
    """Base of every attack. Subclasses register a name, set `requires` and implement `run_restart`."""

    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.BATCH_SIZE})
    sok_class: ClassVar[str] = "B"
    # One representative image per user batch (DiffULA) rather than one image per sample: an audit that runs
    # such an attack scores every attack of the run at user level as well (metrics.evaluate, user_ keys).
    user_level: ClassVar[bool] = False

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
        halving: dict[str, Any] = {}
        if budget.halving is not None and budget.restarts > 1:
            if not self.pausable():
                raise ThreatModelError(f"attack {self.name!r} cannot halve its restarts (budget key 'halving'): "
                                       "remove the key or use an attack that supports it (e.g. ig)")
            best, r, finals, halving = self._halve(obs_local, labels, budget, seeds, workers, progress)
        else:
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
                      stopped_early=r.stopped_early, extra={"workers": workers, **halving, **r.extra})
        return Reconstruction(r.images.detach().clamp(lo, hi), r.labels.detach(),
                              source if "label_source" not in r.extra else r.extra["label_source"], trace)

    def _workers(self, budget: Budget) -> int:
        if budget.restarts <= 1:
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        wanted = budget.workers if budget.workers is not None else cores
        return max(1, min(wanted, budget.restarts, cores))

    def _halve(self, obs: Observation, labels: Tensor, budget: Budget, seeds: list[int], workers: int,
               progress: Progress | None) -> tuple[int, RestartResult, list[float], dict[str, Any]]:
        """Successive halving (see the module docstring). Returns (winner, its result, each restart's loss, log)."""
        global _JOB
        k = len(seeds)
        losses = [math.inf] * k
        counts = [0] * k
        alive = list(range(k))
        cuts: list[dict[str, Any]] = []
        conns: dict[int, Connection] = {}
        procs: list[Any] = []
        local: dict[int, _Steps] = {}
        if workers > 1:
            _JOB = (self, obs, labels, budget)
            ctx = mp.get_context("fork")
            for i, s in enumerate(seeds):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_descent_worker, args=(child, s), daemon=True)
                proc.start()
                child.close()
                conns[i], procs = parent, procs + [proc]
            _JOB = None
        else:
            local = {i: _Steps(self.descend(obs, labels, budget, torch.Generator().manual_seed(s)))
                     for i, s in enumerate(seeds)}

        def advance(indices: list[int], target: int) -> None:
            """Bring each of `indices` to `target` iterations (or its end), at most `workers` at a time."""
            if not conns:
                for i in indices:
                    losses[i], counts[i], _ = local[i].advance(target - counts[i], progress)
                return
            queue = list(indices)
            running: dict[int, Connection] = {}
            by_conn = {id(c): i for i, c in conns.items()}
            while queue or running:
                while queue and len(running) < workers:
                    i = queue.pop(0)
                    conns[i].send(("advance", target - counts[i]))
                    running[i] = conns[i]
                for ready in wait(list(running.values())):
                    i = by_conn[id(ready)]
                    before = counts[i]
                    status, payload = running.pop(i).recv()
                    if status == "error":
                        raise payload
                    losses[i], counts[i], _ = payload
                    if progress is not None:
                        progress(counts[i] - before)

        try:
            target = budget.halving or 1
            while len(alive) > 1:
                advance(alive, target)
                # Rank by the attack's own loss; NaN last; ties by index, so the order is deterministic.
                ranked = sorted(alive, key=lambda i: (math.isnan(losses[i]), losses[i], i))
                keep = ranked[:max(1, len(ranked) // 2)]
                cuts.append({"at": target, "kept": sorted(keep), "losses": {i: losses[i] for i in alive}})
                for i in alive:
                    if i in keep:
                        continue
                    if conns:
                        conns[i].send(("stop", 0))
                    else:
                        local[i].close()
                alive = sorted(keep)
                target *= 2
            (winner,) = alive
            if conns:
                advance([winner], 1 << 30)
                conns[winner].send(("result", 0))
                result = pickle.loads(conns[winner].recv_bytes())
            else:
                result = local[winner].finish(progress)
                counts[winner] = local[winner].count
        finally:
            for c in conns.values():
                c.close()
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
        losses[winner] = result.final_loss
        log = {"halving": {"first_cut": budget.halving, "cuts": cuts,
                           "restart_iterations": counts, "total_iterations": sum(counts)}}
        return winner, result, losses, log

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
