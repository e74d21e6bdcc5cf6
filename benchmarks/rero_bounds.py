"""Measured attack success against the DP bound on any attacker, at three noise levels of DP-SGD and of clip + noise.

The demo's scenario (MNIST digits, untrained LeNet, FedSGD, batch 1) with Inverting Gradients and GIAS (the
shipped mnist32 prior) under no defense, DP-SGD (clip 1, noise multiplier 0.1 / 0.3 / 1.0) and clip 1 +
Gaussian noise (σ = 0.01 / 0.1 / 1.0), over `--seeds` seeds. Every (defense, attack) row of the one
aggregation (`giaudit.aggregate.summarise` with the run's bounds context) gives, per success criterion
(digit inferred by the shipped classifier, reconstructed within 20 dB PSNR), the DP bound on the audited
update, the share of images the attack reached with its 95 % Clopper-Pearson interval, the alarm (lower bound
above the bound) and the empirical μ. The script exits 1 when any alarm is raised.

`--active` adds a malicious server's rows: the imprint attack (Robbing the Fed, threat class G: the server
serves a model with an imprint block and reads each image alone in its bin exactly) under the same defenses,
whose DP guarantee holds for the served model as for the agreed one. `--no-passive` runs only those.

    python benchmarks/rero_bounds.py --seeds 4 --out /tmp/rero [--ig-iterations 300 --gias-iterations 150]
    python benchmarks/rero_bounds.py --seeds 16 --active --no-passive --out /tmp/rero-active
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from giaudit.aggregate import summarise
from giaudit.bounds import bounds_context
from giaudit.config import demo_config_path, load_config, shipped_digit_classifier
from giaudit.demo import ACTIVE_ATTACKS, active_spec
from giaudit.engine import LocalEngine
from giaudit.orchestration import run_audit
from giaudit.results import load_results

DEFENSES = {
    "none": [],
    **{f"dpsgd-{s:g}": [{"name": "dpsgd", "max_grad_norm": 1.0, "noise_multiplier": s}] for s in (0.1, 0.3, 1.0)},
    **{f"clip-noise-{s:g}": [{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": s}]
       for s in (0.01, 0.1, 1.0)},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--ig-iterations", type=int, default=300)
    ap.add_argument("--gias-iterations", type=int, default=150)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="/tmp/rero-bounds")
    ap.add_argument("--active", action="store_true", help="add the imprint attack (a malicious server)")
    ap.add_argument("--no-passive", action="store_true", help="skip IG and GIAS")
    a = ap.parse_args()
    base = load_config(demo_config_path())
    spec = base.replace(seeds=list(range(a.seeds)),
                        attacks={"ig": {**base.attacks["ig"].table, "iterations": a.ig_iterations},
                                 "gias": {**base.attacks["gias"].table, "iterations": a.gias_iterations}},
                        output=dataclasses.replace(base.output, lpips=False, policy=None,
                                                   attributes={"digit": str(shipped_digit_classifier())}))
    specs = ([] if a.no_passive else [spec]) + ([active_spec(spec)] if a.active else [])
    start = time.perf_counter()
    for one in specs:
        for label, tables in DEFENSES.items():
            run_audit(one.replace(defenses=tables), a.out, defense_label=label, show_progress=False,
                      engine=LocalEngine(a.workers))
            print(f"{label} ({', '.join(one.attacks)}): done ({time.perf_counter() - start:.0f} s)", flush=True)
    store = load_results(a.out)
    context = bounds_context({"config": spec.raw})
    rows = summarise(store.records, context=context)
    alarms = 0
    out = []
    width = max(5, *(len(name) for name in ACTIVE_ATTACKS))
    print(f"\n{'defense':<16} {'attack':<{width}} {'criterion':<34} {'kappa':>6} {'bound':>6} {'reached':>9} "
          f"{'CP 95 %':>15} {'alarm':>5} {'mu_hat':>6}")
    for r in rows:
        for k in str(r["rero_criteria"]).split(","):
            p = f"rero_{k}_"
            alarms += bool(r[p + "alarm"])
            out.append({"defense": r["defense"], "attack": r["attack"], "criterion": r[p + "label"],
                        "kappa": r[p + "kappa"], "bound": r[p + "bound"], "hits": r[p + "hits"], "n": r[p + "n"],
                        "low": r[p + "low"], "high": r[p + "high"], "alarm": r[p + "alarm"], "mu_hat": r[p + "mu"]})
            print(f"{r['defense']:<16} {r['attack']:<{width}} {r[p + 'label']:<34} {r[p + 'kappa']:6.3f} "
                  f"{r[p + 'bound']:6.3f} {r[p + 'hits']:>4}/{r[p + 'n']:<4} "
                  f"[{r[p + 'low']:.3f}, {r[p + 'high']:.3f}] {'YES' if r[p + 'alarm'] else 'no':>5} "
                  f"{r[p + 'mu']:6.2f}")
    print(f"\nkappa (PSNR): {context.psnr_kappa.how if context.psnr_kappa else context.note}")
    print(f"alarms: {alarms}; wall {time.perf_counter() - start:.0f} s")
    Path(a.out, "rero_bounds.json").write_text(json.dumps(out, indent=1))
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
