"""How the K restarts of one attack run: serially, one single-threaded process per core, or halved.

A restart is a function of its seed alone (`RunOne`: the attack's `run_restart`, or `StartOne`: its
`descend`, a generator that yields after every iteration); this module decides where the restarts run and
in which order, never what they compute. Each restart draws from its own `torch.Generator` seeded with its
seed and runs single-threaded wherever it runs, so the arithmetic of a restart does not depend on how many
run beside it: parallel equals serial, same seeds, same results.

Where they run (`workers_for`):

- In parallel, one forked single-threaded process per core (at most one per restart): on a 2-core CPU that
  gives 1.25x more restart-iterations per second than two threads in one process (batching restarts into
  one graph gave nothing).
- Serially in the calling process when there is one restart, one worker, the observation lives on an
  accelerator (forking a process that holds a CUDA context is unsafe, and one device is shared anyway), or
  the caller is itself an engine worker (`giaudit.engine.in_worker()`): the engine already runs one
  single-threaded cell per core, and a process per core per cell would oversubscribe the machine N-fold.
  An explicit `Budget.workers` is honoured inside an engine worker too (capped by the cores).

Successive halving (`halving = h`, for restarts that can pause): all K restarts run h iterations, the better
half by the attack's own matching loss goes on to 2h, the better half of those to 4h, and so on until one is
left, which runs to the end of its schedule. K restarts then cost about K*h*(1 + log2(K)/2) + one full run
instead of K full runs; the restart with the lowest loss at a cut is never the one discarded. With several
workers each restart lives in its own forked process and the driver advances at most `workers` of them at a
time.

Honesty: nothing here sees the ground truth; restarts are ranked by the loss the attack reports.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import pickle
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

import torch
from torch import Tensor

from giaudit.engine import cores, in_worker

Progress = Callable[[int], None]  # called with the number of iterations just completed


@dataclass
class RestartResult:
    """One restart's outcome: its images and labels, its matching loss per iteration and the value it is ranked by."""

    images: Tensor
    labels: Tensor
    losses: list[float]
    final_loss: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# A pausable restart: yields the lowest matching loss so far after every iteration, returns its result.
Descent = Generator[float, None, RestartResult]
RunOne = Callable[[torch.Generator, Progress | None], RestartResult]  # one restart, to its end
StartOne = Callable[[torch.Generator], Descent]                       # one restart, pausable

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


def generator_for(seed: int) -> torch.Generator:
    """The CPU generator a restart draws from (CPU on every device: the same seed gives the same start)."""
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Outcome:
    """The restart kept (lowest final loss, NaN last), every restart's final loss, and how they ran."""

    best: int
    result: RestartResult
    final_losses: list[float]
    log: dict[str, Any]


def workers_for(restarts: int, wanted: int | None, device: torch.device) -> int:
    """How many restart processes to run at once (see the module docstring for the rule)."""
    if restarts <= 1 or device.type != "cpu":
        return 1
    available = cores()
    if wanted is None:
        wanted = 1 if in_worker() else available
    return max(1, min(wanted, restarts, available))


def run_restarts(seeds: Sequence[int], run: RunOne, *, workers: int, progress: Progress | None,
                 start: StartOne | None = None, halving: int | None = None) -> Outcome:
    """Run one restart per seed and keep the one with the lowest final loss.

    With `halving` (needs `start`, and more than one seed) the restarts are halved; otherwise every one runs
    its whole schedule, in `workers` processes when that is more than one.
    """
    seeds = list(seeds)
    if halving is not None and len(seeds) > 1:
        if start is None:
            raise ValueError("successive halving needs restarts that can pause (a `start` function)")
        return _halve(start, seeds, workers, halving, progress)
    if workers > 1:
        results = _parallel(run, seeds, workers, progress)
    else:
        results = [run(generator_for(s), progress) for s in seeds]
    finals = [r.final_loss for r in results]
    best = min(range(len(results)), key=lambda i: (math.isnan(finals[i]), finals[i]))
    return Outcome(best, results[best], finals, {"workers": workers})


# -- processes ---------------------------------------------------------------------------------------
# Set before forking so the children inherit the restart function without pickling it (it holds the attack,
# the observation and the model); reset as soon as the children exist.
_JOB: RunOne | StartOne | None = None


def _job() -> Any:
    if _JOB is None:
        raise RuntimeError("a restart process started without its job (restarts need the 'fork' start method)")
    return _JOB


def _run_in_worker(args: tuple[int, int]) -> tuple[int, RestartResult]:
    index, seed = args
    torch.set_num_threads(1)
    return index, _job()(generator_for(seed), None)


def _parallel(run: RunOne, seeds: list[int], workers: int, progress: Progress | None) -> list[RestartResult]:
    global _JOB
    _JOB = run
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


def _descent_worker(conn: Connection, seed: int) -> None:
    """One restart in its own process: advance on request, report the best loss, send the result at the end."""
    torch.set_num_threads(1)
    steps = _Steps(_job()(generator_for(seed)))
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


def _halve(start: StartOne, seeds: list[int], workers: int, first_cut: int,
           progress: Progress | None) -> Outcome:
    """Successive halving (see the module docstring)."""
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
        _JOB = start
        try:
            ctx = mp.get_context("fork")
            for i, s in enumerate(seeds):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_descent_worker, args=(child, s), daemon=True)
                proc.start()
                child.close()
                conns[i], procs = parent, procs + [proc]
        finally:
            _JOB = None
    else:
        local = {i: _Steps(start(generator_for(s))) for i, s in enumerate(seeds)}

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
        target = first_cut
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
    log = {"workers": workers, "halving": {"first_cut": first_cut, "cuts": cuts,
                                           "restart_iterations": counts, "total_iterations": sum(counts)}}
    return Outcome(winner, result, losses, log)
