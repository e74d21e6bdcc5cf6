"""Robbing the Fed's imprint (a malicious server, SoK class G) against secure aggregation and large batches.

Three tables, each over `--seeds` seeds (one private draw and one server step per seed):

1. Audits through the pipeline (`run_audit`): the imprint, and Inverting Gradients on the same aggregates with
   the agreed model, under ``secure_agg`` of 8 clients x batch 8 and under ``large_batch`` of 64, on 32 px
   digits (mnist5k) and 32 px faces (lfw_subset, the 100 faces). The share of the audited client's images
   at PSNR >= 30 dB against the expectation (1 - 1/k)^(n - 1) for n = 64 images in the aggregate, and its
   two-standard-error bound.
2. Speed: images recovered (PSNR >= 30 dB) per second of attack time for one 64-image aggregate (8 x 8).
3. The recovered share of all n images of one aggregate (every image scored, paired with a distinct recovered
   image) against (1 - 1/k)^(n - 1) and that expectation minus two standard errors of a share over the seeds'
   n images, for n in {16, 64, 256} and k in {64, 128, 256}, on 32 px digits.
4. Fishing for User Data (class fishing + IG, class F) on aggregates of n in {8, 64} digits (secure aggregation of
   n clients x 1 image, or one batch of n: the same gradient up to scale): the server fishes for each class in
   turn (the declared target class); per class, how many images it caught (read from the update) and, when one
   was, the PSNR of IG's image on the isolated gradient against that image; beside it IG on the same aggregate
   with the agreed model (a batch of n), its best image.

    python benchmarks/imprint.py [--seeds 3] [--ig-iterations 200] [--threads 1] [--parts audits,speed,table,fishing]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from giaudit.attacks import Budget, build_attack
from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.fl import compute_update
from giaudit.metrics.image import psnr
from giaudit.metrics.matching import match
from giaudit.orchestration import run_audit
from giaudit.scenario.build import build_scenario
from giaudit.scenario.sections import DataSection, ScenarioSection
from giaudit.threat import observe, threat_model
from giaudit.types import ClientProtocol, Observation, SharedUpdate

BAR = 30.0
DATA = {"digits": {"source": "mnist5k", "size": 32},
        "faces": {"source": "lfw_subset", "size": 32, "limit": 100, "pool_every": 1, "holdout": 0.2}}
DEFENSES = {"secure-agg-8x8": ([{"name": "secure_agg", "clients": 8}], 8),
            "large-batch-64": ([{"name": "large_batch", "batch_size": 64}], 1)}


def expected(n: int, k: int) -> float:
    return (1 - 1 / k) ** (n - 1)


def audits(seeds: list[int], ig_iterations: int, bins: int, out: Path) -> None:
    print(f"| data | defense | attack | images | share >= {BAR:g} dB | expected (n = 64, k = {bins}) | "
          "expected - 2 s.e. | best PSNR | attack time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for data_name, data in DATA.items():
        for label, (tables, batch) in DEFENSES.items():
            cfg = {"name": f"{data_name}-{label}", "seeds": seeds, "data": data,
                   "scenario": {"model": "lenet_relu", "batch_size": batch}, "threat": {"modifies_model": True},
                   "defenses": tables, "attacks": {"imprint": {"bins": bins}, "ig": {"iterations": ig_iterations}},
                   "output": {"lpips": False}}
            records = run_audit(parse_config(cfg), out / cfg["name"], show_progress=False,
                                engine=LocalEngine(1)).records
            for attack in ("imprint", "ig"):
                recs = [r for r in records if r.attack == attack]
                ps = [row["psnr_db"] for r in recs for row in r.per_image]
                share = sum(p >= BAR for p in ps) / len(ps)
                e = expected(64, bins)
                se = math.sqrt(e * (1 - e) / len(ps))
                t = sum(r.timings["attack_s"] for r in recs)
                print(f"| {data_name} | {label} | {attack} | {len(ps)} | {share:.3f} | {e:.3f} | {e - 2 * se:.3f} | "
                      f"{max(ps):.1f} | {t:.2f} s |", flush=True)


def aggregate_share(n: int, k: int, seed: int) -> tuple[float, int, float]:
    """(share of the n images at >= BAR dB, images recovered, attack seconds) for one aggregate of n digits."""
    sc, held = build_scenario(DataSection(source="mnist5k", size=32), ScenarioSection(batch_size=n),
                              threat_model(modifies_model=True), seed)
    threat = threat_model(modifies_model=True)
    attack = build_attack("imprint", bins=k)
    sent = attack.serve(sc.model, sc.pool.spec, threat, held.images, torch.Generator().manual_seed(seed))
    idx = torch.randperm(len(sc.pool), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = sc.pool.images[idx], sc.pool.labels[idx]
    grads = compute_update(sent, x, y, ClientProtocol())
    obs = observe(model=sent, update=SharedUpdate(tuple(g.detach() for g in grads)), data_spec=sc.pool.spec,
                  threat=threat, batch_size=n, protocol=ClientProtocol(), labels=None, bn_statistics=None)
    t0 = time.perf_counter()
    rec = attack.reconstruct(obs)
    seconds = time.perf_counter() - t0
    p = psnr(rec.images[match(rec.images, x)], x)
    hits = int((p >= BAR).sum())
    return hits / n, hits, seconds


def fishing_aggregate(n: int, seed: int, iterations: int) -> tuple[list[tuple[int, int, float | None]], float]:
    """For one aggregate of n digits: per target class (caught images, true images of that class, the best PSNR
    of the fished images against that class's images, each paired with a distinct one), and the best PSNR of IG
    on the same aggregate with the agreed model."""
    sc, _held = build_scenario(DataSection(source="mnist5k", size=32), ScenarioSection(batch_size=n),
                               threat_model(), seed)
    threat = threat_model(modifies_model=True, surrogate_data=False)
    idx = torch.randperm(len(sc.pool), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = sc.pool.images[idx], sc.pool.labels[idx]
    budget = Budget(iterations=iterations)

    def view(model: torch.nn.Module) -> Observation:
        grads = compute_update(model, x, y, ClientProtocol())
        return observe(model=model, update=SharedUpdate(tuple(g.detach() for g in grads)), data_spec=sc.pool.spec,
                       threat=threat, batch_size=n, protocol=ClientProtocol(), labels=None, bn_statistics=None)

    rows: list[tuple[int, int, float | None]] = []
    for target in range(sc.pool.spec.num_classes):
        attack = build_attack("fishing", target_class=target)
        sent = attack.serve(sc.model, sc.pool.spec, threat, None, torch.Generator().manual_seed(seed))
        rec = attack.reconstruct(view(sent), budget=budget, rng=torch.Generator().manual_seed(seed))
        caught, truth = int(rec.trace.extra["caught"]), x[y == target]
        fished = rec.images[:caught]
        db = float(psnr(fished[match(fished, truth)], truth).max()) if 0 < truth.shape[0] <= caught else None
        rows.append((caught, int(truth.shape[0]), db))
    ig = build_attack("ig").reconstruct(view(sc.model), budget=budget, rng=torch.Generator().manual_seed(seed))
    return rows, float(psnr(ig.images[match(ig.images, x)], x).max())


def fishing(seeds: list[int], iterations: int) -> None:
    print(f"\n| aggregate | seed | classes | caught = true count | caught alone | fished PSNR (caught alone) | "
          f"fished best PSNR (several caught) | IG best PSNR (agreed model, {iterations} it.) |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for n in (8, 64):
        for seed in seeds:
            rows, ig = fishing_aggregate(n, seed, iterations)
            right = sum(c == t for c, t, _ in rows if t > 0)
            alone = [db for c, _t, db in rows if db is not None and c == 1]
            several = [db for c, _t, db in rows if db is not None and c > 1]
            dbs = ", ".join(f"{d:.1f}" for d in alone) or "-"
            best = f"{max(several):.1f}" if several else "-"
            print(f"| {n} | {seed} | {sum(t > 0 for _c, t, _ in rows)} | {right} | {len(alone)} | {dbs} | {best} | "
                  f"{ig:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ig-iterations", type=int, default=200)
    p.add_argument("--bins", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="audits,speed,table,fishing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    parts = set(args.parts.split(","))
    if "audits" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            audits(seeds, args.ig_iterations, args.bins, Path(tmp))
    if "speed" in parts:
        speed(seeds, args.bins)
    if "table" in parts:
        table(seeds)
    if "fishing" in parts:
        fishing(seeds, args.ig_iterations)


def speed(seeds: list[int], bins: int) -> None:
    print(f"\n| aggregate | k | images recovered (>= {BAR:g} dB) | attack time | images per second |")
    print("|---|---:|---:|---:|---:|")
    for seed in seeds:
        _share, hits, seconds = aggregate_share(64, bins, seed)
        print(f"| 64 images, seed {seed} | {bins} | {hits} | {seconds * 1e3:.1f} ms | {hits / seconds:.0f} |",
              flush=True)


def table(seeds: list[int]) -> None:
    print(f"\n| n | k | recovered share (mean over {len(seeds)} seeds, every image) | (1 - 1/k)^(n - 1) | "
          "expected - 2 s.e. | at least that |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in (16, 64, 256):
        for k in (64, 128, 256):
            shares = [aggregate_share(n, k, s)[0] for s in seeds]
            share, e = sum(shares) / len(shares), expected(n, k)
            bound = e - 2 * math.sqrt(e * (1 - e) / (n * len(seeds)))
            print(f"| {n} | {k} | {share:.3f} | {e:.3f} | {bound:.3f} | {'yes' if share >= bound else 'NO'} |",
                  flush=True)


if __name__ == "__main__":
    main()
