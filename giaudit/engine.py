"""Engines: where the independent tasks of a sweep run.

A sweep is a list of idempotent tasks (one per (scenario, defense, attack,
seed[, checkpoint round]) cell, plus the utility trainings and the
federated trainings that checkpoints come from): each task is a picklable top-level
function applied to a picklable argument, derives all its randomness from its
own seeds and returns its result to the driver. Only the driver writes files,
so the records on disk are the same whatever the engine, and a cell finished
by a worker is never half-written by two processes.

- ``local`` (default): one single-threaded worker process per core (forked,
  so the loaded modules and datasets are shared copy-on-write); one process
  per core beats two threads in one process on this kind of CPU. With one
  worker or one task it runs in the driver, also single-threaded.
  A worker that dies (killed, out of memory) breaks the pool: the unfinished
  tasks are submitted again to a fresh pool, up to ``max_retries`` times.
- ``ray``: every task is a Ray task (``num_cpus=1``, and ``num_gpus`` =
  `RayEngine.num_gpus` when the audit runs on CUDA, a fraction allowed;
  retried up to ``max_retries`` times when its worker dies). Without an address it starts a
  local Ray instance (loopback only, no dashboard) and shuts it down at the
  end; with ``address="auto"`` or ``"HOST:PORT"`` it joins an existing
  cluster, whose nodes must have giaudit (and the same data) installed.

`Engine.map` yields ``(index, result)`` as tasks finish, so the driver can
write each result at once (resume after an interrupted sweep).

Test hook: when the environment variable ``GIAUDIT_ENGINE_KILL_ONCE`` names a
folder, the first task to start creates ``killed`` there and kills its own
worker process (``os._exit``), once; the retry proofs use it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from giaudit.errors import GiauditError, ParamError

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "ray")
KILL_ONCE_ENV = "GIAUDIT_ENGINE_KILL_ONCE"


class EngineError(GiauditError):
    """An engine could not run (Ray missing, cluster unreachable, a task failed after its retries)."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_IN_WORKER = False


def in_worker() -> bool:
    """True inside an engine's worker (where per-iteration progress bars would only garble the output)."""
    return _IN_WORKER


class Engine(Protocol):
    name: str

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, desc: str = "cells",
            show_progress: bool = True) -> Iterator[tuple[int, R]]: ...


def _maybe_die() -> None:
    folder = os.environ.get(KILL_ONCE_ENV)
    if not folder:
        return
    try:
        fd = os.open(os.path.join(folder, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(17)  # the worker dies as if killed: no exception, no cleanup


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    """Run one task single-threaded (what every engine's workers do)."""
    global _IN_WORKER
    _maybe_die()
    _IN_WORKER = True
    torch.set_num_threads(1)
    return fn(arg)


def _bar(desc: str, total: int, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=False, file=sys.stderr)


class LocalEngine:
    """One single-threaded worker process per core on this machine."""

    name = "local"

    def __init__(self, workers: int | None = None, *, max_retries: int = 2) -> None:
        if workers is not None and workers < 1:
            raise ParamError("workers", f"must be >= 1, got {workers}")
        self.workers = workers or cores()
        self.max_retries = max_retries

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, desc: str = "cells",
            show_progress: bool = True) -> Iterator[tuple[int, R]]:
        if not tasks:
            return
        if self.workers <= 1 or len(tasks) == 1:
            # In the driver (per-iteration progress bars stay visible), single-threaded like every worker: the
            # same arithmetic, and no threads spinning against each other on a busy machine.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for i, task in enumerate(tasks):
                    yield i, fn(task)
            finally:
                torch.set_num_threads(threads)
            return
        bar = _bar(desc, len(tasks), show_progress)
        pending = dict(enumerate(tasks))
        attempts = 0
        try:
            while pending:
                ctx = mp.get_context("fork")
                pool = ProcessPoolExecutor(max_workers=min(self.workers, len(pending)), mp_context=ctx)
                futures: dict[Future[Any], int] = {pool.submit(_call, fn, t): i for i, t in pending.items()}
                broken = False
                try:
                    waiting = set(futures)
                    while waiting:
                        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                        for fut in done:
                            try:
                                result = fut.result()
                            except BrokenProcessPool:
                                broken = True
                                continue
                            i = futures[fut]
                            del pending[i]
                            bar.update(1)
                            yield i, result
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
                if broken:
                    attempts += 1
                    if attempts > self.max_retries:
                        raise EngineError(f"local engine: a worker process died {attempts} times; "
                                          f"{len(pending)} task(s) not finished")
        finally:
            bar.close()


class RayEngine:
    """Tasks as Ray tasks, retried when their worker dies; a local instance or an existing cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3,
                 runtime_env: dict[str, Any] | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self.num_gpus = 0.0  # GPUs (or a fraction) each task asks for: set for an audit on CUDA
        self._session = False

    def __enter__(self) -> RayEngine:
        """Start (or join) Ray once for several `map` calls; shut it down on exit if this started it."""
        _ray, self._session = self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session:
            self._session = False
            self._ray().shutdown()

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise EngineError("the ray engine needs Ray: pip install \"giaudit[ray]\"") from None
        return ray

    def start(self) -> tuple[Any, bool]:
        """Connect to (or start) Ray; return the module and whether this call started it."""
        ray = self._ray()
        if ray.is_initialized():
            return ray, False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs.update(num_cpus=self.num_cpus or cores(), _node_ip_address="127.0.0.1")
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise EngineError(f"ray engine address {self.address}: cannot join the Ray cluster ({exc})") from None
        return ray, True

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, desc: str = "cells",
            show_progress: bool = True) -> Iterator[tuple[int, R]]:
        if not tasks:
            return
        ray, started = self.start()
        bar = _bar(desc, len(tasks), show_progress)
        try:
            resources: dict[str, Any] = {"num_cpus": 1, "max_retries": self.max_retries}
            if self.num_gpus:
                resources["num_gpus"] = self.num_gpus
            remote = ray.remote(**resources)(_call)
            if self.runtime_env:  # e.g. {"env_vars": ...} or {"working_dir": ...} for the tasks of this engine
                remote = remote.options(runtime_env=self.runtime_env)
            fn_ref = ray.put(fn)
            refs = {remote.remote(fn_ref, t): i for i, t in enumerate(tasks)}
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
                    except ray.exceptions.WorkerCrashedError as exc:
                        raise EngineError(f"ray engine: a task's worker died {self.max_retries + 1} times: "
                                          f"{exc}") from None
                    bar.update(1)
                    yield refs[ref], result
        finally:
            bar.close()
            if started:
                ray.shutdown()


def make_engine(name: str = "local", *, address: str | None = None, workers: int | None = None) -> Engine:
    """The engine `name` (local or ray): `address` is the Ray cluster to join (ray only), `workers` the local
    processes or the CPUs of a local Ray instance. Bad arguments raise `ParamError` naming the parameter."""
    if name not in ENGINES:
        raise ParamError("engine", f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    if name == "local":
        if address:
            raise ParamError("address", "only the ray engine joins a cluster (the engine is 'local')")
        return LocalEngine(workers)
    return RayEngine(address, num_cpus=workers)
