"""Sweep throughput: cells per minute for serial, local with N processes and Ray with N CPUs, on one sweep.

    python benchmarks/sweep_throughput.py [--workers 2] [--seeds 4] [--iterations 100] [--compare-unbatched]
        [--model lenet_relu] [--size 16] [--no-dlg] [--no-ray] [--growth 16,64,256 [--batch-cells auto]]

The sweep is 2 defenses (none, noise 0.01) x 2 attacks (IG, DLG) x S seeds on 16 px digits through the ReLU
LeNet (`--model`, `--size`: another built-in model or image size, e.g. the compute-bound `resnet18` at 32 px).
Serial runs the cells one after the other in this process, single-threaded (the unit of work every engine's
workers use); scaling efficiency = (engine throughput / serial throughput) / N. Ray's figure includes
starting the local instance (about 10 s here), which a long sweep amortises. Each engine writes its own run
folders; the records are checked to agree.

`--growth 16,64,256` measures how cost grows with the work instead: for each number of cells (seeds chosen to
make it), the wall time of serial (up to `--serial-up-to` cells), of the local engine and of Ray (one Ray
instance started once and reused: its start is printed on its own line), the cost per cell, a least-squares
fit wall = a + b cells per engine, Ray's throughput relative to the local engine's, and the largest resident
memory of one worker process of each engine. `--batch-cells auto` runs the growth with stacked cells.
`--repeat R` runs R rounds over the sizes, interleaved, and reports each point's median and range (a sweep of
10-20 s varies by up to 1.5x run to run on a shared machine, so one run cannot show a 10 % growth).

`--compare-unbatched` adds the local engine with ``[run] batch_cells = "auto"`` (the cells of one attack and
its options, across defenses and seeds, stacked into solves, `giaudit.attacks.batched`) beside the same engine
unbatched, in the same run, with the mean and largest |ΔPSNR| between their records per attack (IG agrees
record by record to the stated tolerance; DLG's L-BFGS agrees in distribution, so its mean PSNR over records
is printed for both).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from giaudit.config import parse_config
from giaudit.engine import LocalEngine, RayEngine
from giaudit.orchestration.run import run_audits


def sweep(seeds: int, iterations: int, batch_cells: str | int | None = None, dlg: bool = True,
          model: str = "lenet_relu", size: int = 16) -> list:
    base = {"name": "bench", "seeds": list(range(seeds)), "data": {"source": "digits", "size": size},
            "scenario": {"model": model, "protocol": "fedsgd", "batch_size": 1},
            "threat": {"batch_size": True},
            "attacks": {"ig": {"iterations": iterations}, **({"dlg": {"iterations": 5}} if dlg else {})},
            "output": {"lpips": False}, **({"run": {"batch_cells": batch_cells}} if batch_cells else {})}
    return [parse_config(base), parse_config({**base, "defenses": [{"name": "noise", "sigma": 0.01}]})]


def run(engine, specs, root: Path) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    records = []
    with engine:  # the defenses' cells as one stream, as `giaudit compare` runs its presets
        for store in run_audits([(spec, root / f"d{i}", None) for i, spec in enumerate(specs)],
                                show_progress=False, engine=engine):
            records += store.records
    return time.perf_counter() - t0, len(records), records


def run_serial(specs, root: Path) -> tuple[float, int, list]:
    """`run` in this process, single-threaded: the unit of work every engine's workers use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(LocalEngine(1), specs, root)
    finally:
        torch.set_num_threads(threads)


def ray_worker_peak_mib() -> float:
    """The largest peak resident memory (VmHWM) of this machine's Ray worker processes, read from /proc."""
    peak = 0.0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            cmd = (status.parent / "cmdline").read_bytes()
            if b"default_worker.py" not in cmd and not cmd.startswith(b"ray::"):
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def growth(sizes: list[int], workers: int, iterations: int, dlg: bool, ray: bool, serial_up_to: int,
           batch_cells: str | int | None, model: str, size: int, repeat: int = 1) -> None:
    per_seed = 2 * (2 if dlg else 1)  # cells per seed: 2 defenses x the attacks
    walls: dict[tuple[str, int], list[float]] = {}

    def measured(name: str, cells: int, wall: float, extra: str = "") -> None:
        walls.setdefault((name, cells), []).append(wall)
        print(f"{name:6} {cells} cells: {wall:.1f} s ({wall / cells:.3f} s/cell){extra}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ray_engine = None
        if ray:
            t0 = time.perf_counter()
            ray_engine = RayEngine(num_cpus=workers).__enter__()
            print(f"ray start: {time.perf_counter() - t0:.1f} s (paid once per session)")
        try:
            # Rounds interleave the sizes (64, 256, 64, 256, ...) so a slow spell of a shared machine lands on
            # every size rather than on one; the table takes each point's median.
            for r in range(repeat):
                if repeat > 1:
                    print(f"-- round {r + 1} of {repeat}")
                for n in sizes:
                    seeds = max(1, n // per_seed)
                    specs = sweep(seeds, iterations, batch_cells, dlg=dlg, model=model, size=size)
                    if n <= serial_up_to:
                        wall, cells, _ = run_serial(specs, root / f"serial-{n}-{r}")
                        measured("serial", cells, wall)
                    wall, cells, _ = run(LocalEngine(workers), specs, root / f"local-{n}-{r}")
                    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                    measured("local", cells, wall, f"; largest worker {rss:.0f} MiB")
                    if ray_engine is not None:
                        local_wall = wall
                        wall, cells, _ = run(ray_engine, specs, root / f"ray-{n}-{r}")
                        measured("ray", cells, wall, f"; largest worker {ray_worker_peak_mib():.0f} MiB; "
                                 f"{local_wall / wall:.2f}x local's throughput")
        finally:
            if ray_engine is not None:
                import ray as ray_module

                ray_module.shutdown()
    print(f"\n| engine | cells | wall s (median of {repeat}) | range | s / cell |\n|---|---:|---:|---:|---:|")
    medians = {key: statistics.median(v) for key, v in walls.items()}
    for (name, cells), v in walls.items():
        print(f"| {name} | {cells} | {medians[name, cells]:.1f} | {min(v):.1f}-{max(v):.1f} | "
              f"{medians[name, cells] / cells:.3f} |")
    for (name, cells), wall in medians.items():
        if name == "ray" and ("local", cells) in medians:
            print(f"ray / local throughput at {cells} cells: {medians['local', cells] / wall:.2f}x (medians)")
    for name in sorted({key[0] for key in medians}):
        pts = sorted((c, w) for (e, c), w in medians.items() if e == name)
        if len(pts) >= 2:
            mc = sum(c for c, _ in pts) / len(pts)
            mw = sum(w for _, w in pts) / len(pts)
            b = sum((c - mc) * (w - mw) for c, w in pts) / sum((c - mc) ** 2 for c, _ in pts)
            a = mw - b * mc
            changes = ", ".join(f"{c1} vs {c0} cells {(w1 / c1) / (w0 / c0) - 1:+.0%}"
                                for (c0, w0), (c1, w1) in zip(pts, pts[1:]))
            print(f"{name}: wall = {a:.1f} s + {b:.3f} s x cells; cost per cell {changes}; "
                  f"10 000 cells would take about {(a + b * 10_000) / 60:.0f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--compare-unbatched", action="store_true", help="add the local engine with stacked cells")
    p.add_argument("--no-dlg", action="store_true", help="IG cells only")
    p.add_argument("--model", default="lenet_relu", help="a built-in model, e.g. resnet18")
    p.add_argument("--size", type=int, default=16, help="image size in pixels")
    p.add_argument("--growth", default="", help="comma-separated cell counts, e.g. 16,64,256")
    p.add_argument("--serial-up-to", type=int, default=256, help="with --growth: serial runs up to this many cells")
    p.add_argument("--batch-cells", default=None, help='with --growth: [run] batch_cells, e.g. "auto"')
    p.add_argument("--repeat", type=int, default=1, help="with --growth: rounds over the sizes; medians are reported")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.growth:
        batch = int(args.batch_cells) if args.batch_cells and args.batch_cells.isdigit() else args.batch_cells
        growth([int(v) for v in args.growth.split(",")], args.workers, args.iterations, not args.no_dlg,
               not args.no_ray, args.serial_up_to, batch, args.model, args.size, args.repeat)
        return
    specs = sweep(args.seeds, args.iterations, dlg=not args.no_dlg, model=args.model, size=args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wall, n, ref = run_serial(specs, root / "serial")
        rows.append(("serial (1 process, 1 thread)", wall, n))
        wall, n, local = run(LocalEngine(args.workers), specs, root / "local")
        rows.append((f"local, {args.workers} processes", wall, n))
        if args.compare_unbatched:
            stacked_specs = sweep(args.seeds, args.iterations, "auto", dlg=not args.no_dlg, model=args.model,
                                  size=args.size)
            wall, n, stacked = run(LocalEngine(args.workers), stacked_specs, root / "stacked")
            rows.append((f"local, {args.workers} processes, batch_cells auto", wall, n))
            mine = {(r.defense, r.attack, r.seed): r for r in local}
            every = [abs(mine[(b.defense, b.attack, b.seed)].metrics["psnr_db_mean"] - b.metrics["psnr_db_mean"])
                     for b in stacked]
            print(f"stacked vs unbatched records (all attacks): mean |dPSNR| {sum(every) / len(every):.3f} dB over "
                  f"{len(every)} records")
            for attack in sorted({r.attack for r in stacked}):
                pairs = [(mine[(b.defense, b.attack, b.seed)].metrics["psnr_db_mean"], b.metrics["psnr_db_mean"])
                         for b in stacked if b.attack == attack]
                gaps = [abs(x - y) for x, y in pairs]
                sizes = sorted({int(b.trace.get("stacked", 1)) for b in stacked if b.attack == attack})
                print(f"stacked vs unbatched records ({attack}): mean |dPSNR| {sum(gaps) / len(gaps):.3f} dB, "
                      f"max {max(gaps):.3f} dB over {len(gaps)} records; mean PSNR "
                      f"{sum(x for x, _ in pairs) / len(pairs):.2f} unbatched, "
                      f"{sum(y for _, y in pairs) / len(pairs):.2f} stacked; problems per solve {sizes}")
        engines = [] if args.no_ray else [(f"ray, {args.workers} CPUs (incl. start)", RayEngine(
            num_cpus=args.workers))]
        for name, engine in engines:
            wall, n, on_ray = run(engine, specs, root / "ray")
            rows.append((name, wall, n))
            same = all(abs(a.metrics["psnr_db_mean"] - b.metrics["psnr_db_mean"]) < 1e-6 for a, b in zip(ref, on_ray))
            print(f"ray records agree with serial: {same}")
        print(f"local records agree with serial: "
              f"{all(abs(a.metrics['psnr_db_mean'] - b.metrics['psnr_db_mean']) < 1e-6 for a, b in zip(ref, local))}")
    serial_rate = rows[0][2] / rows[0][1] * 60
    attacks = "IG" if args.no_dlg else "2 attacks"
    print(f"\nsweep: 2 defenses x {attacks} x {args.seeds} seeds = {rows[0][2]} cells, IG {args.iterations} "
          f"iterations, DLG 5, {args.size} px digits, {args.model}; {os.cpu_count()} CPUs\n")
    print("| engine | wall s | cells/min | speed-up | scaling efficiency |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, n in rows:
        rate = n / wall * 60
        workers = 1 if name.startswith("serial") else args.workers
        print(f"| {name} | {wall:.1f} | {rate:.1f} | {rate / serial_rate:.2f}x | {rate / serial_rate / workers:.0%} |")


if __name__ == "__main__":
    main()
