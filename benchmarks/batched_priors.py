"""Stacked GIAS and GGL: K reconstructions in one stacked solve against K separate runs, side by side.

    python benchmarks/batched_priors.py [--ks 4,8,16] [--iterations 20] [--generations 10] [--population 50]

Each of K problems is one client of 32 px MNIST digits (batch 1, images the shipped priors never saw) through
its own ReLU LeNet (seeded per problem), with the shipped mnist32 GAN prior, 1 thread. GIAS: z+theta, the
given iterations split half and half; GGL: CMA-ES with the given population and generations. For each K it
prints the seconds per problem of K separate `Attack.reconstruct` calls and of one stacked solve, the ratio,
and the largest difference between their reconstructions (images) and final losses.
"""
from __future__ import annotations

import argparse
import time

import torch

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.stacked_ggl import solve as solve_ggl
from giaudit.attacks.stacked_gias import solve as solve_gias
from giaudit.data import load_mnist5k
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol


def observations(k: int) -> list:
    pool = load_mnist5k(size=32)
    pool = pool.subset(torch.arange(0, len(pool), 5))  # index % 5 == 0: never in the priors' training
    out = []
    for i in range(k):
        model = build_model("lenet_relu", channels=1, num_classes=10, size=32,
                            generator=torch.Generator().manual_seed(100 + i))
        scen = Scenario(model, pool, ClientProtocol(), 1, threat_model(batch_size=True, surrogate_data=True))
        out.append(scen.simulate(generator=torch.Generator().manual_seed(i))[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="4,8,16")
    p.add_argument("--iterations", type=int, default=20, help="GIAS iterations (latent + parameters)")
    p.add_argument("--generations", type=int, default=10, help="GGL CMA-ES generations")
    p.add_argument("--population", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(1)
    cases = [("gias", build_attack("gias"), Budget(iterations=a.iterations, workers=1), solve_gias),
             ("ggl", build_attack("ggl", optimizer="cma", population=a.population),
              Budget(iterations=a.generations, workers=1), solve_ggl)]
    warm = observations(1)
    for _name, attack, budget, solve in cases:  # first calls pay imports and kernel set-up: not timed
        attack.reconstruct(warm[0], budget=Budget(iterations=2, workers=1), rng=torch.Generator().manual_seed(0))
        solve(attack, warm * 2, Budget(iterations=2, workers=1), [torch.Generator().manual_seed(0)] * 2)
    print("| attack | K | separate s / problem | stacked s / problem | speed-up | max abs image diff | "
          "max rel loss diff |\n|---|---:|---:|---:|---:|---:|---:|")
    for k in (int(v) for v in a.ks.split(",")):
        obs = observations(k)
        for name, attack, budget, solve in cases:
            rngs = [torch.Generator().manual_seed(10 + i) for i in range(k)]
            t0 = time.perf_counter()
            plain = [attack.reconstruct(o, budget=budget, rng=r) for o, r in zip(obs, rngs)]
            separate = (time.perf_counter() - t0) / k
            rngs = [torch.Generator().manual_seed(10 + i) for i in range(k)]
            t0 = time.perf_counter()
            stacked = solve(attack, obs, budget, rngs)
            together = (time.perf_counter() - t0) / k
            img = max(float((x.images - y.images).abs().max()) for x, y in zip(plain, stacked))
            loss = max(abs(x.trace.losses[-1] - y.trace.losses[-1]) / max(abs(x.trace.losses[-1]), 1e-12)
                       for x, y in zip(plain, stacked))
            print(f"| {name} | {k} | {separate:.3f} | {together:.3f} | {separate / together:.2f}x | {img:.1e} | "
                  f"{loss:.1e} |", flush=True)


if __name__ == "__main__":
    main()
