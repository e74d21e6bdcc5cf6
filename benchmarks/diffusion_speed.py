"""Diffusion attacks on this CPU (a script, not a test): time per iteration of each phase, and GIDM vs
GIDM+ vs pixel-only reconstruction quality at the same number of update evaluations.

Scenario: MNIST digit (audit pool, never seen by the prior), batch 1, FedSGD on a federated DDPM UNet
(`--fed tiny`: an untrained 2-level UNet, 8/16 channels; `--fed prior`: the shipped mnist32_ddpm itself,
the paper's well-trained global model). Phase 1 samples with the shipped DDPM prior (class D) or, with
`--fed prior`, with the global model. One thread (two threads on the shared 2-core machine were up to
50x slower for these small models).

    PYTHONPATH=. python benchmarks/diffusion_speed.py --seeds 3 --latent 40 --pixel 60
"""
from __future__ import annotations

import argparse
import time

import torch

from giaudit.attacks.base import Budget
from giaudit.attacks.diffula import DiffULA
from giaudit.attacks.gidm import GIDM
from giaudit.attacks.gidm_plus import GIDMPlus
from giaudit.data import load_mnist5k
from giaudit.metrics.image import psnr
from giaudit.priors.ddpm import DDPMConfig, load_ddpm, untrained_ddpm
from giaudit.scenario.client import Scenario
from giaudit.scenario.diffusion import DiffusionScenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prior", default="mnist32_ddpm")
    ap.add_argument("--fed", choices=("tiny", "prior"), default="tiny")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--latent", type=int, default=40)
    ap.add_argument("--pixel", type=int, default=60)
    ap.add_argument("--sampler-steps", type=int, default=4)
    ap.add_argument("--diffula-steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    prior = load_ddpm(a.prior)
    data = load_mnist5k(size=32)
    pool = data.subset(torch.arange(0, len(data), 5))
    rows = []
    for seed in range(a.seeds):
        fed = (untrained_ddpm(DDPMConfig(size=32, channels=1, block_out_channels=(8, 16), norm_num_groups=4), seed)
               if a.fed == "tiny" else prior)
        sampler = a.prior if a.fed == "tiny" else "global"
        for known in (True, False):
            sc = DiffusionScenario(fed.unet, fed.alphas_cumprod, pool, ClientProtocol(), 1,
                                   threat_model(diffusion_noise=known, surrogate_data=True))
            obs, truth = sc.simulate(generator=torch.Generator().manual_seed(100 + seed))
            t_true = truth.meta[0]["diffusion_t"]
            total = a.latent + a.pixel
            if known:
                attacks = {"gidm": GIDM(latent_iterations=a.latent, pixel_iterations=a.pixel, sampler=sampler,
                                        sampler_steps=a.sampler_steps),
                           "gidm phase 1 only": GIDM(latent_iterations=total, pixel_iterations=0, sampler=sampler,
                                                     sampler_steps=a.sampler_steps),
                           "pixel-only": GIDM(latent_iterations=0, pixel_iterations=total)}
            else:
                attacks = {"gidm+": GIDMPlus(latent_iterations=a.latent, pixel_iterations=a.pixel, sampler=sampler,
                                             sampler_steps=a.sampler_steps),
                           "pixel-only, wrong t": GIDM(latent_iterations=0, pixel_iterations=total,
                                                       assume_t=(t_true + 500) % 1000)}
            for name, att in attacks.items():
                t0 = time.perf_counter()
                r = att.reconstruct(obs, rng=torch.Generator().manual_seed(seed))
                wall = time.perf_counter() - t0
                ph = r.trace.extra["phase_losses"]
                nl, npx = len(ph["latent"]), len(ph["pixel"])
                p = float(psnr(r.images, truth.images)[0])
                extra = ""
                if "t_estimate" in r.trace.extra:
                    extra = f" t_true {t_true} t_est {r.trace.extra['t_estimate'][0]}"
                print(f"seed {seed} {'t,eps known' if known else 't,eps private'} {name:20s} PSNR {p:5.2f} dB  "
                      f"{nl} latent + {npx} pixel its in {wall:.1f}s{extra}", flush=True)
                rows.append((name, p, nl, npx, wall))
    # per-phase time per iteration from single-phase runs
    for name in ("gidm phase 1 only", "pixel-only", "pixel-only, wrong t"):
        ws = [w / (nl + npx) for n, _, nl, npx, w in rows if n == name]
        if ws:
            print(f"{name}: {sum(ws) / len(ws):.3f} s per iteration")
    for name in ("gidm", "gidm+", "pixel-only", "pixel-only, wrong t", "gidm phase 1 only"):
        ps = [p for n, p, *_ in rows if n == name]
        if ps:
            print(f"mean PSNR {name}: {sum(ps) / len(ps):.2f} dB over {len(ps)} seeds")
    # DiffULA step time on a user batch of 16 (parity LeNet)
    idx = torch.arange(0, len(data), 5)[:16]
    model = build_model("lenet_relu", channels=1, num_classes=10, size=32, generator=torch.Generator().manual_seed(0))
    obs, _ = Scenario(model, data.subset(idx), ClientProtocol(), 16, threat_model(surrogate_data=True)).simulate()
    d = DiffULA(prior=a.prior, t_star=0)
    t0 = time.perf_counter()
    d.reconstruct(obs, budget=Budget(iterations=a.diffula_steps))
    print(f"diffula: {(time.perf_counter() - t0) / a.diffula_steps:.3f} s per iteration at user batch 16")


if __name__ == "__main__":
    main()
