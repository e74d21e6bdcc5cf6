"""Benchmark of the generative-prior attacks (GIAS, GI-z, GIML, GGL) against IG.

Measures, on this machine:
1. time-to-quality on MNIST-5k (32 px, ReLU LeNet, batch 1 and 4): PSNR/SSIM
   and wall time of each attack at growing iteration budgets, client batches
   drawn from images the shipped prior never saw (index % 5 == 0);
2. GIML: reconstruction quality as meta-learning proceeds (GIAS with the
   generator after k meta steps), beside GIAS with the untrained generator;
3. the CMA-ES population: one batched torch.func evaluation vs a Python loop;
4. faces (only when ../shared/data/utkface64 exists): a small prior trained
   here on UTKFace (never saved into the repository), GIAS vs IG.

Evaluation (PSNR/SSIM against the truth) happens here, never inside an attack.
Timings on a shared 2-core CPU are noisy.

Quick check:  python benchmarks/priors_speed.py --quick
Full run:     python benchmarks/priors_speed.py --out reports/priors_speed.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from giaudit.attacks.base import Budget  # noqa: E402
from giaudit.attacks.ggl import GGL, functional_update_fn  # noqa: E402
from giaudit.attacks.gias import GIAS  # noqa: E402
from giaudit.attacks.giml import GIML  # noqa: E402
from giaudit.attacks.ig import InvertingGradients  # noqa: E402
from giaudit.data import ImageDataset, load_folder, load_mnist5k  # noqa: E402
from giaudit.metrics.image import psnr, ssim  # noqa: E402
from giaudit.metrics.matching import match  # noqa: E402
from giaudit.priors import GeneratorConfig, load_prior, untrained_prior  # noqa: E402
from giaudit.priors.train import train_prior  # noqa: E402
from giaudit.scenario.client import Scenario  # noqa: E402
from giaudit.scenario.models import build_model  # noqa: E402
from giaudit.threat import threat_model  # noqa: E402
from giaudit.types import ClientProtocol  # noqa: E402

UTK = REPO.parent / "shared" / "data" / "utkface64"


def unseen(data: ImageDataset, mod: int = 5) -> ImageDataset:
    """Images the shipped prior was not trained on (train_main's holdout_mod)."""
    return data.subset(torch.arange(len(data))[torch.arange(len(data)) % mod == 0])


def scenario(pool: ImageDataset, batch: int, seed: int = 0) -> Scenario:
    c, h, _ = pool.spec.shape
    model = build_model("lenet_relu", channels=c, num_classes=pool.spec.num_classes, size=h,
                        generator=torch.Generator().manual_seed(seed))
    return Scenario(model, pool, ClientProtocol(), batch, threat_model(surrogate_data=True))


def score(rec: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    rec = rec[match(rec, truth)]
    return float(psnr(rec, truth).clamp(max=60).mean()), float(ssim(rec, truth).mean())


def run(attack: Any, obs: Any, truth: Any, iters: int, seed: int) -> dict[str, float]:
    t = time.perf_counter()
    r = attack.reconstruct(obs, budget=Budget(iterations=iters), rng=torch.Generator().manual_seed(seed))
    p, s = score(r.images, truth.images)
    return {"psnr": p, "ssim": s, "wall_s": time.perf_counter() - t}


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def time_to_quality(prior: Any, budgets: list[int], batches: list[int], cases: int) -> list[dict[str, Any]]:
    pool = unseen(load_mnist5k(size=32))
    out = []
    attacks = {"ig": lambda: InvertingGradients(), "gias_z": lambda: GIAS(prior=prior, mode="z"),
               "gias": lambda: GIAS(prior=prior), "ggl_cma": lambda: GGL(prior=prior, optimizer="cma"),
               "ggl_adam": lambda: GGL(prior=prior, optimizer="adam")}
    for b in batches:
        sc = scenario(pool, b)
        sims = [sc.simulate(generator=torch.Generator().manual_seed(500 + i)) for i in range(cases)]
        for name, make in attacks.items():
            for it in budgets:
                # CMA-ES budgets count generations of 50 candidates: give it a tenth of the iterations.
                n = max(2, it // 10) if name == "ggl_cma" else it
                row = mean([run(make(), o, t, n, i) for i, (o, t) in enumerate(sims)])
                out.append({"batch": b, "attack": name, "iterations": n, **row})
                print(f"  B={b} {name:9s} iters={n:5d}  PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.3f}  "
                      f"{row['wall_s']:6.2f} s", flush=True)
    return out


def giml_curve(meta_steps: int, every: int, iters: int, cases: int) -> dict[str, Any]:
    pool = unseen(load_mnist5k(size=32))
    sc = scenario(pool, 1)
    others = [sc.simulate(generator=torch.Generator().manual_seed(2000 + i))[0] for i in range(16)]
    targets = [sc.simulate(generator=torch.Generator().manual_seed(3000 + i)) for i in range(cases)]
    attack = GIML(meta_steps=meta_steps)
    curve: list[dict[str, float]] = []

    def on_step(step: int, prior: Any) -> None:
        if step % every == 0 or step == meta_steps:
            g = GIAS(prior=prior)
            row = mean([run(g, o, t, iters, i) for i, (o, t) in enumerate(targets)])
            curve.append({"meta_step": step, **row})
            print(f"  GIML meta step {step:3d}: GIAS PSNR {row['psnr']:.2f} dB SSIM {row['ssim']:.3f}", flush=True)

    t = time.perf_counter()
    attack.observe_many(others, on_step=on_step)
    untrained = GIAS(prior=untrained_prior(GeneratorConfig(latent_dim=attack.latent_dim, width=attack.width)))
    base = mean([run(untrained, o, t_, iters, i) for i, (o, t_) in enumerate(targets)])
    print(f"  GIAS, untrained generator: PSNR {base['psnr']:.2f} dB SSIM {base['ssim']:.3f}")
    return {"curve": curve, "untrained": base, "meta_losses": attack.meta_losses,
            "meta_wall_s": time.perf_counter() - t}


def population(reps: int, sizes: list[int]) -> list[dict[str, Any]]:
    pool = unseen(load_mnist5k(size=32))
    prior = load_prior("mnist32")
    out = []
    for b in sizes:
        obs, truth = scenario(pool, b).simulate(generator=torch.Generator().manual_seed(7))
        a = GGL(prior=prior)
        setup = a._setup(obs)
        fn = functional_update_fn(obs.model, a.protocol_for(obs))
        z = torch.randn((50, b, prior.config.latent_dim), generator=torch.Generator().manual_seed(0))
        row: dict[str, Any] = {"batch": b, "population": 50}
        for batched in (True, False):
            a.evaluate_population(obs, truth.labels, z, batched=batched, setup=setup, update_fn=fn)  # warm-up
            t = time.perf_counter()
            for _ in range(reps):
                a.evaluate_population(obs, truth.labels, z, batched=batched, setup=setup, update_fn=fn)
            row["batched_s" if batched else "looped_s"] = (time.perf_counter() - t) / reps
        row["speedup"] = row["looped_s"] / row["batched_s"]
        out.append(row)
        print(f"  CMA-ES population of 50, B={b}: batched {row['batched_s']*1e3:.0f} ms, "
              f"looped {row['looped_s']*1e3:.0f} ms ({row['speedup']:.1f}x)", flush=True)
    return out


def faces(steps: int, iters: int, cases: int, limit: int | None) -> dict[str, Any] | None:
    if not UTK.is_dir():
        print("  skipped: ../shared/data/utkface64 is absent")
        return None
    data = load_folder(UTK, size=32, label_parser="utkface", label_field="gender", limit=limit)
    idx = torch.arange(len(data))
    train = data.images[idx % 5 != 0]
    cfg = GeneratorConfig(size=32, channels=3, latent_dim=32, width=16)
    t = time.perf_counter()
    prior, _ = train_prior(train, steps=steps, config=cfg, seed=0, show_progress=False)
    prior.name, prior.training["data"] = "utkface32 (benchmark, not saved)", "utkface64"
    train_s = time.perf_counter() - t
    sc = scenario(data.subset(idx[idx % 5 == 0]), 1)
    sims = [sc.simulate(generator=torch.Generator().manual_seed(900 + i)) for i in range(cases)]
    res = {"prior_steps": steps, "prior_train_s": train_s, "train_images": int(train.shape[0])}
    for name, a in (("ig", InvertingGradients()), ("gias_z", GIAS(prior=prior, mode="z")), ("gias", GIAS(prior=prior))):
        res[name] = mean([run(a, o, tr, iters, i) for i, (o, tr) in enumerate(sims)])
        print(f"  faces {name:7s} PSNR {res[name]['psnr']:.2f} dB SSIM {res[name]['ssim']:.3f} "
              f"{res[name]['wall_s']:.2f} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs (numbers meaningless)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    q = a.quick
    prior = load_prior("mnist32")
    print(f"prior: {prior.describe()}")
    report: dict[str, Any] = {"prior": prior.describe(), "quick": q, "threads": a.threads}
    print("1. time-to-quality (MNIST-5k, ReLU LeNet)")
    report["time_to_quality"] = time_to_quality(prior, [10] if q else [50, 100, 200, 400],
                                                [1] if q else [1, 4], 1 if q else 4)
    print("2. GIML: quality as meta-learning proceeds")
    report["giml"] = giml_curve(2 if q else 30, 1 if q else 5, 10 if q else 200, 1 if q else 4)
    print("3. CMA-ES population: batched vs looped")
    report["population"] = population(1 if q else 5, [1] if q else [1, 4])
    print("4. faces (UTKFace, 32 px RGB)")
    report["faces"] = faces(5 if q else 2000, 10 if q else 300, 1 if q else 4, 200 if q else None)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
