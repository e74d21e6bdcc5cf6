"""Time per Inverting Gradients iteration against image size, so a user can plan an audit of their model.

Geiping et al. 2020 (NeurIPS), SoK class B: honest-but-curious server, FedSGD gradient of one image. The
model is giaudit's ``resnet18`` (the CIFAR variant: 3x3 stem, no max-pool, so every block runs at the full
input resolution; an ImageNet-style stem with stride 2 and a max-pool makes 224 px about 16x cheaper), width
64, 3 channels, 10 classes, untrained, BatchNorm in train mode. The image is scikit-image's astronaut
photograph resized to each size. One iteration is the trial gradient with its graph, the cosine + TV loss,
the gradient with respect to the image and the signed Adam step: the time of N + 1 iterations minus the time
of 1 (setup, label recovery and the model copy cancel), divided by N.

    python benchmarks/ig_sizes.py                      # 32 64 128 224 px, one thread (as an engine worker)
    python benchmarks/ig_sizes.py --sizes 32 64 --iterations 20 --threads 2 --device cuda

Prints one line per size and the figures as JSON; timings taken while other processes share the CPU are
upper bounds.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from giaudit.attacks import Budget, build_attack
from giaudit.data import ImageDataset
from giaudit.device import resolve
from giaudit.scenario import Scenario, build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, DataSpec


def photo(size: int) -> torch.Tensor:
    import skimage.data

    img = torch.from_numpy(np.asarray(skimage.data.astronaut(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def seconds_per_iteration(size: int, iterations: int, device: torch.device) -> float:
    x = photo(size)
    pool = ImageDataset(x, torch.tensor([3]), DataSpec(3, size, size, 10, name="astronaut"))
    model = build_model("resnet18", channels=3, num_classes=10, size=size, generator=torch.Generator().manual_seed(0))
    obs, _ = Scenario(model.to(device), pool, ClientProtocol(), 1, threat_model()).simulate(
        generator=torch.Generator().manual_seed(0))
    attack = build_attack("ig")

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        attack.reconstruct(obs, budget=Budget(iterations=n), rng=torch.Generator().manual_seed(1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(1)  # warm-up (allocator, kernels)
    return (run(iterations + 1) - run(1)) / iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    ap.add_argument("--iterations", type=int, default=0, help="timed iterations per size (default: 10 at 32 "
                    "px, scaled down with the pixel count, at least 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = resolve(args.device).device
    out = {}
    for size in args.sizes:
        n = args.iterations or max(3, int(10 * (32 / size) ** 2))
        s = seconds_per_iteration(size, n, device)
        out[size] = s
        print(f"resnet18 {size:>3} px: {s:8.3f} s per IG iteration ({n} timed, {args.threads} thread(s), {device})",
              flush=True)
    print(json.dumps({"device": str(device), "threads": args.threads, "torch": torch.__version__,
                      "seconds_per_iteration": out}))


if __name__ == "__main__":
    main()
