"""Sample quality of a DDPM prior on digits (a script, not a test).

Trains a digit classifier on the audit pool of mnist5k (every 5th image: the digits the prior never saw),
checks it on a held-out fifth of that pool, draws N samples from the prior (deterministic DDIM), and prints
the share the classifier labels with confidence >= 0.9, plus the label histogram of the confident ones.

    PYTHONPATH=. python benchmarks/ddpm_quality.py --prior mnist32_ddpm --n 256 --steps 50
"""
from __future__ import annotations

import argparse
import time

import torch

from giaudit.priors.ddpm import load_ddpm
from giaudit.priors.quality import confident_share, digit_classifier
from giaudit.priors.train import save_grid
from giaudit.data import load_mnist5k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prior", default="mnist32_ddpm")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=None, help="write the first 64 samples to this PNG")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    prior = load_ddpm(a.prior)
    data = load_mnist5k(size=prior.config.size)
    pool = torch.arange(0, len(data), 5)
    train, test = pool[pool % 25 != 0], pool[pool % 25 == 0]
    t0 = time.perf_counter()
    clf = digit_classifier(data.images[train], data.labels[train], steps=600)
    acc = float((clf(data.images[test]).argmax(1) == data.labels[test]).float().mean())
    print(f"classifier: trained on {len(train)} held-out digits in {time.perf_counter() - t0:.0f}s, "
          f"accuracy on {len(test)} others {acc:.3f}")
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    samples = torch.cat([prior.sample(min(a.chunk, a.n - i), steps=a.steps, generator=g) for i in range(0, a.n, a.chunk)])
    print(f"sampled {a.n} in {time.perf_counter() - t0:.0f}s ({a.steps} DDIM steps)")
    share, pred = confident_share(clf, samples)
    conf = torch.softmax(clf(samples), 1).max(1).values >= 0.9
    print(f"prior {prior.name} ({prior.training.get('steps')} steps, {prior.training.get('train_s')}s): "
          f"confident (>=0.9) share {share:.3f}; confident labels {torch.bincount(pred[conf], minlength=10).tolist()}")
    if a.grid:
        save_grid(samples[:64], __import__("pathlib").Path(a.grid))


if __name__ == "__main__":
    main()
