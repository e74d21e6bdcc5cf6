"""Every example of examples/ at its real budget, with the headline figure its top comment states.

    python benchmarks/examples.py [--only NAME[,NAME...]] [--quick] [--threads 1]

NAME: an example's file stem (``defended``, ``fedavg``, ``mnist_ig_batch4``, ``faces_folder``,
``user_level_digits``, ``diffusion_gidm``) or ``flower`` / ``flower_dp`` / ``flower_bn`` (the Flower app of
examples/flower/ is run first, as its README does, into a temporary folder, then its audit; needs the flower
extra). ``--quick`` runs 3
iterations and one restart of every attack on the first seed: it checks the script, not the figure.

Each example runs as written (its seeds, clients and attack budgets; nothing is written into examples/ or
reports/: the records are computed without a run folder). Printed per (defense, attack): PSNR over every
reconstructed image (mean with its bootstrap 95 % interval, and the most leaked image), mean SSIM, label
accuracy, and where the example measures them re-identification, the user-level PSNR and the attribute
accuracy; then the policy verdict when the example sets ``output.policy``, and the wall time.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from giaudit.aggregate import pooled, summarise
from giaudit.config import AuditSpec, load_config
from giaudit.orchestration.run import compute_records
from giaudit.policy import check, load_policy
from giaudit.results import AuditRecord

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FLOWER = {"flower": ("audit.toml", []), "flower_dp": ("audit.toml", ["--dp"]),
          "flower_bn": ("audit_bn.toml", ["--bn"])}


def names() -> list[str]:
    return sorted(f.stem for f in EXAMPLES.glob("*.toml") if f.stem != "policy") + sorted(FLOWER)


def quick(spec: AuditSpec) -> AuditSpec:
    tiny = {name: {**a.table, "iterations": 3, "restarts": 1} for name, a in spec.attacks.items()}
    return spec.replace(seeds=list(spec.seeds)[:1], attacks=tiny)


def flower_spec(name: str, work: Path) -> AuditSpec:
    """Run examples/flower/app.py into `work` (as its README does) and load the audit config beside it."""
    config, flags = FLOWER[name]
    app = EXAMPLES / "flower"
    for f in ("task.py", config):
        shutil.copy(app / f, work / f)
    captures = "captures-bn" if "--bn" in flags else "captures"
    done = subprocess.run([sys.executable, str(app / "app.py"), "--out", str(work / captures), *flags], cwd=work,
                          capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode:
        sys.exit(f"{name}: examples/flower/app.py failed:\n{done.stderr[-4000:]}")
    return load_config(work / config)


def fmt(v: Any, spec: str = ".2f") -> str:
    return format(float(v), spec) if v is not None and math.isfinite(float(v)) else "-"


def headline(records: list[AuditRecord]) -> list[str]:
    lines = []
    for row in summarise(records):
        recs = [r for r in records if (r.defense, r.attack) == (row["defense"], row["attack"])]
        parts = [f"PSNR mean {fmt(row['psnr_db_mean'])} dB [{fmt(row['psnr_db_ci_low'])}, "
                 f"{fmt(row['psnr_db_ci_high'])}], worst image {fmt(row['psnr_db_worst'])} dB",
                 f"SSIM mean {fmt(row['ssim_mean'], '.3f')}", f"labels {fmt(row['label_accuracy_mean'], '.2f')}"]
        if row.get("reid_n"):
            parts.append(f"re-identified {row['reid_hits']}/{row['reid_n']} among {row['reid_gallery_size']}")
        if any("user_psnr_db_mean" in r.metrics for r in recs):
            parts.append(f"user-level PSNR {fmt(pooled(recs, 'user_psnr_db_mean').mean)} dB")
        for key in sorted(k for k in row if k.startswith("attr_") and k.endswith("_accuracy")):
            parts.append(f"{key[5:-9]} inferred {fmt(row[key], '.2f')} (originals "
                         f"{fmt(row.get(key[:-9] + '_reference'), '.2f')})")
        if row.get("tuned"):
            parts.append(f"untuned PSNR mean {fmt(row['untuned_psnr_db_mean'])} dB")
        lines.append(f"  {row['defense']} / {row['attack']} ({row['images']} images): " + "; ".join(parts))
    return lines


def run(name: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix=f"giaudit-example-{name}-") as tmp:
        start = time.perf_counter()
        spec = flower_spec(name, Path(tmp)) if name in FLOWER else load_config(EXAMPLES / f"{name}.toml")
        if args.quick:
            spec = quick(spec)
        t0 = time.perf_counter()
        records = compute_records(spec)
        wall = time.perf_counter() - t0
        print(f"{name}: {spec.scenario.clients} client(s) x {len(spec.seeds)} seed(s), "
              + ", ".join(f"{a} {c.budget.iterations} it x {c.budget.restarts}" for a, c in spec.attacks.items()))
        for line in headline(records):
            print(line)
        if spec.output.policy:
            verdict = check(records, load_policy(spec.output.policy))
            failed = sorted({f"{r.metric}.{r.op}" for r in verdict.failures})
            print(f"  policy {Path(spec.output.policy).name}: {'PASS' if verdict.passed else 'FAIL'}"
                  + (f" (failed: {', '.join(failed)})" if failed else ""))
        app = f" (+ {t0 - start:.0f} s for the Flower app)" if name in FLOWER else ""
        print(f"  wall {wall:.0f} s{app}, {torch.get_num_threads()} thread(s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated example names (default: all): " + ", ".join(names()))
    p.add_argument("--quick", action="store_true", help="3 iterations, one restart, the first seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else names()
    unknown = [n for n in chosen if n not in names()]
    if unknown:
        p.error(f"--only: unknown example {unknown[0]!r}; known: {', '.join(names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in chosen:
        run(name, args)


if __name__ == "__main__":
    main()
