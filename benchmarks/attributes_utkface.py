"""Held-out accuracy of `giaudit attribute train` on UTKFace (../shared/data/utkface64), race and gender.

Issue 9's proof: race (5 classes, majority class about 0.42) >= 0.60, gender >= 0.85. The classifier trains on
the images outside the audited pool (index % 5 != 0), 20 % of which are held out. Minutes on 2 CPU cores.

    python benchmarks/attributes_utkface.py [--data ../shared/data/utkface64] [--out reports/attributes] [--epochs 30]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from giaudit.metrics.attributes import train_attribute_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface64"))
    p.add_argument("--out", default="reports/attributes")
    p.add_argument("--labels", default="race,gender")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| label | classes | held-out accuracy | majority class | train / held-out images | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in args.labels.split(","):
        t0 = time.perf_counter()
        cfg = train_attribute_classifier(args.data, label, Path(args.out) / label, size=args.size, epochs=args.epochs)
        print(f"| {label} | {cfg['num_classes']} | {cfg['heldout_accuracy']:.3f} | {cfg['majority_accuracy']:.3f} | "
              f"{cfg['n_train']} / {cfg['n_heldout']} | {time.perf_counter() - t0:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
