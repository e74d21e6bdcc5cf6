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
  tasks are submitted again to a fresh pool; a task that was running when its
  pool broke more than ``max_retries`` times fails the map.
- ``ray``: every task is a Ray task (``num_cpus=1``, and ``num_gpus`` =
  `RayEngine.num_gpus` when the audit runs on CUDA, a fraction allowed;
  retried up to ``max_retries`` times when its worker dies). Without an address it starts a
  local Ray instance (loopback only, no dashboard) and shuts it down at the
  end; with ``address="auto"`` or ``"HOST:PORT"`` it joins an existing
  cluster, whose nodes must have giaudit (and the same data) installed.

`Engine.map` yields ``(index, result)`` as tasks finish, so the driver can
write each result at once (resume after an interrupted sweep). Both engines
hand out at most one task per worker (CPU) at a time, and hand a freed worker
its next task before the driver handles the result that freed it.

Objects many tasks read (a seed's trained global model, read by every cell of
that seed) are passed as `Engine.share(obj)`: a `Shared` handle, which the
task reads with `Shared.get`. Ray puts the object into its object store once
(``ray.put``; each node fetches it once) instead of pickling it into every
task; the local engine keeps it in the driver, where the forked workers find
it. What ships with giaudit or is on every node's disk (the DDPM and GAN
priors, the datasets) each worker reads once and keeps (per-process caches).

Stopping: while an engine maps, SIGINT and SIGTERM to the driver stop it from
handing out new tasks; the tasks already running finish and are yielded, then
`map` raises `Interrupted` (exit status 128 + the signal number at the CLI).
A second signal stops at once: the running tasks are abandoned (their workers
killed). A signal that was ignored when the engine started (a background job
of a non-interactive shell) stays ignored. Local workers die with their
driver whatever kills it: each sets the Linux parent-death signal (SIGKILL)
and watches its parent's pid from a thread (every other platform); each runs
in a process group of its own and ignores SIGINT, so a Ctrl-C or a SIGTERM to
the driver's process group reaches only the driver, which decides what to
finish.

Test hook: when the environment variable ``GIAUDIT_ENGINE_KILL_ONCE`` names a
folder, the first task to start creates ``killed`` there and kills its own
worker process (``os._exit``), once; the retry proofs use it.
"""
from __future__ import annotations

import ctypes
import importlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from giaudit.errors import GiauditError, ParamError

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "ray")
KILL_ONCE_ENV = "GIAUDIT_ENGINE_KILL_ONCE"


# How long a worker's watchdog sleeps between looks at its parent's pid (where no parent-death signal exists),
# and how long the Ray engine waits for a cluster address to accept a connection.
WATCH_PARENT_S = 1.0
CONNECT_TIMEOUT_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class EngineError(GiauditError):
    """An engine could not run (Ray missing, cluster unreachable, a task failed after its retries)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the engine: the tasks that were running when it came were finished and yielded
    (all of them after one signal; none after a second), no other task started. A BaseException like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it. Callers may fill in `folder`
    and `saved` (where the finished results are and how many) before passing it on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.folder: str | None = None
        self.saved: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Stop:
    """The driver's stop request: set by the first SIGINT / SIGTERM while an engine maps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.depth = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, _frame: object) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(signum)
        self.signum = signum
        print(f"giaudit: {signal.Signals(signum).name}: finishing the tasks in progress, starting no new one "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise `Interrupted` when a stop was requested (after the running tasks were handed back)."""
        if self.signum is not None:
            raise Interrupted(self.signum)


_STOP = _Stop()


@contextmanager
def stop_on_signals() -> Iterator[_Stop]:
    """SIGINT and SIGTERM request a stop (`_Stop`) instead of killing the driver, for the duration; nested uses
    share one request. Only the main thread can install handlers: elsewhere the signals keep their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield _STOP
        return
    if _STOP.depth == 0:
        _STOP.signum = None
        _STOP.previous = {}
        for sig in STOP_SIGNALS:
            before = signal.getsignal(sig)
            if before is signal.SIG_IGN:
                continue
            _STOP.previous[sig] = before
            signal.signal(sig, _STOP.handle)
    _STOP.depth += 1
    try:
        yield _STOP
    finally:
        _STOP.depth -= 1
        if _STOP.depth == 0:
            for signum, before in _STOP.previous.items():
                signal.signal(signum, before)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(WATCH_PARENT_S)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(parent: int) -> None:
    """A local worker's start: die with the driver `parent` (parent-death signal on Linux, a watchdog thread
    elsewhere), leave the driver's process group, ignore SIGINT and take SIGTERM's default (the driver's
    handlers came with the fork)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        except (OSError, AttributeError):
            threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the driver died before the signal was armed
        os._exit(1)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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

    def share(self, obj: Any) -> Shared: ...


_SHARED: dict[int, Any] = {}  # the local engine's shared objects, by handle key (inherited by forked workers)
_NEXT_KEY = iter(range(1, 1 << 62))


@dataclass(frozen=True)
class Shared:
    """A handle to an object many tasks read, made by `Engine.share`: small to pickle, read with `get`."""

    key: int
    ref: Any = None  # a Ray object reference, when the object went into Ray's object store

    def get(self) -> Any:
        if self.ref is not None:
            import ray

            return ray.get(self.ref)
        return _SHARED[self.key]


def _share_local(obj: Any) -> Shared:
    key = next(_NEXT_KEY)
    _SHARED[key] = obj
    return Shared(key)


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


def _ray_call(fn: Callable[[Any], Any], arg: Any) -> tuple[str, Any]:
    """`_call` in a Ray task, with the id of the node that ran it."""
    import ray

    return ray.get_runtime_context().get_node_id(), _call(fn, arg)


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
        self._shared: list[int] = []

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        for key in self._shared:
            _SHARED.pop(key, None)
        self._shared.clear()

    def share(self, obj: Any) -> Shared:
        """`obj` for the tasks of the following `map` calls: kept in this process until the engine's ``with``
        block ends; forked workers read it from their copy of this process."""
        handle = _share_local(obj)
        self._shared.append(handle.key)
        return handle

    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, desc: str = "cells",
            show_progress: bool = True) -> Iterator[tuple[int, R]]:
        if not tasks:
            return
        with stop_on_signals() as stop:
            if self.workers <= 1 or len(tasks) == 1:
                yield from self._serial(fn, tasks, stop)
            else:
                yield from self._pool(fn, tasks, stop, _bar(desc, len(tasks), show_progress))

    def _serial(self, fn: Callable[[T], R], tasks: Sequence[T], stop: _Stop) -> Iterator[tuple[int, R]]:
        # In the driver (per-iteration progress bars stay visible), single-threaded like every worker: the
        # same arithmetic, and no threads spinning against each other on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, task in enumerate(tasks):
                stop.check()
                yield i, fn(task)
            stop.check()
        finally:
            torch.set_num_threads(threads)

    def _pool(self, fn: Callable[[T], R], tasks: Sequence[T], stop: _Stop, bar: Any) -> Iterator[tuple[int, R]]:
        """At most `workers` tasks handed out at a time, each to a forked worker; a pool broken by a dead worker
        is replaced and its unfinished tasks handed out again."""
        # Imported once here, not in every worker: torch's optimizers import torch._dynamo on their first use,
        # about 1 s of CPU per process (several seconds per worker when the workers start together).
        importlib.import_module("torch._dynamo")
        queue = list(range(len(tasks)))  # not yet finished, in order
        deaths = dict.fromkeys(queue, 0)  # pools broken while the task ran (like Ray's per-task max_retries)
        try:
            while queue:
                pool = ProcessPoolExecutor(max_workers=min(self.workers, len(queue)), mp_context=mp.get_context("fork"),
                                           initializer=_worker_init, initargs=(os.getpid(),))
                running: dict[Future[Any], int] = {}
                todo = list(queue)
                broken = False
                try:
                    while todo or running:
                        while todo and len(running) < self.workers and stop.signum is None and not broken:
                            try:
                                running[pool.submit(_call, fn, tasks[todo[0]])] = todo[0]
                            except BrokenProcessPool:  # a worker died since the last result: a fresh pool
                                broken = True
                                break
                            todo.pop(0)
                        if not running:
                            break
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        finished = []
                        for fut in done:
                            i = running.pop(fut)
                            try:
                                finished.append((i, fut.result()))
                            except BrokenProcessPool:
                                broken = True
                                deaths[i] += 1
                        # The freed workers get their next tasks before the caller handles these results (writes
                        # their files), so no worker waits on the driver.
                        while todo and len(running) < self.workers and stop.signum is None and not broken:
                            try:
                                running[pool.submit(_call, fn, tasks[todo[0]])] = todo[0]
                            except BrokenProcessPool:
                                broken = True
                                break
                            todo.pop(0)
                        for i, result in finished:
                            queue.remove(i)
                            bar.update(1)
                            yield i, result
                finally:
                    _stop_pool(pool, abandon=bool(running))
                stop.check()
                worst = max((deaths[i] for i in queue), default=0)
                if broken and worst > self.max_retries:
                    raise EngineError(f"local engine: a task's worker process died {worst} times; "
                                      f"{len(queue)} task(s) not finished")
        finally:
            bar.close()


def _stop_pool(pool: ProcessPoolExecutor, abandon: bool) -> None:
    """Shut a pool down; with `abandon` (tasks still running after a second signal or an error) its workers are
    killed first, so none outlives the map."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    if abandon:
        for proc in workers:
            if proc.is_alive():
                proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


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
        self.nodes: dict[str, int] = {}  # tasks finished per Ray node id, over this engine's `map` calls

    def __enter__(self) -> RayEngine:
        """Start (or join) Ray once for several `map` calls; shut it down on exit if this started it."""
        _ray, self._session = self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session:
            self._session = False
            self._ray().shutdown()

    def share(self, obj: Any) -> Shared:
        """`obj` in Ray's object store, once, for the tasks of the following `map` calls (call it inside the
        engine's ``with`` block, which keeps Ray up)."""
        ray, _started = self.start()
        return Shared(0, ray.put(obj))

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
        # Ray's coming default (tasks without GPUs keep the visible-devices variable as it is), chosen here so
        # that Ray prints no FutureWarning about it on every run.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if self.address:
            _probe(self.address)
            kwargs["address"] = self.address
        else:
            # "local": a new instance, as documented, even where a cluster's address file (a `ray start` on this
            # machine, live or long stopped) would otherwise make ray.init() join it or wait on it.
            kwargs.update(address="local", num_cpus=self.num_cpus or cores(), _node_ip_address="127.0.0.1")
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
            with stop_on_signals() as stop:
                resources: dict[str, Any] = {"num_cpus": 1, "max_retries": self.max_retries}
                if self.num_gpus:
                    resources["num_gpus"] = self.num_gpus
                remote = ray.remote(**resources)(_ray_call)
                if self.runtime_env:  # e.g. {"env_vars": ...} or {"working_dir": ...} for the tasks of this engine
                    remote = remote.options(runtime_env=self.runtime_env)
                fn_ref = ray.put(fn)
                window = max(1, int(ray.cluster_resources().get("CPU", 1)))  # one task per CPU handed out
                todo = list(range(len(tasks)))
                refs: dict[Any, int] = {}
                try:
                    while todo or refs:
                        while todo and len(refs) < window and stop.signum is None:
                            i = todo.pop(0)
                            refs[remote.remote(fn_ref, tasks[i])] = i
                        if not refs:
                            break
                        # With a timeout, so that a signal's handler runs while the tasks compute.
                        done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                        finished = []
                        for ref in done:
                            i = refs.pop(ref)
                            try:
                                node, result = ray.get(ref)
                            except ray.exceptions.RayTaskError as exc:
                                raise exc.as_instanceof_cause() from None
                            except ray.exceptions.WorkerCrashedError as exc:
                                raise EngineError(f"ray engine: a task's worker died {self.max_retries + 1} times: "
                                                  f"{exc}") from None
                            self.nodes[node] = self.nodes.get(node, 0) + 1
                            finished.append((i, result))
                        # The freed CPUs get their next tasks before the caller handles these results.
                        while todo and len(refs) < window and stop.signum is None:
                            i = todo.pop(0)
                            refs[remote.remote(fn_ref, tasks[i])] = i
                        for i, result in finished:
                            bar.update(1)
                            yield i, result
                finally:
                    for ref in refs:  # abandoned (a second signal, an error): stop computing them
                        ray.cancel(ref, force=True)
                stop.check()
        finally:
            bar.close()
            if started:
                ray.shutdown()


def _probe(address: str) -> None:
    """Fail fast, in one line, when a Ray address (``HOST:PORT`` or ``ray://HOST:PORT``) accepts no connection:
    Ray itself retries for minutes. ``auto`` (the address Ray recorded locally) is left to Ray."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EngineError(f"ray engine address {address}: nothing answers there ({exc.strerror or exc}); start the "
                          "cluster (`ray start --head`) or pass its address") from None


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
