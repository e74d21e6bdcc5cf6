"""Stacked Inverting Gradients against K separate runs, side by side in one run: time per problem-iteration and
the records' agreement.

K observations (one digit each, batch 1 by default, each with its own model initialisation: the seeds of a
sweep) are reconstructed by IG twice, single-threaded: K calls of `Attack.reconstruct` (today's cells) and
one `giaudit.attacks.batched.reconstruct_many` (the stacked solve). Prints wall time, the speed-up, and the
mean and largest |ΔPSNR| between the two reconstructions of each observation, and max |Δx| of the images.

    python benchmarks/batched_ig.py [--size 16] [--k 8] [--iterations 100] [--model lenet_relu] [--batch 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.batched import reconstruct_many
from giaudit.data import load_mnist5k
from giaudit.metrics.image import psnr
from giaudit.metrics.matching import match
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol


def cases(size: int, k: int, model: str, batch: int) -> list:
    pool = load_mnist5k(size=size)
    out = []
    for seed in range(k):
        g = torch.Generator().manual_seed(seed)
        m = build_model(model, channels=1, num_classes=10, size=size, generator=g)
        scen = Scenario(m, pool, ClientProtocol(), batch, threat_model(batch_size=True))
        out.append(scen.simulate(None, generator=g))
    return out


def quality(rec, truth) -> float:
    perm = match(rec.images, truth.images)
    return float(psnr(rec.images[perm], truth.images).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--model", default="lenet_relu")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = cases(a.size, a.k, a.model, a.batch)
    attack = build_attack("ig")
    budget = Budget(iterations=a.iterations, restarts=a.restarts, workers=1)
    warm = Budget(iterations=2, workers=1)  # first-call costs (autograd, functorch) paid before timing either
    attack.reconstruct(data[0][0], budget=warm)
    reconstruct_many(attack, [data[0][0]], budget=warm)
    t0 = time.perf_counter()
    one_by_one = [attack.reconstruct(obs, budget=budget, rng=torch.Generator().manual_seed(i))
                  for i, (obs, _t) in enumerate(data)]
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    stacked = reconstruct_many(attack, [obs for obs, _ in data], budget=budget,
                               rngs=[torch.Generator().manual_seed(i) for i in range(len(data))])
    t_stack = time.perf_counter() - t0
    d_psnr = [abs(quality(a_, t) - quality(b_, t)) for a_, b_, (_o, t) in zip(one_by_one, stacked, data)]
    dx = max(float((a_.images - b_.images).abs().max()) for a_, b_ in zip(one_by_one, stacked))
    per = a.k * a.restarts * a.iterations
    print(f"{a.model}, {a.size} px, batch {a.batch}, K = {a.k}, restarts {a.restarts}, {a.iterations} iterations, "
          f"1 thread")
    print(f"separate: {t_sep:.2f} s ({t_sep / per * 1e3:.2f} ms per problem-iteration)")
    print(f"stacked:  {t_stack:.2f} s ({t_stack / per * 1e3:.2f} ms per problem-iteration)  "
          f"speed-up {t_sep / t_stack:.2f}x")
    print(f"|dPSNR| mean {sum(d_psnr) / len(d_psnr):.4f} dB, max {max(d_psnr):.4f} dB; max |dx| {dx:.2e}; "
          f"PSNR separate {sum(quality(r, t) for r, (_o, t) in zip(one_by_one, data)) / a.k:.2f} dB")


if __name__ == "__main__":
    main()
