"""Inverting Gradients: giaudit against Geiping's `breaching` package, one process, same problem.

Paper: Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients - How easy
is it to break privacy in federated learning?", NeurIPS 2020. Threat model:
honest-but-curious server, SoK class B (model, FedSGD gradient, batch size);
both attacks are handed the true labels here (an oracle) so that label
recovery, which the two libraries do differently, is not part of the race.

What is compared (see benchmarks/README.md):

1. Per-iteration time, giaudit vs breaching, for ResNet-18 (CIFAR variant)
   and ConvNet (width 64) at 32 px, batch 1 and 4, untrained, FedSGD. Both
   attack the *identical* gradient of the *identical* nn.Module weights: the
   observation comes from giaudit's `Scenario.simulate`, and breaching's
   server payload (parameters) and shared data (gradients, labels) are built
   from it by hand. Iterations are timed by a global optimizer step hook, so
   each figure is a whole iteration of each library's own loop.
2. Time-to-quality: breaching's PSNR after N iterations (its paper recipe:
   signed Adam, step-lr at 3/8, 5/8, 7/8 of N), and the wall time giaudit
   needs until its returned image reaches that PSNR (giaudit's "plateau"
   schedule with patience-based stopping, optionally parallel restarts). The
   ground truth is used only here, in the benchmark, to evaluate; the attack
   never sees it: a probe run records the PSNR of each iterate through an
   optimizer hook to find a candidate budget, then an untouched giaudit run
   with that budget is timed and its returned image evaluated.

Data: four RGB photographs bundled with scikit-image (astronaut, chelsea,
coffee, rocket; square crops resized to 32 px with antialiasing), labels 0..3.

breaching imports torchvision at import time; torchvision must not be
installed next to our CPU torch, so this script (and only this script)
installs a small stand-in module providing exactly what breaching touches
when it is imported; the attack path used here does not call torchvision.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}


def _maybe_reexec_with_malloc(argv: list[str]) -> None:
    """glibc reads these variables once, at process start: re-exec ourselves with them set."""
    if "--malloc-tuning" not in argv or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


_maybe_reexec_with_malloc(sys.argv[1:])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # giaudit from this checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from giaudit.attacks._common.distances import cosine_distance  # noqa: E402
from giaudit.attacks.base import Budget  # noqa: E402
from giaudit.attacks.ig import InvertingGradients  # noqa: E402
from giaudit.data import ImageDataset  # noqa: E402
from giaudit.fl import compute_update  # noqa: E402
from giaudit.scenario.client import Scenario  # noqa: E402
from giaudit.scenario.models import build_model  # noqa: E402
from giaudit.threat import threat_model  # noqa: E402
from giaudit.types import ClientProtocol, DataSpec, GroundTruth, Observation  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CASES_ALL = ("resnet18:1", "resnet18:4", "convnet:1", "convnet:4")


# ---------------------------------------------------------------------------------------------
# breaching, with a torchvision stand-in
# ---------------------------------------------------------------------------------------------

class _TorchvisionStub(types.ModuleType):
    """Any attribute breaching did not touch at import time fails loudly, naming itself."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name} is not available: benchmarks/ig_speed.py replaces "
                             "torchvision by a stand-in (torchvision must not be installed next to torch)")


def _install_torchvision_stub() -> bool:
    """Put a stand-in torchvision into sys.modules when the real one is absent. True if installed.

    breaching, at import: `import torchvision` (models/model_preparation.py,
    utils.py), `import torchvision.transforms` (malicious_modifications), and
    `class _DenseLayer(torchvision.models.densenet._DenseLayer)` (models/densenets.py),
    which needs a real class to subclass. Nothing on the optimisation-attack
    path calls torchvision.
    """
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        pass
    root = _TorchvisionStub("torchvision")
    models = _TorchvisionStub("torchvision.models")
    densenet = _TorchvisionStub("torchvision.models.densenet")
    transforms = _TorchvisionStub("torchvision.transforms")
    utils = _TorchvisionStub("torchvision.utils")

    class _DenseLayer(nn.Module):  # base class only; breaching's DenseNet is never built here
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision stand-in: DenseNet layers are not available in this benchmark")

    densenet._DenseLayer = _DenseLayer  # type: ignore[attr-defined]
    models.densenet = densenet  # type: ignore[attr-defined]
    root.models, root.transforms, root.utils = models, transforms, utils  # type: ignore[attr-defined]
    root.__path__ = []  # a package, so `import torchvision.transforms` resolves through sys.modules
    models.__path__ = []
    for mod in (root, models, densenet, transforms, utils):
        sys.modules[mod.__name__] = mod
    return True


def _import_breaching() -> Any:
    stubbed = _install_torchvision_stub()
    try:
        import breaching  # noqa: F401
        import breaching.attacks
    except ImportError as exc:
        raise SystemExit(f"cannot import breaching ({exc}); install it as benchmarks/README.md says: "
                         "pip install --no-deps breaching==0.1.2 && pip install 'hydra-core>=1.1,<1.4'") from exc

    breaching._giaudit_torchvision_stub = stubbed  # type: ignore[attr-defined]
    return breaching


def breaching_config(breaching: Any, iterations: int, lr: float, tv_weight: float) -> Any:
    """breaching's own Inverting-Gradients config, with our budget and hyperparameters."""
    overrides = [
        f"optim.max_iterations={iterations}",
        f"optim.step_size={lr}",
        f"regularization.total_variation.scale={tv_weight}",
        "restarts.num_trials=1",
        "optim.callback=1000000000",  # its logger is silent anyway; avoid the periodic .item()
    ]
    # hydra prints a banner and warns about its version_base default: neither concerns us.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return breaching.get_attack_config("invertinggradients", overrides=overrides)


def breaching_payloads(obs: Observation, labels: Tensor) -> tuple[list[dict], list[dict]]:
    """Server payload and shared data for breaching, built from giaudit's observation.

    Train mode (default): no buffers from either side, so breaching runs the
    model in train mode with batch statistics, as the client (and giaudit's
    attack) does. Eval mode (--bn-mode eval): the server sends the BN running
    statistics as buffers, which makes breaching evaluate the model in eval mode.
    """
    meta = types.SimpleNamespace(shape=tuple(obs.data_spec.shape), modality="vision")  # no mean/std: [0,1]
    buffers = [b.detach().clone() for b in obs.model.buffers()] if BN_MODE == "eval" else None
    server_payload = [dict(parameters=[p.detach().clone() for p in obs.model.parameters()], buffers=buffers,
                           metadata=meta)]
    shared_data = [dict(gradients=[t.detach().clone() for t in obs.update.tensors], buffers=None,
                        metadata=dict(num_data_points=int(labels.numel()), labels=labels.clone(),
                                      local_hyperparams=None))]
    return server_payload, shared_data


def run_breaching(breaching: Any, obs: Observation, labels: Tensor, init: Tensor, iterations: int, lr: float,
                  tv_weight: float, with_loss: bool = False) -> Any:
    """One breaching IG reconstruction from `init`. Returns (images, wall seconds of reconstruct()), and with
    `with_loss` also breaching's own lowest objective value (what it keeps its best iterate by)."""
    cfg = breaching_config(breaching, iterations, lr, tv_weight)
    attacker = breaching.attacks.prepare_attack(obs.model, nn.CrossEntropyLoss(), cfg)
    payload, shared = breaching_payloads(obs, labels)
    start = time.perf_counter()
    out, stats = attacker.reconstruct(payload, shared, {}, initial_data=init.clone())
    wall = time.perf_counter() - start
    images = out["data"].detach().clamp(0, 1)
    if with_loss:
        return images, wall, min(stats["Trial_0_Val"])
    return images, wall


# ---------------------------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------------------------

def photo_pool(size: int = 32) -> ImageDataset:
    """Square centre crops of skimage's bundled RGB photos (astronaut: around the face), labels 0..3."""
    import skimage.data

    crops = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        h, w = img.shape[:2]
        if name == "astronaut":
            img = img[0:300, 110:410]
        else:
            s = min(h, w)
            img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).float().div(255).permute(2, 0, 1)[None]
        crops.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True).clamp(0, 1))
    images = torch.cat(crops).contiguous()
    spec = DataSpec(3, size, size, 10, (0.0, 1.0), "skimage-photos")
    return ImageDataset(images, torch.arange(len(PHOTOS)), spec, tuple({"file": n} for n in PHOTOS))


BN_MODE = "train"  # set from --bn-mode: BatchNorm of the attacked model in train or eval mode


def make_problem(model_name: str, batch: int, seed: int) -> tuple[Observation, GroundTruth]:
    pool = photo_pool()
    if batch > len(pool):
        raise SystemExit(f"--cases: batch {batch} is larger than the {len(pool)} bundled photos")
    model = build_model(model_name, channels=3, num_classes=10, size=32, width=64,
                        generator=torch.Generator().manual_seed(seed))
    model.train(BN_MODE == "train")
    scenario = Scenario(model, pool.subset(torch.arange(batch)), ClientProtocol(), batch,
                        threat_model(true_labels=True))
    return scenario.simulate(generator=torch.Generator().manual_seed(seed + 1))


def psnr(rec: Tensor, truth: Tensor) -> float:
    """Mean per-image PSNR (peak 1), images paired by the assignment with the least total MSE."""
    from scipy.optimize import linear_sum_assignment

    rec, truth = rec.detach().clamp(0, 1).double(), truth.double()
    mse = ((rec[:, None] - truth[None]) ** 2).flatten(2).mean(-1).numpy()
    rows, cols = linear_sum_assignment(mse)
    return float(np.mean([10 * math.log10(1.0 / max(mse[r, c], 1e-12)) for r, c in zip(rows, cols)]))


def giaudit_initial_images(attack: InvertingGradients, obs: Observation, seed: int, k: int = 1) -> Tensor:
    """The first restart's starting images (or, with k > 1, the k restarts' stacked), drawn as
    `Attack.reconstruct` draws them.

    Checked against giaudit itself in `check_same_problem` (a one-iteration
    constant-lr run from this start must return this start).
    """
    starts = [attack.initial_images(obs, obs.batch_size, torch.Generator().manual_seed(s))
              for s in restart_seeds(seed, k)]
    return starts[0] if k == 1 else torch.stack(starts)


def restart_seeds(seed: int, k: int) -> list[int]:
    """The seeds of the k restarts, drawn as `Attack.reconstruct` draws them from `Generator().manual_seed(seed)`
    (oracle labels consume no randomness)."""
    return [int(s) for s in torch.randint(0, 2**62, (k,), generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------
# instruments (evaluation only: they read the optimiser's parameter, never touch the attack)
# ---------------------------------------------------------------------------------------------

class StepClock:
    """Timestamps every optimizer.step() in this process (one whole attack iteration each)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._h = register_optimizer_step_post_hook(self._hook)

    def _hook(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())

    def deltas(self, skip: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[skip:]

    def close(self) -> None:
        self._h.remove()


class TargetReached(Exception):
    """Raised by the probe's hook to end the probe run early (module level: it must pickle across workers)."""


class IterateProbe:
    """PSNR of every iterate of every restart, written per process to `folder` (works in forked workers).

    With `stop_at`, the hook raises `TargetReached` once an iterate reaches that
    PSNR: the probe only has to find a candidate budget, and this keeps it from
    running to its cap.
    """

    def __init__(self, truth: Tensor, folder: str, stop_at: float | None = None) -> None:
        self.truth, self.folder, self.stop_at, self._next = truth, folder, stop_at, 0
        self._h = register_optimizer_step_post_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if not hasattr(opt, "_bench_key"):
            opt._bench_key = f"{os.getpid()}-{self._next}"  # type: ignore[attr-defined]
            opt._bench_it = 0  # type: ignore[attr-defined]
            self._next += 1
        opt._bench_it += 1  # type: ignore[attr-defined]
        x = opt.param_groups[0]["params"][0]
        value = psnr(x.detach().clamp(0, 1), self.truth)  # the attack clamps right after the step
        with open(os.path.join(self.folder, opt._bench_key + ".txt"), "a") as fh:  # type: ignore[attr-defined]
            fh.write(f"{opt._bench_it} {value:.6f}\n")  # type: ignore[attr-defined]
        if self.stop_at is not None and value >= self.stop_at:
            raise TargetReached(f"iterate {opt._bench_it} reached {value:.2f} dB")  # type: ignore[attr-defined]

    def trajectories(self) -> list[list[tuple[int, float]]]:
        out = []
        for p in sorted(Path(self.folder).glob("*.txt")):
            out.append([(int(a), float(b)) for a, b in (line.split() for line in p.read_text().splitlines())])
        return out

    def close(self) -> None:
        self._h.remove()


# ---------------------------------------------------------------------------------------------
# the two measurements
# ---------------------------------------------------------------------------------------------

@dataclass
class PerIteration:
    model: str
    batch: int
    giaudit_ms: float
    breaching_ms: float
    giaudit_spread_ms: tuple[float, float] = (0.0, 0.0)   # 25th, 75th percentile
    breaching_spread_ms: tuple[float, float] = (0.0, 0.0)
    same_objective_abs_diff: float = float("nan")

    @property
    def ratio(self) -> float:  # > 1: giaudit faster
        return self.breaching_ms / self.giaudit_ms


@dataclass
class TimeToQuality:
    model: str
    batch: int
    iterations: int
    breaching_psnr: float
    breaching_s: float
    giaudit_psnr: float
    giaudit_s: float
    giaudit_iterations: int
    restarts: int
    reached: bool
    probe_best_psnr: float
    probe_iterations: int
    start_psnr: float
    confirm_runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.breaching_s / self.giaudit_s if self.reached else float("nan")

    @property
    def trivial(self) -> bool:
        """breaching ended below the random start: any budget 'reaches' it, the figure says nothing."""
        return self.breaching_psnr <= self.start_psnr


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return (q[0] * 1e3, q[2] * 1e3)


def check_same_problem(breaching: Any, obs: Observation, labels: Tensor, init: Tensor,
                       attack: InvertingGradients, seed: int) -> float:
    """|giaudit objective - breaching objective| at the shared start (same model, gradient, loss)."""
    # giaudit's start really is `init`: one iteration returns the best-so-far iterate, i.e. the start.
    rec = attack.reconstruct(obs, budget=Budget(iterations=1), rng=torch.Generator().manual_seed(seed))
    if not torch.equal(rec.images, init.clamp(0, 1)):
        raise RuntimeError("benchmark bug: giaudit's initial images were not reproduced")
    ours = cosine_distance(compute_update(_train_copy(obs.model), init, labels), obs.update.tensors)
    cfg = breaching_config(breaching, 1, attack.lr, attack.tv_weight)
    attacker = breaching.attacks.prepare_attack(obs.model, nn.CrossEntropyLoss(), cfg)
    payload, shared = breaching_payloads(obs, labels)
    models, blabels, _ = attacker.prepare_attack(payload, shared)
    attacker.objective.initialize(attacker.loss_fn, cfg.impl, None)
    theirs, _ = attacker.objective(models[0], shared[0]["gradients"], init.clone(), blabels)
    return abs(float(ours.detach()) - float(theirs.detach()))


def _train_copy(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.train(BN_MODE == "train")
    return m


def measure_per_iteration(breaching: Any, model_name: str, batch: int, args: argparse.Namespace
                          ) -> PerIteration:
    obs, _truth = make_problem(model_name, batch, args.seed)
    labels = obs.labels
    attack = InvertingGradients(labels="oracle", lr=args.lr, tv_weight=args.tv_weight, schedule="steps")
    init = giaudit_initial_images(attack, obs, args.seed)
    diff = check_same_problem(breaching, obs, labels, init, attack, args.seed)
    ours: list[float] = []
    theirs: list[float] = []
    k = args.timing_iterations
    skip = min(2, k - 2)  # the first iterations pay for allocations and oneDNN primitive creation
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        clock = StepClock()
        try:
            attack.reconstruct(obs, budget=Budget(iterations=k), rng=torch.Generator().manual_seed(args.seed))
        finally:
            clock.close()
        ours += clock.deltas(skip)
        clock = StepClock()
        try:
            run_breaching(breaching, obs, labels, init, k, args.lr, args.tv_weight)
        finally:
            clock.close()
        theirs += clock.deltas(skip)
    return PerIteration(model_name, batch, statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3,
                        _quartiles(ours), _quartiles(theirs), diff)


def measure_time_to_quality(breaching: Any, model_name: str, batch: int, args: argparse.Namespace
                            ) -> TimeToQuality:
    obs, truth = make_problem(model_name, batch, args.seed)
    labels = obs.labels
    n = args.iterations
    ig_steps = InvertingGradients(labels="oracle", lr=args.lr, tv_weight=args.tv_weight)
    init = giaudit_initial_images(ig_steps, obs, args.seed)
    b_images, b_wall = run_breaching(breaching, obs, labels, init, n, args.lr, args.tv_weight)
    target = psnr(b_images, truth.images)

    attack = InvertingGradients(labels="oracle", lr=args.lr, tv_weight=args.tv_weight, schedule="plateau")
    patience = args.patience if args.patience is not None else max(5, n // 40)
    cap = int(math.ceil(args.cap_factor * n))

    def budget(iters: int) -> Budget:
        return Budget(iterations=iters, restarts=args.restarts, patience=patience)

    # Probe: where does some restart's iterate first reach the target? (evaluation hook only)
    probe_final = float("nan")  # PSNR the probe run returned, when it ran to its end
    with tempfile.TemporaryDirectory() as folder:
        probe = IterateProbe(truth.images, folder, stop_at=target)
        try:
            rec = attack.reconstruct(obs, budget=budget(cap), rng=torch.Generator().manual_seed(args.seed))
            probe_final = psnr(rec.images, truth.images)
        except TargetReached:
            pass
        finally:
            probe.close()
        trajectories = probe.trajectories()
    probe_len = max(len(t) for t in trajectories)
    best_iterate = max(p for t in trajectories for _, p in t)
    firsts = [next((i for i, p in t if p >= target), None) for t in trajectories]
    firsts = [f for f in firsts if f is not None]

    # Confirm with untouched giaudit runs (no hook): the returned image must reach the target.
    runs: list[dict[str, Any]] = []
    reached, g_psnr, g_wall, g_iters = False, probe_final, float("nan"), probe_len
    if firsts or probe_final >= target:  # NaN (probe stopped early) compares False
        iters = min(firsts) if firsts else probe_len
        for _ in range(args.max_confirm):
            rec = attack.reconstruct(obs, budget=budget(iters), rng=torch.Generator().manual_seed(args.seed))
            value = psnr(rec.images, truth.images)
            runs.append({"budget": iters, "iterations": rec.trace.iterations, "psnr": value,
                         "wall_s": rec.trace.wall_s, "stopped_early": rec.trace.stopped_early})
            g_psnr, g_wall, g_iters = value, rec.trace.wall_s, rec.trace.iterations
            if value >= target:
                reached = True
                break
            if iters >= cap or rec.trace.stopped_early:
                break  # a larger budget cannot change a run that stopped by itself
            iters = min(cap, int(math.ceil(iters * 1.2)))
    return TimeToQuality(model_name, batch, n, target, b_wall, g_psnr, g_wall, g_iters, args.restarts, reached,
                         best_iterate, probe_len, psnr(init, truth.images), runs)


@dataclass
class Restarts:
    model: str
    batch: int
    k: int
    iterations: int
    breaching_psnr: float          # of the restart breaching ranks first by its own objective
    breaching_s: float             # K runs of N iterations, one after the other (breaching runs restarts serially)
    breaching_losses: list[float]
    giaudit_psnr: float            # of the restart giaudit ranks first by its own matching loss
    giaudit_s: float
    giaudit_iterations: int        # summed over restarts
    halving: int
    workers: int
    cuts: list[Any] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.breaching_s / self.giaudit_s

    @property
    def met(self) -> bool:
        return self.giaudit_psnr >= self.breaching_psnr and self.speedup >= 2.0


def measure_restarts(breaching: Any, model_name: str, batch: int, args: argparse.Namespace) -> Restarts:
    """Best-of-K: breaching's K full runs vs giaudit's successive halving of K restarts, the same K starts.

    Each library ranks its restarts by its own objective; the ground truth only scores the image it returns.
    """
    obs, truth = make_problem(model_name, batch, args.seed)
    labels, k, n = obs.labels, args.k, args.iterations
    attack = InvertingGradients(labels="oracle", lr=args.lr, tv_weight=args.tv_weight, schedule="plateau")
    starts = giaudit_initial_images(attack, obs, args.seed, k)
    b_runs = [run_breaching(breaching, obs, labels, starts[i], n, args.lr, args.tv_weight, with_loss=True)
              for i in range(k)]
    b_best = min(range(k), key=lambda i: b_runs[i][2])
    patience = args.patience if args.patience is not None else max(5, n // 40)
    budget = Budget(iterations=int(math.ceil(args.cap_factor * n)), restarts=k, patience=patience,
                    halving=args.halving, workers=args.workers)
    rec = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(args.seed))
    log = rec.trace.extra["halving"]
    return Restarts(model_name, batch, k, n, psnr(b_runs[b_best][0], truth.images), sum(r[1] for r in b_runs),
                    [float(r[2]) for r in b_runs], psnr(rec.images, truth.images), rec.trace.wall_s,
                    log["total_iterations"], args.halving, rec.trace.extra["workers"], log["cuts"])


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=None,
                   help="breaching's budget N for time-to-quality (default 2000; 20 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, validates the script only")
    p.add_argument("--cases", default=",".join(CASES_ALL), help="comma list of model:batch")
    p.add_argument("--skip-per-iteration", action="store_true")
    p.add_argument("--skip-time-to-quality", action="store_true")
    p.add_argument("--timing-iterations", type=int, default=None,
                   help="iterations per timing run (default 30; 5 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing runs per library (default 3; 1 quick)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam step size, both libraries")
    p.add_argument("--tv-weight", type=float, default=1e-4, help="total-variation weight, both libraries")
    p.add_argument("--patience", type=int, default=None, help="giaudit plateau patience (default max(5, N/40))")
    p.add_argument("--restarts", type=int, default=1, help="giaudit restarts (parallel, one process per core)")
    p.add_argument("--restart-cases", default="resnet18:1",
                   help="model:batch list for the best-of-K comparison (3); 'none' skips it")
    p.add_argument("--k", type=int, default=4, help="restarts in the best-of-K comparison")
    p.add_argument("--halving", type=int, default=None,
                   help="giaudit's first successive-halving cut, in iterations (default N/16)")
    p.add_argument("--workers", type=int, default=None, help="giaudit processes for restarts (default: cores)")
    p.add_argument("--cap-factor", type=float, default=2.0, help="giaudit probe budget = cap-factor x N")
    p.add_argument("--max-confirm", type=int, default=5, help="confirmation runs before giving up")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn-mode", choices=("train", "eval"), default="eval",
                   help="BatchNorm mode of the attacked model (both libraries get the same module)")
    p.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="re-exec with glibc MALLOC_* settings: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()))
    args = p.parse_args(argv)
    if args.iterations is None:
        args.iterations = 20 if args.quick else 2000
    if args.timing_iterations is None:
        args.timing_iterations = 5 if args.quick else 30
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.timing_iterations < 3:
        p.error("--timing-iterations must be >= 3")
    if args.halving is None:
        args.halving = max(1, args.iterations // 16)

    args.case_list = parse_cases(p, "--cases", args.cases)
    args.restart_case_list = parse_cases(p, "--restart-cases", args.restart_cases)
    return args


def parse_cases(p: argparse.ArgumentParser, option: str, text: str) -> list[tuple[str, int]]:
    """`model:batch,...` (or `none`) as (model, batch) pairs; a bad item is a usage error naming `option`."""
    cases = []
    for item in ([] if text.strip() == "none" else text.split(",")):
        try:
            name, b = item.strip().split(":")
            cases.append((name, int(b)))
        except ValueError:
            p.error(f"{option}: {item!r} is not model:batch (e.g. resnet18:1)")
        if name not in ("resnet18", "convnet"):
            p.error(f"{option}: model {name!r}; this benchmark covers resnet18 and convnet")
    return cases


def _fmt(x: float, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    global BN_MODE
    args = parse_args(sys.argv[1:] if argv is None else argv)
    BN_MODE = args.bn_mode
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # breaching draws (then discards) its own random start from the global RNG
    breaching = _import_breaching()
    from importlib.metadata import version

    malloc_on = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    print(f"# Inverting Gradients: giaudit vs breaching {version('breaching')} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, glibc malloc tuning {'ON' if malloc_on else 'off'}, "
          f"torchvision {'stand-in' if breaching._giaudit_torchvision_stub else 'real'})")
    print(f"# data: skimage photos {', '.join(PHOTOS)} (RGB, 32 px); untrained models, FedSGD, oracle labels;"
          f" lr {args.lr}, TV {args.tv_weight}, signed Adam, same start, seed {args.seed}"
          + ("  [--quick: smoke run, figures meaningless]" if args.quick else ""))
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "malloc_tuning": malloc_on, "threads": torch.get_num_threads()}

    def save() -> None:
        """Write what is measured so far (after every row: a stopped run keeps its figures), atomically."""
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".part")
            tmp.write_text(json.dumps(results, indent=2, default=float))
            os.replace(tmp, args.json)

    if not args.skip_per_iteration:
        print("\n## (1) per-iteration time, median ms [25th-75th pct]; ratio = breaching / giaudit (>1: giaudit "
              "faster; target >= 1.00)")
        print(f"{'model':<9} {'batch':>5} {'giaudit ms':>22} {'breaching ms':>22} {'ratio':>6} "
              f"{'|dObj| at start':>15}")
        rows = []
        for name, b in args.case_list:
            r = measure_per_iteration(breaching, name, b, args)
            rows.append(r)
            g = f"{r.giaudit_ms:.1f} [{r.giaudit_spread_ms[0]:.0f}-{r.giaudit_spread_ms[1]:.0f}]"
            t = f"{r.breaching_ms:.1f} [{r.breaching_spread_ms[0]:.0f}-{r.breaching_spread_ms[1]:.0f}]"
            print(f"{name:<9} {b:>5} {g:>22} {t:>22} {r.ratio:>6.2f} {r.same_objective_abs_diff:>15.1e}",
                  flush=True)
            results["per_iteration"] = [{**asdict(r), "ratio": r.ratio} for r in rows]
            save()

    if not args.skip_time_to_quality:
        print(f"\n## (2) time-to-quality: breaching's PSNR after N={args.iterations} iterations (step-lr), "
              f"and giaudit's wall time to return an image at least that good (plateau schedule, "
              f"restarts {args.restarts}); speed-up = breaching s / giaudit s (target >= 2.0)")
        print(f"{'model':<9} {'batch':>5} {'brch dB':>8} {'brch s':>8} {'gia dB':>8} {'gia s':>8} "
              f"{'gia its':>8} {'speed-up':>8}  note")
        rows2 = []
        for name, b in args.case_list:
            r = measure_time_to_quality(breaching, name, b, args)
            rows2.append(r)
            note = "" if r.reached else (f"not reached (best iterate {r.probe_best_psnr:.2f} dB in "
                                         f"{r.probe_iterations} its)")
            if r.trivial:
                note += f" trivial: target is below the shared start's {r.start_psnr:.2f} dB"

            print(f"{name:<9} {b:>5} {r.breaching_psnr:>8.2f} {r.breaching_s:>8.1f} {_fmt(r.giaudit_psnr, '.2f'):>8} "
                  f"{_fmt(r.giaudit_s):>8} {r.giaudit_iterations:>8} {_fmt(r.speedup, '.2f'):>8}  {note}",
                  flush=True)
            results["time_to_quality"] = [{**asdict(r), "speedup": r.speedup, "trivial": r.trivial} for r in rows2]
            save()

    if args.restart_case_list:
        print(f"\n## (3) best-of-K, K={args.k}: breaching's K runs of N={args.iterations} (ranked by its objective) vs "
              f"giaudit's successive halving (first cut {args.halving} its, ranked by its matching loss), same K "
              "starts; target: giaudit dB >= breaching dB in <= half the wall time")
        print(f"{'model':<9} {'batch':>5} {'brch dB':>8} {'brch s':>8} {'gia dB':>8} {'gia s':>8} "
              f"{'gia its':>8} {'speed-up':>8}")
        rows3 = []
        for name, b in args.restart_case_list:
            r3 = measure_restarts(breaching, name, b, args)
            rows3.append(r3)
            print(f"{name:<9} {b:>5} {r3.breaching_psnr:>8.2f} {r3.breaching_s:>8.1f} {r3.giaudit_psnr:>8.2f} "
                  f"{r3.giaudit_s:>8.1f} {r3.giaudit_iterations:>8} {r3.speedup:>8.2f}", flush=True)
            results["restarts"] = [{**asdict(r), "speedup": r.speedup, "met": r.met} for r in rows3]
            save()

    print("\n## targets")
    for r in results.get("per_iteration", []):
        print(f"per-iteration {r['model']}:{r['batch']}: ratio {r['ratio']:.2f} "
              f"{'MET' if r['ratio'] >= 1.0 else 'missed'} (>= 1.00)")
    for r in results.get("time_to_quality", []):
        s = r["speedup"]
        verdict = ("n/a, trivial target" if r["trivial"] else
                   "MET" if (not math.isnan(s) and s >= 2.0) else "missed")
        print(f"time-to-quality {r['model']}:{r['batch']}: speed-up {_fmt(s, '.2f')} {verdict} (>= 2.0)")
    for r in results.get("restarts", []):
        print(f"best-of-{r['k']} {r['model']}:{r['batch']}: {r['giaudit_psnr']:.2f} vs {r['breaching_psnr']:.2f} dB, "
              f"speed-up {r['speedup']:.2f} {'MET' if r['met'] else 'missed'} (same or better dB, >= 2.0)")
    if args.json is not None:
        save()
        print(f"# figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
