"""Tuned against untuned: IG with options tuned on the server's own clients beside IG with its defaults.

    python benchmarks/tuning.py [--model lenet_relu|convnet] [--size 16] [--batch 4] [--iterations 100]
                                [--trials 12] [--surrogate 4] [--audited 8]

The audit attacks `--audited` clients (one seed, `scenario.clients_per_seed`) of `--batch` digits through the
model (ConvNet in BN eval mode); the tuned run first tunes IG's search space (lr, TV weight, schedule, label
method) over `--trials` trials on `--surrogate` clients simulated from the held-out split, then attacks the
same audited clients. Prints the median and mean PSNR over the audited images for both runs, the tuning's own
time on its own line, and the tuned options.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.orchestration.run import compute_records


def run(args: argparse.Namespace, tune: bool) -> tuple[list[float], dict, float]:
    attack = {"iterations": args.iterations}
    if tune:
        attack["tune"] = {"trials": args.trials, "clients": args.surrogate}
    raw = {"name": "bench-tune", "seeds": [0], "data": {"source": "digits", "size": args.size},
           "scenario": {"model": args.model, "batch_size": args.batch, "clients_per_seed": args.audited,
                        **({"bn_mode": "eval"} if args.model == "convnet" else {})},
           "attacks": {"ig": attack}, "output": {"lpips": False}}
    start = time.perf_counter()
    rec = compute_records(parse_config(raw), engine=LocalEngine(1))[0]
    return [float(p["psnr_db"]) for p in rec.per_image], dict(rec.tuning), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet_relu")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--surrogate", type=int, default=4)
    p.add_argument("--audited", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    base, _, t_base = run(args, tune=False)
    tuned, info, t_tuned = run(args, tune=True)
    print(f"{args.model} {args.size} px, batch {args.batch}, IG {args.iterations} it, {args.audited} audited clients "
          f"({len(base)} images)")
    print(f"  defaults: median PSNR {statistics.median(base):.2f} dB, mean {statistics.fmean(base):.2f} dB "
          f"({t_base:.0f} s)")
    print(f"  tuned:    median PSNR {statistics.median(tuned):.2f} dB, mean {statistics.fmean(tuned):.2f} dB "
          f"({t_tuned - info['time_s']:.0f} s attacking)")
    print(f"  tuning:   {info['time_s']:.0f} s, {info['trials']} trials on {info['clients']} surrogate clients; "
          f"surrogate mean PSNR {info['default']:.2f} -> {info['best']:.2f} dB; options {info['params']}")


if __name__ == "__main__":
    main()
