"""Score a reconstruction against the private batch: the only place ground truth is used.

Applies to every attack and threat model: the attack has finished and handed
over its `Reconstruction`; the evaluator pairs its images with the client's
(Hungarian matching on pixel MSE, see `matching`), then measures each pair
with MSE, PSNR, SSIM (Wang et al. 2004) and, when its weights are present,
LPIPS (Zhang et al. 2018), and scores the attack's labels with the order-free
accuracy of `label_accuracy`.

Conventions (from the defender's side, "worst" means "most leaked"):
- mse_worst = min, psnr_db_worst = max, ssim_worst = max, lpips_worst = min.
- per_image is sorted most leaked first: lowest MSE (= highest PSNR) first,
  ties broken by higher SSIM, then by the original image's index; "rank"
  counts from 1.
- PSNR is capped at PSNR_CAP_DB = 100 dB, per image and in aggregates.
  Identical images have infinite PSNR (as `image.psnr` returns); an infinite
  value would make the mean meaningless and is not valid JSON. 100 dB is an
  MSE of 1e-10, far beyond any visible difference (one 8-bit step at every
  pixel is ~48 dB), so a capped value reads as "identical up to rounding";
  a note counts the capped pairs.
- Reconstructed pixels are clamped to [0, 1] before scoring (that is the image
  anyone would look at); a note gives the share of values clamped.

User level (DiffULA, Li et al. 2023: one client batch holds one user's images): with
`user_level=True` the aggregate also holds `user_mse_mean`, `user_psnr_db_mean`,
`user_ssim_mean` and `user_lpips_mean`, the means over *every* (reconstruction,
original) pair. A representative image scores the same both ways; a sample-level
attack's Hungarian pairs pick each reconstruction's best original, which the
paper shows flatters it, so a user-level comparison reads the `user_` values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from giaudit.errors import DataError
from giaudit.metrics.image import mse, psnr, ssim
from giaudit.metrics.lpips import LPIPSMetric, load_lpips
from giaudit.metrics.matching import match
from giaudit.types import GroundTruth, Reconstruction

PSNR_CAP_DB = 100.0
_RANGE_TOL = 1e-5  # float rounding allowed outside [0, 1] before calling it out of range


def label_accuracy(predicted: Tensor, true: Tensor) -> float:
    """Order-free accuracy: size of the multiset intersection over the batch size."""
    k = int(max(predicted.max().item(), true.max().item())) + 1
    hits = torch.minimum(torch.bincount(predicted, minlength=k), torch.bincount(true, minlength=k)).sum()
    return float(hits.item()) / float(true.numel())


@dataclass(frozen=True)
class Evaluation:
    per_image: tuple[dict, ...]
    aggregate: dict[str, float]
    notes: tuple[str, ...]
    original: np.ndarray        # N,C,H,W float32, in per_image order
    reconstruction: np.ndarray  # N,C,H,W float32 (clamped to [0, 1]), paired row by row with original


def _images(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{what} images must be an N,C,H,W tensor; got {shape}")
    if x.shape[0] == 0:
        raise DataError(f"{what} holds no images")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{what} images contain {bad} NaN or infinite pixel values")
    return x


def _labels(y: Tensor, n: int, what: str) -> Tensor:
    y = torch.as_tensor(y, device="cpu").detach().reshape(-1)
    if y.numel() != n:
        raise DataError(f"{what} has {y.numel()} labels for {n} images")
    return y.long()


def distinct_rows(rec: Tensor | np.ndarray) -> list[int]:
    """The rows of a batch that are not copies of an earlier row (a representative image repeated per batch
    element counts once when scored against every original)."""
    x = torch.as_tensor(rec, device="cpu")
    distinct = [0]
    for j in range(1, x.shape[0]):
        if not any(torch.equal(x[j], x[k]) for k in distinct):
            distinct.append(j)
    return distinct


def user_level_scores(rec: Tensor, orig: Tensor, lpips: LPIPSMetric | None) -> dict[str, float]:
    """Means over every (reconstruction, original) pair of two [0, 1] batches (identical reconstructions
    are scored once: `distinct_rows`)."""
    distinct = distinct_rows(rec)
    r, n = len(distinct), orig.shape[0]
    a = rec[distinct].repeat_interleave(n, dim=0)
    b = orig.repeat(r, 1, 1, 1)
    out = {"user_mse_mean": float(mse(a, b).mean()),
           "user_psnr_db_mean": float(psnr(a, b).clamp(max=PSNR_CAP_DB).mean()),
           "user_ssim_mean": float(ssim(a, b).mean())}
    if lpips is not None and lpips.available:
        out["user_lpips_mean"] = float(lpips(a, b).mean())
    return out


def evaluate(reconstruction: Reconstruction, truth: GroundTruth, *,
             lpips: LPIPSMetric | None | Literal[False] = None, user_level: bool = False) -> Evaluation:
    """Pair, measure and rank. `lpips=None` loads the default (`load_lpips()`); `lpips=False` switches it off
    (no LPIPS and no note about it). `user_level` adds the all-pairs `user_` means (module docstring)."""
    orig = _images(truth.images, "ground-truth")
    rec = _images(reconstruction.images, "reconstruction")
    lo, hi = float(orig.min()), float(orig.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise DataError(f"ground-truth images must lie in [0, 1] for the metrics; found values in [{lo:.4g}, {hi:.4g}]")
    orig = orig.clamp(0.0, 1.0)
    notes: list[str] = []
    outside = int(((rec < 0) | (rec > 1)).sum())
    if outside:
        notes.append(f"clamped {100.0 * outside / rec.numel():.2f}% of reconstructed pixel values into [0, 1]")
    rec = rec.clamp(0.0, 1.0)

    perm = match(rec, orig)  # rec[perm[i]] pairs with orig[i]; ValueError on fewer reconstructions
    n = orig.shape[0]
    y_true = _labels(truth.labels, n, "ground truth")
    y_pred_rows = _labels(reconstruction.labels, rec.shape[0], "reconstruction")
    rec = rec[perm]
    y_pred = y_pred_rows[perm]

    m = mse(rec, orig)
    p_raw = psnr(rec, orig)
    p = p_raw.clamp(max=PSNR_CAP_DB)
    s = ssim(rec, orig)
    capped = int((p_raw > PSNR_CAP_DB).sum())
    if capped:
        notes.append(f"PSNR capped at {PSNR_CAP_DB:g} dB for {capped} of {n} pairs (identical up to rounding)")

    metric = lpips if lpips is not None else load_lpips()
    lp: Tensor | None = None
    if metric is False:
        pass
    elif metric.available:
        lp = metric(rec, orig)
        note = metric.input_note(*orig.shape[-2:])
        if note:
            notes.append(note)
    else:
        notes.append(metric.reason or "LPIPS unavailable")

    order = sorted(range(n), key=lambda i: (float(m[i]), -float(s[i]), i))
    per_image = tuple(
        {
            "rank": r + 1,
            "recon_index": int(perm[i]),
            "truth_index": i,
            "mse": float(m[i]),
            "psnr_db": float(p[i]),
            "ssim": float(s[i]),
            "lpips": float(lp[i]) if lp is not None else None,
            "label_true": int(y_true[i]),
            "label_pred": int(y_pred[i]),
        }
        for r, i in enumerate(order)
    )
    aggregate = {
        "mse_mean": float(m.mean()),
        "mse_worst": float(m.min()),
        "psnr_db_mean": float(p.mean()),
        "psnr_db_worst": float(p.max()),
        "ssim_mean": float(s.mean()),
        "ssim_worst": float(s.max()),
    }
    if lp is not None:
        aggregate["lpips_mean"] = float(lp.mean())
        aggregate["lpips_worst"] = float(lp.min())
    aggregate["label_accuracy"] = label_accuracy(y_pred, y_true)
    if user_level:
        aggregate.update(user_level_scores(rec, orig, metric or None))

    idx = torch.tensor(order, dtype=torch.long, device="cpu")
    return Evaluation(
        per_image=per_image,
        aggregate=aggregate,
        notes=tuple(notes),
        original=orig[idx].numpy().astype(np.float32, copy=True),
        reconstruction=rec[idx].numpy().astype(np.float32, copy=True),
    )
