"""Utility that converges: the demo scenario's no-defense baseline and DP-SGD's price, with intervals.

    python benchmarks/utility_convergence.py [--config CFG] [--seeds 1] [--presets defenses/dpsgd-eps1.toml ...]
                                             [--write-cache giaudit/assets/utility]

Prints, per preset and seed: held-out accuracy with its Wilson 95 % interval, rounds, wall time and, for
DP-SGD, the epsilon Opacus's accountant gives for exactly that run. `--write-cache DIR` also stores every
entry there (ship DIR = giaudit/assets/utility so `giaudit demo` / `compare` find them without training).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from giaudit.config import demo_config_path, load_config
from giaudit.defenses import load_defense_file
from giaudit.utility import UtilityCache, UtilitySettings, baseline, run_utility, with_dp_rounds

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(demo_config_path()))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--presets", nargs="*", default=[str(REPO / "defenses" / "dpsgd-eps1.toml"),
                                                      str(REPO / "defenses" / "dpsgd-eps8.toml")])
    ap.add_argument("--write-cache", help="also write every entry into this folder")
    ap.add_argument("--max-rounds", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, help="each training client's batch (default: the scenario's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    spec = load_config(args.config)
    settings = UtilitySettings(max_rounds=args.max_rounds, batch_size=args.batch_size)
    cache = UtilityCache(Path(args.write_cache).parent / "_bench" if args.write_cache else None)
    if args.write_cache:
        cache.write_dirs.insert(0, Path(args.write_cache))
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    rounds, base = baseline(spec, seeds, settings, cache)
    batch = args.batch_size or "of the scenario"
    print(f"baseline: {rounds} rounds x {settings.clients} clients (batch {batch}), "
          f"{time.perf_counter() - t0:.0f} s wall")
    for seed, r in base.items():
        print(f"  none seed {seed}: acc {r['accuracy']:.3f} [{r['accuracy_low']:.3f}, {r['accuracy_high']:.3f}] "
              f"after {r['rounds']} rounds ({r['train_s']:.0f} s{', cached' if r['cached'] else ''}); "
              f"curve {[(k, round(a, 3)) for k, a in r['curve'][::4]]}", flush=True)
    for path in args.presets:
        label, tables = load_defense_file(path)
        for seed in seeds:
            r = run_utility(spec, with_dp_rounds(tables, rounds), seed, settings, rounds=rounds, cache=cache)
            eps = "" if r["epsilon"] is None else f", epsilon {r['epsilon']:.3f} (delta {r['delta']:g})"
            sp = next(iter(r["spent"].values()), {})
            extra = (f", sigma {sp['dp_noise_multiplier']:.3f}, rate {sp['dp_sample_rate']:.2e}, "
                     f"{sp['dp_steps']} steps" if sp else "")
            print(f"  {label} seed {seed}: acc {r['accuracy']:.3f} [{r['accuracy_low']:.3f}, "
                  f"{r['accuracy_high']:.3f}], drop {base[seed]['accuracy'] - r['accuracy']:.3f} "
                  f"({r['train_s']:.0f} s{', cached' if r['cached'] else ''}){eps}{extra}", flush=True)


if __name__ == "__main__":
    main()
