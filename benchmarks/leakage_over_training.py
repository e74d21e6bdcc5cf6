"""Leakage over training: IG on the demo's LeNet, attacking the client update taken at rounds of the federated
training (no defense), 8 private batches per checkpoint.

    python benchmarks/leakage_over_training.py [--checkpoints 0 50 200 800] [--iterations 500] [--clients 8]
                                               [--out /tmp/leakage]

Prints, per round: the model's held-out accuracy, IG's per-image PSNR (mean, bootstrap 95 % interval, 95th
percentile, worst) and label-recovery accuracy; writes the compare report (with the plot) into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from giaudit.compare import summarise
from giaudit.config import demo_config_path, load_config
from giaudit.orchestration import run_audit
from giaudit.report.compare import render_compare
from giaudit.utility import UtilitySettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[0, 50, 200, 800])
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default="/tmp/giaudit-leakage-over-training")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_config(demo_config_path())
    ig = {**base.attacks["ig"].table, "iterations": args.iterations}
    spec = base.replace(seeds=[0], attacks={"ig": ig}, scenario=dataclasses.replace(
        base.scenario, checkpoints=args.checkpoints, clients_per_seed=args.clients))
    t0 = time.perf_counter()
    store = run_audit(spec, Path(args.out) / "none", show_progress=False, defense_label="none",
                      training=UtilitySettings())
    rows = summarise(store.records, {}, ["none"], ["ig"])
    print(f"IG ({args.iterations} iterations) on {spec.name}, {args.clients} private batches per round, "
          f"{time.perf_counter() - t0:.0f} s")
    print("round  model acc  PSNR mean [95% CI]      p95    worst  label acc")
    for r in rows:
        print(f"{r['round']:>5}  {r['model_accuracy']:.3f}      {r['psnr_db_mean']:5.2f} [{r['psnr_db_ci_low']:5.2f}, "
              f"{r['psnr_db_ci_high']:5.2f}]  {r['psnr_db_p95']:5.2f}  {r['psnr_db_worst']:5.2f}  "
              f"{r['label_accuracy_mean']:.2f}")
    meta = {"scenario": store.records[0].scenario, "seeds": [0], "clients_per_seed": args.clients,
            "attacks": {"ig": ig}, "utility": UtilitySettings().as_dict(), "wall_s": time.perf_counter() - t0}
    print("report:", render_compare(rows, meta, Path(args.out)))


if __name__ == "__main__":
    main()
