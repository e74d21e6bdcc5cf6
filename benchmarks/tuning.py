"""Tuned against untuned: IG with options tuned on the server's own clients beside IG with its defaults.

    python benchmarks/tuning.py [--model lenet_relu|convnet] [--size 16] [--batch 4] [--iterations 100]
                                [--trials 12] [--surrogate 4] [--audited 8]

The audit attacks `--audited` clients (one seed, `scenario.clients_per_seed`) of `--batch` digits through the
model (ConvNet in BN eval mode); the tuned run first tunes IG's search space (lr, TV weight, schedule, label
method) over `--trials` trials on `--surrogate` clients simulated from the held-out split, then attacks the
same audited clients. Prints the median and mean PSNR over the audited images for both runs, the tuning's own
time on its own line, and the tuned options.

    python benchmarks/tuning.py --compare [--out reports/tuning-compare] [--policy-max 15] [...]

`giaudit compare`'s path (`giaudit.compare.run_compare`) on defenses/none.toml and defenses/noise-0.01.toml with
IG tuned under each preset (the same options as above), a short utility training (50 rounds, no target) and the
policy ``psnr_db_mean.max = --policy-max``: prints each preset's tuned and untuned PSNR, the options tuned under
it, and every rule that passed untuned and fails tuned; the comparison report is written to `--out`.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.orchestration.run import compute_records


def raw_config(args: argparse.Namespace, tune: bool) -> dict:
    attack: dict = {"iterations": args.iterations}
    if tune:
        attack["tune"] = {"trials": args.trials, "clients": args.surrogate}
    return {"name": "bench-tune", "seeds": [0], "data": {"source": "digits", "size": args.size},
            "scenario": {"model": args.model, "batch_size": args.batch, "clients_per_seed": args.audited,
                         **({"bn_mode": "eval"} if args.model == "convnet" else {})},
            "threat": {"surrogate_data": True}, "attacks": {"ig": attack}, "output": {"lpips": False}}


def compare(args: argparse.Namespace) -> None:
    """none vs noise-0.01 with IG tuned under each, judged by psnr_db_mean.max = --policy-max."""
    import tomli_w

    from giaudit.compare import run_compare
    from giaudit.engine import LocalEngine
    from giaudit.policy import check, load_policy
    from giaudit.results import load_results
    from giaudit.utility import UtilitySettings

    repo = Path(__file__).resolve().parents[1]
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        config, policy = Path(tmp) / "tuned.toml", Path(tmp) / "policy.toml"
        config.write_text(tomli_w.dumps(raw_config(args, tune=True)))
        policy.write_text(f"[rules]\npsnr_db_mean.max = {args.policy_max:g}\n")
        start = time.perf_counter()
        run_compare([repo / "defenses" / "none.toml", repo / "defenses" / "noise-0.01.toml"], base_config=config,
                    seeds=1, out_dir=out, show_progress=False, engine=LocalEngine(1), policy=policy,
                    utility=UtilitySettings(max_rounds=50, target_accuracy=None, eval_every=50))
        wall = time.perf_counter() - start
        records = [r for label in ("none", "noise-0.01") for r in load_results(out / label).records]
        verdict = check(records, load_policy(policy))
    from giaudit.aggregate import summarise
    for row in summarise(records):
        print(f"  {row['defense']:>10} / ig: tuned PSNR mean {row['psnr_db_mean']:.2f} dB (worst "
              f"{row['psnr_db_worst']:.2f}), untuned {row['untuned_psnr_db_mean']:.2f} dB (worst "
              f"{row['untuned_psnr_db_worst']:.2f}); {row['images']} images; tuned {row['tuning_s']:.0f} s: "
              f"{row['tuned_options']}")
    for line in verdict.flip_lines() or ["no rule passed untuned and fails tuned"]:
        print(f"  {line}")
    print(f"  compare wall {wall:.0f} s; report {out / 'compare.html'}")


def run(args: argparse.Namespace, tune: bool) -> tuple[list[float], dict, float]:
    raw = raw_config(args, tune)
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
    p.add_argument("--compare", action="store_true", help="giaudit compare on none vs noise-0.01, tuned under each")
    p.add_argument("--out", default="reports/tuning-compare", help="--compare: the comparison's folder")
    p.add_argument("--policy-max", type=float, default=15.0, help="--compare: psnr_db_mean.max of the policy")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.compare:
        print(f"compare: {args.model} {args.size} px, batch {args.batch}, IG {args.iterations} it tuned "
              f"({args.trials} trials on {args.surrogate} surrogate clients) under each preset, "
              f"{args.audited} audited clients")
        compare(args)
        return
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
