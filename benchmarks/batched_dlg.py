"""Stacked DLG / iDLG against K separate runs, side by side in one run: time per problem and the records' agreement.

K observations (one digit each, batch 1 by default, so iDLG labels; each with its own model initialisation: the
seeds of a sweep) are reconstructed by DLG single-threaded: one `Attack.reconstruct` per observation (today's
cells) and one `giaudit.attacks.batched.reconstruct_many` per stack size in `--k` (the first K observations,
each problem its own L-BFGS state, the K problems' line searches and directions computed together, every
objective evaluated in one stacked call per round).
The separate runs are made once, for the largest K, and each stack is compared with its observations' runs.
Prints, per K, the time per problem of both, the speed-up, and the mean and largest |ΔPSNR| and max |Δx|
between the two reconstructions of each observation.

`--reference` adds a second set of separate runs whose image gradient is moved by one float step at every
evaluation (`torch.nextafter`): how far DLG's L-BFGS carries last-bit differences by itself, with no stacking.

    python benchmarks/batched_dlg.py [--size 16] [--k 8,16,32] [--iterations 5] [--model lenet_relu] [--batch 1]
                                     [--reference] [--repeat 1]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from batched_ig import cases, quality
from torch import Tensor

from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.attacks.batched import reconstruct_many
from giaudit.attacks.dlg import DLG
from giaudit.types import Observation


def last_bit(attack: DLG) -> None:
    """Make `attack`'s unbatched objective return its image gradient one float step away from autograd's."""
    plain = DLG.matching.__get__(attack)

    def matching(obs: Observation, labels: Tensor):
        exact = plain(obs, labels)

        def loss_and_grad(variables: Sequence[Tensor]):
            loss, grads = exact(variables)
            return loss, (torch.nextafter(grads[0], torch.full_like(grads[0], float("inf"))), *grads[1:])

        return loss_and_grad

    attack.matching = matching  # type: ignore[method-assign]


def agreement(a: list, b: list, truths: list) -> tuple[float, float, float]:
    d_psnr = [abs(quality(x, t) - quality(y, t)) for x, y, t in zip(a, b, truths)]
    dx = max(float((x.images - y.images).abs().max()) for x, y in zip(a, b))
    return sum(d_psnr) / len(d_psnr), max(d_psnr), dx


def timed(solve: Callable[[], list], problems: int, repeat: int) -> tuple[list, float, float]:
    """`solve()`'s result and its fastest wall and CPU time per problem over `repeat` runs (the results are the
    same every time: the runs are deterministic)."""
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = solve()
        walls.append((time.perf_counter() - t0) / problems)
        cpus.append((time.process_time() - c0) / problems)
    return out, min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--k", default="8,16,32")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--model", default="lenet_relu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="time each solve this many times, keep the fastest")
    a = ap.parse_args()
    ks = sorted(int(k) for k in a.k.split(","))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = cases(a.size, ks[-1], a.model, a.batch)
    obs = [o for o, _ in data]
    truths = [t for _, t in data]
    attack = build_attack("dlg")
    budget = Budget(iterations=a.iterations, restarts=a.restarts, workers=1)
    warm = Budget(iterations=1, workers=1)  # first-call costs (autograd, functorch) paid before timing either
    attack.reconstruct(obs[0], budget=warm)
    reconstruct_many(attack, obs[:2], budget=warm)

    def gens(k: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(k)]

    separate, per_sep, cpu_sep = timed(lambda: [attack.reconstruct(o, budget=budget, rng=g)
                                                for o, g in zip(obs, gens(len(obs)))], len(obs), a.repeat)
    psnr_sep = sum(quality(r, t) for r, t in zip(separate, truths)) / len(obs)
    print(f"DLG ({attack.label_method} labels: {separate[0].label_source}), {a.model}, {a.size} px, batch {a.batch}, "
          f"restarts {a.restarts}, {a.iterations} L-BFGS iterations of up to {attack.max_eval} steps, 1 thread")
    print(f"separate: {per_sep:.3f} s per problem, {cpu_sep:.3f} s CPU ({len(obs)} runs, fastest of {a.repeat}); "
          f"PSNR {psnr_sep:.2f} dB")
    print(f"{'K':>3} {'stacked s/problem':>18} {'CPU s':>6} {'speed-up (CPU)':>15} {'|dPSNR| mean':>13} {'max':>7} "
          f"{'max |dx|':>9} {'PSNR separate':>14} {'stacked':>8}")
    for k in ks:
        stacked, per, cpu = timed(lambda k=k: reconstruct_many(attack, obs[:k], budget=budget, rngs=gens(k)), k,
                                  a.repeat)
        mean, worst, dx = agreement(separate[:k], stacked, truths[:k])
        mean_sep = sum(quality(r, t) for r, t in zip(separate[:k], truths[:k])) / k
        mean_stack = sum(quality(r, t) for r, t in zip(stacked, truths[:k])) / k
        print(f"{k:>3} {per:>18.3f} {cpu:>6.3f} {per_sep / per:>6.2f}x ({cpu_sep / cpu:.2f}x) {mean:>10.4f} dB "
              f"{worst:>7.4f} {dx:>9.2e} "
              f"{mean_sep:>11.2f} dB {mean_stack:>5.2f} dB", flush=True)
    if a.reference:
        shifted = build_attack("dlg")
        assert isinstance(shifted, DLG)
        last_bit(shifted)
        moved = [shifted.reconstruct(o, budget=budget, rng=g) for o, g in zip(obs, gens(len(obs)))]
        mean, worst, dx = agreement(separate, moved, truths)
        psnr_moved = sum(quality(r, t) for r, t in zip(moved, truths)) / len(obs)
        print(f"reference, separate runs with the image gradient one float step off (K = {len(obs)}): "
              f"|dPSNR| mean {mean:.4f} dB, max {worst:.4f} dB; max |dx| {dx:.2e}; PSNR {psnr_moved:.2f} dB")


if __name__ == "__main__":
    main()
