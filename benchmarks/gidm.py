"""GIDM and GIDM+ on the shipped trained MNIST DDPM as the federated model (a benchmark, not a test).

Scenario: as examples/diffusion_gidm.toml: one MNIST digit of the audit pool (never seen by the prior), FedSGD
on the shipped mnist32_ddpm UNet (the paper's well-trained global model, also GIDM's sampler); the client
draws its own t and eps. GIDM is given them (the server fixed them); GIDM+ estimates them; the baseline is
pixel-only inversion at a wrong timestep (t_true + 500 mod 1000) with random noise, at GIDM+'s number of
update evaluations. Restarts are ranked (and halved) by the attack's own matching loss only; PSNR against
the client's digit is computed afterwards, for this report.

Per seed it prints PSNR, seconds per image, the final matching loss, the iterations the restarts ran in all,
and for GIDM+ the estimated vs true t.

    PYTHONPATH=. python benchmarks/gidm.py --seeds 5 --latent 40 --pixel 400 --restarts 4 --halving 40
"""
from __future__ import annotations

import argparse
import time

import torch

from giaudit.attacks.base import Budget
from giaudit.attacks.gidm import GIDM
from giaudit.attacks.gidm_plus import GIDMPlus
from giaudit.data import load_mnist5k
from giaudit.metrics.image import psnr
from giaudit.priors.ddpm import load_ddpm
from giaudit.scenario.diffusion import DiffusionScenario
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--latent", type=int, default=40)
    ap.add_argument("--pixel", type=int, default=400)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--halving", type=int, default=None)
    ap.add_argument("--sampler-steps", type=int, default=4)
    ap.add_argument("--latent-lr", type=float, default=0.05)
    ap.add_argument("--pixel-lr", type=float, default=0.02)
    ap.add_argument("--pixel-opt", choices=("adam", "lbfgs"), default="adam", help="GIDM's pixel_optimiser")
    ap.add_argument("--lbfgs-history", type=int, default=20)
    ap.add_argument("--screen", type=int, default=0, help="latent starts screened per restart (screen)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve", action="store_true", help="also print the best loss every 100 iterations")
    ap.add_argument("--only", choices=("gidm", "gidm_plus", "both"), default="both")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prior = load_ddpm("mnist32_ddpm")
    data = load_mnist5k(size=32)
    pool = data.subset(torch.arange(0, len(data), 5))
    opts = dict(latent_iterations=a.latent, pixel_iterations=a.pixel, sampler_steps=a.sampler_steps,
                latent_lr=a.latent_lr, pixel_lr=a.pixel_lr, screen=a.screen)
    gidm_opts = dict(opts, pixel_optimiser=a.pixel_opt, lbfgs_history=a.lbfgs_history)
    budget = Budget(iterations=a.latent + a.pixel, restarts=a.restarts, halving=a.halving, workers=1)
    print(f"budget: {a.latent} latent + {a.pixel} pixel iterations, sampler_steps {a.sampler_steps}, "
          f"latent_lr {a.latent_lr}, pixel_lr {a.pixel_lr}, GIDM pixels {a.pixel_opt} (history {a.lbfgs_history}), "
          f"screen {a.screen}, restarts {a.restarts}, halving {a.halving}, "
          f"{a.threads} thread(s)", flush=True)
    rows: dict[str, list[float]] = {"gidm": [], "gidm+": [], "wrong-t": []}
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        for known in ((True,) if a.only == "gidm" else (False,) if a.only == "gidm_plus" else (True, False)):
            sc = DiffusionScenario(prior.unet, prior.alphas_cumprod, pool, ClientProtocol(), 1,
                                   threat_model(diffusion_noise=known))
            obs, truth = sc.simulate(generator=torch.Generator().manual_seed(100 + seed))
            t_true = truth.meta[0]["diffusion_t"]
            attacks = ({"gidm": GIDM(**gidm_opts)} if known else
                       {"gidm+": GIDMPlus(**opts),
                        "wrong-t": GIDM(latent_iterations=0, pixel_iterations=a.latent + a.pixel,
                                        pixel_lr=a.pixel_lr, assume_t=(t_true + 500) % 1000)})
            for name, att in attacks.items():
                t0 = time.perf_counter()
                b = budget if name != "wrong-t" else Budget(iterations=a.latent + a.pixel)
                r = att.reconstruct(obs, budget=b, rng=torch.Generator().manual_seed(seed))
                wall = time.perf_counter() - t0
                p = float(psnr(r.images, truth.images)[0])
                rows[name].append(p)
                extra = f" t_true {t_true}"
                if "t_estimate" in r.trace.extra:
                    t_est = r.trace.extra["t_estimate"][0]
                    extra += f" t_est {t_est} (|err| {abs(t_est - t_true)})"
                halving = r.trace.extra.get("halving")
                its = halving["total_iterations"] if halving else r.trace.iterations * b.restarts
                print(f"seed {seed} {name:8s} PSNR {p:5.2f} dB  {wall:6.1f} s/image  final loss "
                      f"{min(r.trace.losses):.2e}  {its} iterations{extra}", flush=True)
                if b.restarts > 1:
                    print("   restarts' final losses: " + " ".join(f"{x:.1e}" for x in r.trace.restart_losses)
                          + f" (kept {r.trace.best_restart})", flush=True)
                if a.curve:
                    ls = r.trace.losses
                    print("   best loss by iteration: " + " ".join(
                        f"{i}:{min(ls[:i]):.1e}" for i in range(50, len(ls) + 1, 50)), flush=True)
    for name, ps in rows.items():
        if ps:
            print(f"{name}: PSNR {' '.join(f'{p:.1f}' for p in ps)}; >= 25 dB on {sum(p >= 25 for p in ps)}/{len(ps)}")


if __name__ == "__main__":
    main()
