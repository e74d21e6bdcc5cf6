"""Issue 12, time-to-quality over several seeds: which plateau schedule reaches breaching's PSNR soonest.

Paper: Geiping et al., "Inverting Gradients", NeurIPS 2020 (the attack and
breaching's recipe); threat model as in benchmarks/ig_speed.py: honest-but-
curious server, class B, oracle labels for both libraries, BatchNorm in eval
mode.

`ig_speed.py` answers the question for one seed with confirmation runs; a
single seed moves the end PSNR by 0.5-1 dB with any change of the trajectory,
too much to choose a schedule by. This script spends the same machine time on
more seeds instead, one single-threaded job per core:

- breaching, per (case, seed): its PSNR after N iterations (the target) and
  the wall time of its `reconstruct` call. Cached in the output JSON: the
  costliest job is run once and shared by every giaudit variant.
- giaudit, per (case, seed, variant): one run of the plateau schedule to its
  own stop (at most cap x N iterations), recording for every iteration the
  matching loss of the iterate and, for evaluation only, its PSNR (the
  attack never sees the ground truth). With the plateau schedule the first n
  iterations do not depend on the budget, so the image a run with budget n
  *returns* (its lowest-matching-loss iterate among the first n) is known
  for every n from this one run. giaudit's time to quality is the smallest
  such n whose returned image reaches breaching's PSNR, times giaudit's
  measured seconds per iteration in this run (the PSNR bookkeeping timed
  and taken out).

Both libraries run single-threaded, one job per core, so a breaching job and a
giaudit job share the machine alike. Speed-up = breaching s / giaudit s;
issue 12's target is >= 2 in every case.

    python benchmarks/ig_schedule.py --cases resnet18:1,convnet:1 --seeds 0,1,2 \\
        --variants p50,p100,s1000 --out reports/ig_schedule.json

A variant rKpN runs K restarts side by side, one single-threaded process per
restart (`Budget.restarts = K`, the default workers), and returns the restart
of least matching loss; it is set against breaching on K threads, so each
library has the whole machine for one run; tTpN runs one restart on T threads,
against breaching on T threads (for cases too slow to run single-threaded).
Such jobs run one at a time.

A stopped run resumes from the JSON (finished jobs are not run again).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ig_speed, next to this file

import ig_speed  # noqa: E402
import torch  # noqa: E402
from ig_speed import (  # noqa: E402
    giaudit_initial_images,
    make_problem,
    parse_cases,
    psnr,
    restart_seeds,
    run_breaching,
)
from torch import Tensor  # noqa: E402

from giaudit.attacks._common.distances import total_variation  # noqa: E402
from giaudit.attacks.base import Budget  # noqa: E402
from giaudit.attacks.ig import InvertingGradients  # noqa: E402
from giaudit.io import atomic_write_text  # noqa: E402


class _Traced(InvertingGradients):
    """IG that records, for evaluation only, the PSNR of the iterate each trial update is computed for.

    `trial_update` is called once per iteration with exactly the iterate whose
    matching loss lands in `RestartResult.losses` at that index. Each restart
    writes its trace to `folder` as `<its seed>.json`: with K > 1 restarts run in
    forked worker processes, and a file is how their traces reach the job.
    """

    def __init__(self, truth: Tensor, folder: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._truth, self._folder = truth, folder
        self.psnrs: list[float] = []
        self.tvs: list[float] = []
        self.eval_s = 0.0

    def trial_update(self, obs, model, x, labels, *, create_graph=True):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        self.psnrs.append(psnr(x.detach(), self._truth))
        self.tvs.append(float(total_variation(x.detach())))
        self.eval_s += time.perf_counter() - t
        return super().trial_update(obs, model, x, labels, create_graph=create_graph)

    def run_restart(self, obs, labels, budget, generator, progress=None):  # type: ignore[no-untyped-def]
        self.psnrs, self.tvs, self.eval_s = [], [], 0.0
        seed = generator.initial_seed()
        result = super().run_restart(obs, labels, budget, generator, progress)
        trace = {"losses": result.losses, "psnrs": self.psnrs, "tvs": self.tvs, "eval_s": self.eval_s}
        atomic_write_text(Path(self._folder) / f"{seed}.json", json.dumps(trace))
        return result


def _job(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    torch.set_num_threads(spec["threads"])
    ig_speed.BN_MODE = spec["bn_mode"]
    torch.manual_seed(spec["seed"])  # breaching draws (then discards) a random start from the global RNG
    name, b = spec["case"].split(":")
    obs, truth = make_problem(name, int(b), spec["seed"])
    if spec["kind"] == "breaching":
        breaching = ig_speed._import_breaching()
        ig = InvertingGradients(labels="oracle", lr=spec["lr"], tv_weight=spec["tv"])
        init = giaudit_initial_images(ig, obs, spec["seed"])
        images, wall = run_breaching(breaching, obs, obs.labels, init, spec["n"], spec["lr"], spec["tv"])
        return spec["key"], {"psnr": psnr(images, truth.images), "wall_s": wall, "iterations": spec["n"],
                             "start_psnr": psnr(init, truth.images), "threads": torch.get_num_threads()}
    v = parse_variant(spec["variant"])
    k = v["restarts"]
    with tempfile.TemporaryDirectory() as folder:
        attack = _Traced(truth.images, folder, labels="oracle", lr=spec["lr"], tv_weight=spec["tv"],
                         schedule=v["schedule"])
        budget = (Budget(iterations=v["budget"], restarts=k) if v["schedule"] == "steps"
                  else Budget(iterations=spec["cap"], restarts=k, patience=v["patience"]))
        rec = attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(spec["seed"]))
        traces = [json.loads((Path(folder) / f"{s}.json").read_text()) for s in restart_seeds(spec["seed"], k)]
    if rec.trace.extra["workers"] != k:
        raise RuntimeError(f"benchmark setup: {k} restarts ran on {rec.trace.extra['workers']} processes, "
                           f"not one per restart (cores: {os.cpu_count()})")
    returned = _returned_by_budget([t["losses"] for t in traces], [t["psnrs"] for t in traces])
    # The same trajectories, had each restart returned (and been ranked by) its iterate of least total
    # objective (match + TV), as breaching ranks its iterates: a what-if on these iterates, not a run of its own.
    by_objective = _returned_by_budget([[m + spec["tv"] * tv for m, tv in zip(t["losses"], t["tvs"])]
                                        for t in traces], [t["psnrs"] for t in traces])
    final = psnr(rec.images, truth.images)
    if abs(final - returned[-1]) > 1e-6:
        raise RuntimeError(f"benchmark bug: the run returned {final:.4f} dB, the trace says {returned[-1]:.4f}")
    # The restarts run side by side, so the wall time of a budget is that of the longest restart; its own
    # PSNR bookkeeping is taken out (another restart's ran on the other core, beside it).
    longest = max(traces, key=lambda t: len(t["losses"]))
    its = len(longest["losses"])
    wall = rec.trace.wall_s - longest["eval_s"]
    out = {"iterations": its, "wall_s": wall, "s_per_it": wall / its, "returned_psnr": final,
           "best_iterate_psnr": max(max(t["psnrs"]) for t in traces), "returned": [round(p, 4) for p in returned],
           "by_objective_psnr": by_objective[-1],
           "by_objective_same_share": sum(a == b for a, b in zip(returned, by_objective)) / its,
           "stopped_early": rec.trace.stopped_early, "fixed_budget": v["schedule"] == "steps"}
    if k > 1:
        out.update({"restarts": k, "restart_iterations": [len(t["losses"]) for t in traces],
                    "restart_psnrs": [t["psnrs"][t["losses"].index(min(t["losses"]))] for t in traces],
                    "best_restart": rec.trace.best_restart})
    return spec["key"], out


def _run_alone(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`_job` in a process of its own that is not a pool worker: a job of K restarts forks K workers, which a
    pool's daemonic worker may not do."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_alone_child, args=(spec, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        raise RuntimeError(f"job {spec['key']} died (exit code {proc.exitcode})") from None
    finally:
        proc.join()
    if status == "error":
        raise RuntimeError(f"job {spec['key']} failed: {payload}")
    return payload


def _alone_child(spec: dict[str, Any], conn: Any) -> None:
    try:
        conn.send(("ok", _job(spec)))
    except Exception as exc:
        conn.send(("error", repr(exc)))


def parse_variant(text: str) -> dict[str, Any]:
    """'p50' plateau, patience 50; 's1000' the paper's steps schedule with a budget of 1000 iterations (its
    drops move with the budget); a prefix 'rK' (r2p100) runs K restarts side by side, one single-threaded
    process each, and 'tT' (t2p100) one restart on T threads; either is set against breaching run on K or T
    threads. The results also hold 'p50h400' (no lr drop before iteration 400), run with the IG option `hold`
    at commit 50c5d3a; it did not pay and was removed."""
    m = re.fullmatch(r"(?:([rt])(\d+))?(?:p(\d+)|s(\d+))", text)
    if m is None or (m.group(2) is not None and int(m.group(2)) < 2):
        raise SystemExit(f"--variants: {text!r} is not [rK|tT]pN or [rK|tT]sN with K, T >= 2 "
                         "(e.g. p50, s1000, r2p100, t2p100)")
    k = int(m.group(2)) if m.group(1) == "r" else 1
    if m.group(4):
        return {"schedule": "steps", "budget": int(m.group(4)), "restarts": k}
    return {"schedule": "plateau", "patience": int(m.group(3)), "restarts": k}


def _threads(variant: str) -> int:
    """Threads of the job, and of the breaching run it is set against: rK (K single-threaded processes) and
    tT (one process on T threads) take K or T, the others 1."""
    m = re.match(r"[rt](\d+)", variant)
    return int(m.group(1)) if m else 1


def _breaching_key(case: str, seed: int, n: int, threads: int) -> str:
    return f"breaching|{case}|{seed}|{n}" + (f"|t{threads}" if threads > 1 else "")


def _returned_by_budget(scores: list[list[float]], psnrs: list[list[float]]) -> list[float]:
    """[n-1]: PSNR of the image a run with budget n returns, for K restarts run side by side: each restart's
    lowest-score iterate among its first n (or all it ran, if it stopped sooner), and of those the restart
    with the lowest score, ties to the first, as `Attack.reconstruct` picks it."""
    best = [math.inf] * len(scores)
    best_psnr = [math.nan] * len(scores)
    out = []
    for n in range(max(len(s) for s in scores)):
        for r, (sc, ps) in enumerate(zip(scores, psnrs)):
            if n < len(sc) and sc[n] < best[r]:
                best[r], best_psnr[r] = sc[n], ps[n]
        winner = min(range(len(scores)), key=lambda r: (math.isnan(best[r]), best[r], r))
        out.append(best_psnr[winner])
    return out


def _median_at(runs: list[dict[str, Any]], k: int) -> float:
    """Median over runs of the PSNR a budget of k iterations returns (a run that stopped sooner: its last)."""
    return statistics.median(g["returned"][min(k, len(g["returned"])) - 1] for g in runs)


def _budgets(runs: list[dict[str, Any]]) -> list[int]:
    """The budgets these runs answer for. A fixed-budget schedule (steps) places its drops by its budget, so
    only its own budget is a run it made; a plateau run answers for every budget."""
    if all(g.get("fixed_budget") for g in runs):
        return sorted({g["iterations"] for g in runs})
    return list(range(1, max(len(g["returned"]) for g in runs) + 1))


def first_budget_reaching(runs: list[dict[str, Any]], target: float) -> int | None:
    """Least budget at which the runs' median returned PSNR reaches `target` (None if none does)."""
    return next((k for k in _budgets(runs) if _median_at(runs, k) >= target), None)


def time_to_quality(g: dict[str, Any], target: float) -> tuple[int | None, float]:
    """Smallest budget whose returned image reaches `target`, and its wall time (None, nan if never)."""
    n = first_budget_reaching([g], target)
    return n, (n * g["s_per_it"] if n is not None else float("nan"))


def report(data: dict[str, Any], cases: list[str], seeds: list[int], variants: list[str], n: int) -> None:
    print(f"# issue 12 schedule study: breaching N={n} vs giaudit (pN plateau patience N, sN steps at budget N; "
          "pNhM: held at the first lr to M, commit 50c5d3a; rK: K restarts side by side; tT: T threads), "
          "1 thread per job but rK and tT (K, T, and breaching on as many), BN eval, oracle labels")
    print(f"{'case':<12} {'seed':>4} {'brch dB':>8} {'brch s':>7} {'variant':>8} {'gia its':>8} {'ret dB':>7} "
          f"{'gap dB':>7} {'n*':>6} {'gia s':>7} {'speed-up':>8}")
    summary: dict[tuple[str, str], list[float]] = {}
    for case in cases:
        for seed in seeds:
            for var in variants:
                br = data.get(_breaching_key(case, seed, n, _threads(var)))
                g = data.get(f"giaudit|{case}|{seed}|{n}|{var}")
                if br is None or g is None:
                    continue
                nstar, t = time_to_quality(g, br["psnr"])
                sp = br["wall_s"] / t if nstar else 0.0
                summary.setdefault((case, var), []).append(sp)
                print(f"{case:<12} {seed:>4} {br['psnr']:>8.2f} {br['wall_s']:>7.0f} {var:>8} "
                      f"{g['iterations']:>8} {g['returned_psnr']:>7.2f} {g['returned_psnr'] - br['psnr']:>+7.2f} "
                      f"{nstar or '-':>6} "
                      f"{(f'{t:.0f}' if nstar else '-'):>7} {(f'{sp:.2f}' if nstar else 'never'):>8}")
    print("\n# gap dB: giaudit's returned PSNR at its own stop minus breaching's; n*: least budget reaching it")
    print("# median speed-up over seeds (never reached counts as 0); target >= 2.0")
    for (case, var), sps in summary.items():
        med = statistics.median(sps)
        print(f"{case:<12} {var:<8} median {med:.2f}  min {min(sps):.2f}  seeds {len(sps)}  "
              f"{'MET' if min(sps) >= 2.0 else ('median MET' if med >= 2.0 else 'missed')}")
    typical(data, cases, seeds, variants, n)


def typical(data: dict[str, Any], cases: list[str], seeds: list[int], variants: list[str], n: int) -> None:
    """The typical run: the median over seeds of each library's PSNR, against time.

    One trajectory's end PSNR moves 1-2 dB with anything that changes its rounding (breaching's own moves
    1.5 dB between 1 and 2 threads on the same problem), so a per-seed race is decided by that noise as much as
    by the schedule. Here giaudit's median returned PSNR over seeds at budget n (a plateau run that stopped
    before n returns what it returned at its stop) is set against breaching's median PSNR at N; n* is the least
    budget where it reaches it, timed at giaudit's median s/it, against breaching's median wall time.
    """
    print("\n# typical run (median over the seeds both libraries ran): giaudit's median returned PSNR at budget n "
          "vs breaching's median at N")
    print(f"{'case':<12} {'variant':>8} {'seeds':>5} {'brch dB':>8} {'brch s':>7} {'gia dB':>7} {'n*':>6} "
          f"{'gia s':>7} {'speed-up':>8}")
    for case in cases:
        for var in variants:
            keys = [(_breaching_key(case, s, n, _threads(var)), f"giaudit|{case}|{s}|{n}|{var}") for s in seeds]
            pairs = [(data[b], data[g]) for b, g in keys if b in data and g in data]
            if not pairs:
                continue
            target = statistics.median(b["psnr"] for b, _ in pairs)
            brch_s = statistics.median(b["wall_s"] for b, _ in pairs)
            runs = [g for _, g in pairs]
            s_it = statistics.median(g["s_per_it"] for g in runs)
            nstar = first_budget_reaching(runs, target)
            t = nstar * s_it if nstar else float("nan")
            sp = brch_s / t if nstar else 0.0
            end = _median_at(runs, _budgets(runs)[-1])
            print(f"{case:<12} {var:>8} {len(pairs):>5} {target:>8.2f} {brch_s:>7.0f} {end:>7.2f} "
                  f"{nstar or '-':>6} {(f'{t:.0f}' if nstar else '-'):>7} "
                  f"{(f'{sp:.2f}' if nstar else 'never'):>8}  {'MET' if sp >= 2.0 else 'missed'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="resnet18:1,convnet:1", help="comma list of model:batch")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="p50,p100",
                   help="comma list of giaudit variants: pN plateau with patience N, sN the paper's steps schedule "
                        "at budget N")
    p.add_argument("--iterations", type=int, default=2000, help="breaching's budget N")
    p.add_argument("--cap-factor", type=float, default=2.0, help="giaudit runs at most this times N")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--tv-weight", type=float, default=1e-4)
    p.add_argument("--bn-mode", choices=("train", "eval"), default="eval")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="single-threaded jobs at once")
    p.add_argument("--out", type=Path, required=True, help="JSON of every job (read back to resume)")
    p.add_argument("--report-only", action="store_true", help="print the table from --out, run nothing")
    args = p.parse_args(argv)
    cases = [f"{name}:{b}" for name, b in parse_cases(p, "--cases", args.cases)]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if not args.report_only:  # a report may name variants of older commits (p50h400)
        for var in variants:
            parse_variant(var)
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    common = {"n": args.iterations, "lr": args.lr, "tv": args.tv_weight, "bn_mode": args.bn_mode,
              "cap": int(math.ceil(args.cap_factor * args.iterations))}
    # A job's key names its case, seed, N and variant; the rest of the recipe is the file's, so a resume with
    # another recipe would mix runs of two problems in one table.
    recipe = {k: common[k] for k in ("lr", "tv", "bn_mode", "cap")}
    for k, v in data.setdefault("recipe", recipe).items():
        if recipe[k] != v:
            raise SystemExit(f"{args.out}: its jobs were run with {k} = {v!r}, this command asks for {recipe[k]!r}; "
                             "pass the same options or another --out")
    specs = []
    for case in cases:  # breaching first: the long jobs start early and keep both cores busy
        for seed in seeds:
            for threads in sorted({_threads(var) for var in variants}):
                specs.append({**common, "kind": "breaching", "case": case, "seed": seed, "threads": threads,
                              "key": _breaching_key(case, seed, args.iterations, threads)})
    for case in cases:
        for seed in seeds:
            for var in variants:
                specs.append({**common, "kind": "giaudit", "case": case, "seed": seed, "variant": var,
                              "threads": _threads(var), "key": f"giaudit|{case}|{seed}|{args.iterations}|{var}"})
    todo = [s for s in specs if s["key"] not in data]
    if todo and not args.report_only:
        cores, most = os.cpu_count() or 1, max(s["threads"] for s in todo)
        if most > cores:
            raise SystemExit(f"--variants: a job needs {most} cores, this machine has "
                             f"{cores}; use rK or tT with K, T <= {cores}")
        print(f"# {len(todo)} jobs to run ({len(specs) - len(todo)} done); single-threaded ones {args.workers} at "
              "once, the others (rK, tT and breaching on as many threads) alone", flush=True)

        def done(key: str, result: dict[str, Any]) -> None:
            data[key] = result
            atomic_write_text(args.out, json.dumps(data, indent=1))
            print(f"# done {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()
                                              if isinstance(v, float)), flush=True)

        with mp.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
            for key, result in pool.imap_unordered(_job, [s for s in todo if s["threads"] == 1]):
                done(key, result)
        for spec in (s for s in todo if s["threads"] > 1):
            done(*_run_alone(spec))
    report(data, cases, seeds, variants, args.iterations)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
