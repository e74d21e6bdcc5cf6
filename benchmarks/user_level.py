"""User-level leakage on digits: DiffULA against IG and GIAS on the same user batches (a script, not a test).

Seed 003's setting, made so labels do not give the answer away: the federated task is a digit's parity; each
user holds `--batch` images of one digit (the private attribute); the model is an untrained LeNet per user.
Every attack attacks the same FedSGD update. Per attack and batch size it prints:
- digit: how often the user's digit is read right (DiffULA: its representative image; IG/GIAS: the majority
  vote of their reconstructions), by a classifier trained on held-out digits; chance is 1/5 within a parity;
- the image metrics both ways: Hungarian pairs (`psnr_db_mean`, `ssim_mean`) and every pair (`user_`);
- seconds per user.

    PYTHONPATH=. python benchmarks/user_level.py --users 20 --batches 16,32 --iterations 60 --json out.json

The users, the models and the attack starts are seeded, so a rerun gives the same table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from giaudit.attacks import Budget, build_attack
from giaudit.data import digit_user, load_mnist5k
from giaudit.io import atomic_write_text
from giaudit.metrics import evaluate, load_lpips
from giaudit.priors.quality import digit_classifier
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, GroundTruth

ATTACKS = {"diffula": {"t_min": 300, "denoise_steps": 10}, "ig": {}, "gias": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    data = load_mnist5k(size=32)
    pool = torch.arange(0, len(data), 5)  # the audit pool: no prior saw it
    clf_idx, user_idx = pool[(pool // 5) % 2 == 0], pool[(pool // 5) % 2 == 1]
    clf = digit_classifier(data.images[clf_idx], data.labels[clf_idx], steps=300)
    lpips = load_lpips()
    if not lpips.available:
        print(f"({lpips.reason})")
    attacks = {name: build_attack(name, **ATTACKS.get(name, {})) for name in a.attacks.split(",")}
    rows = []
    for bs in (int(b) for b in a.batches.split(",")):
        per: dict[str, list[dict[str, float]]] = {name: [] for name in attacks}
        for u in range(a.users):
            digit = u % 10
            g = torch.Generator().manual_seed(u)
            user = digit_user(data, user_idx, digit, bs, g)
            model = build_model("lenet_relu", channels=1, num_classes=2, size=32,
                                generator=torch.Generator().manual_seed(1000 + u))
            obs, truth = Scenario(model, user, ClientProtocol(), bs, threat_model(surrogate_data=True)).simulate(
                generator=g)
            for name, attack in attacks.items():
                t0 = time.perf_counter()
                rec = attack.reconstruct(obs, budget=Budget(iterations=a.iterations),
                                         rng=torch.Generator().manual_seed(u))
                secs = time.perf_counter() - t0
                with torch.no_grad():
                    votes = torch.bincount(clf(rec.images.clamp(0, 1)).argmax(1), minlength=10)
                ev = evaluate(rec, GroundTruth(truth.images, truth.labels), lpips=lpips, user_level=True)
                per[name].append({"digit_right": float(int(votes.argmax()) == digit), "s": secs,
                                  **{k: v for k, v in ev.aggregate.items() if k.endswith("_mean")}})
            print(f"batch {bs} user {u} (digit {digit}): " + ", ".join(
                f"{n} {'right' if per[n][-1]['digit_right'] else 'wrong'}" for n in attacks), flush=True)
        for name, vals in per.items():
            row = {"attack": name, "batch": bs, "users": len(vals)}
            for k in vals[0]:
                row[k] = statistics.fmean(v[k] for v in vals)
            rows.append(row)
        if a.json:
            atomic_write_text(Path(a.json), json.dumps({"iterations": a.iterations, "rows": rows}, indent=2))
    keys = ["psnr_db_mean", "user_psnr_db_mean", "ssim_mean", "user_ssim_mean", "lpips_mean", "user_lpips_mean"]
    print(f"\n{'attack':>8} {'batch':>5} {'digit':>6} " + " ".join(f"{k:>18}" for k in keys) + f" {'s/user':>7}")
    for r in rows:
        print(f"{r['attack']:>8} {r['batch']:>5} {r['digit_right']:6.2f} "
              + " ".join(f"{r[k]:18.3f}" if k in r else f"{'-':>18}" for k in keys) + f" {r['s']:7.1f}")


if __name__ == "__main__":
    main()
