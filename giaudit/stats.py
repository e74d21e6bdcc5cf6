"""Statistics a comparison or a policy can rest on: intervals over images, paired tests, rates.

Neutral and low in the layers (numpy and scipy only): `compare`, `policy` and
the reports use the same definitions.

- `bootstrap_mean`: the mean with a percentile-bootstrap interval (Efron &
  Tibshirani 1993), seeded, so the same values always give the same interval.
  Resampling is over the values given: pass per-image values and the interval
  is over images.
- `summary`: mean and its bootstrap interval, worst case (max or min) and a
  high percentile (the 95th by default) of per-image values.
- `wilson_interval`: the Wilson score interval of a rate k / n (Wilson 1927),
  which stays inside [0, 1] and is honest for 0 or n successes.
- `clopper_pearson`: the exact binomial interval of a rate (Clopper & Pearson
  1934), for measured attack success set against an upper bound.
- `paired_test`: Wilcoxon signed-rank on paired differences (scipy), one-sided
  by default ("is the defended leakage lower than without the defense?").

Below `MIN_SAMPLES` values a bootstrap interval is not a claim one should
rest on; below `MIN_PAIRS` non-zero differences an exact one-sided Wilcoxon
test cannot reach p < 0.05 (the smallest p with n pairs is 2^-n). Both are
reported with a `too_few` flag that the report spells out.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeGuard

import numpy as np


def finite(v: Any) -> TypeGuard[float]:
    """`v` is a finite int or float (not a bool, None, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


MIN_SAMPLES = 10   # values needed before a bootstrap interval is read as a claim
MIN_PAIRS = 5      # non-zero paired differences needed before a Wilcoxon p < 0.05 is possible (2^-5 = 0.031)


def _clean(values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def bootstrap_mean(values: Sequence[float | None] | np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile-bootstrap interval of the mean at `confidence` (nan when empty;
    low = high = the value for one value)."""
    x = _clean(values)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size == 1 or float(x.max()) == float(x.min()):
        return m, m, m
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return m, float(lo), float(hi)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    ci_low: float
    ci_high: float
    worst: float
    p95: float
    too_few: bool

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_{k}": v for k, v in asdict(self).items()}


def summary(values: Sequence[float | None], *, worst: Literal["max", "min"] = "max", percentile: float = 95.0,
            confidence: float = 0.95, seed: int = 0) -> Summary:
    """Mean with its bootstrap interval, worst case and the `percentile` on the leaky side (the 95th
    percentile for max-is-worst metrics, the 5th for min-is-worst ones such as LPIPS)."""
    x = _clean(values)
    m, lo, hi = bootstrap_mean(x, confidence=confidence, seed=seed)
    if x.size == 0:
        return Summary(0, m, lo, hi, math.nan, math.nan, True)
    w = float(x.max()) if worst == "max" else float(x.min())
    q = float(np.percentile(x, percentile if worst == "max" else 100.0 - percentile))
    return Summary(int(x.size), m, lo, hi, w, q, x.size < MIN_SAMPLES)


def mean_ci(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (nan for fewer than two values): for
    quantities with one value per seed (times), not per-image leakage, which `summary` bootstraps."""
    x = _clean(values)
    if x.size == 0:
        return math.nan, math.nan
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan
    from scipy.stats import t as student_t

    return m, float(student_t.ppf(0.975, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)


def pooled_accuracy(runs: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
    """Accuracy over several runs' held-out tests (``accuracy``, ``n_test`` each), with the Wilson 95 %
    interval of the pooled counts."""
    if not runs:
        return math.nan, math.nan, math.nan
    correct = sum(round(float(r["accuracy"]) * int(r["n_test"])) for r in runs)
    n = sum(int(r["n_test"]) for r in runs)
    lo, hi = wilson_interval(int(correct), n)
    return correct / n, lo, hi


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the rate successes / n (two-sided, at `confidence`)."""
    if n <= 0:
        return math.nan, math.nan
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson (exact binomial) interval of successes / n (Clopper & Pearson 1934): two-sided at
    `confidence`, each side holding at least (1 - confidence) / 2; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    from scipy.stats import beta

    a = (1.0 - confidence) / 2.0
    lo = 0.0 if successes <= 0 else float(beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes >= n else float(beta.ppf(1.0 - a, successes + 1, n - successes))
    return lo, hi


@dataclass(frozen=True)
class PairedTest:
    n_pairs: int            # pairs compared
    n_nonzero: int          # pairs whose difference is not zero (what the signed-rank test uses)
    median_difference: float  # median of (defended - reference)
    p_value: float          # nan when there are no pairs
    too_few: bool

    def describe(self) -> str:
        if self.n_pairs == 0:
            return "no paired images"
        if self.n_nonzero == 0:
            return f"identical on all {self.n_pairs} pairs (p = 1)"
        few = f"; too few pairs for a claim (< {MIN_PAIRS} differ)" if self.too_few else ""
        return f"p = {self.p_value:.2g} over {self.n_pairs} pairs{few}"


def paired_test(defended: Sequence[float], reference: Sequence[float],
                alternative: Literal["less", "greater", "two-sided"] = "less") -> PairedTest:
    """Wilcoxon signed-rank test on paired values (same images, seeds and attack starts).

    `alternative = "less"`: the defended values are lower than the reference's (less leakage, for PSNR).
    Pairs whose difference is exactly zero carry no sign and are dropped (Wilcoxon's convention); when all are
    zero the two sides are identical and p = 1.
    """
    a = np.asarray(defended, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: {a.size} defended values for {b.size} reference values")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n = int(d.size)
    if n == 0:
        return PairedTest(0, 0, math.nan, math.nan, True)
    nonzero = int(np.count_nonzero(d))
    med = float(np.median(d))
    if nonzero == 0:
        return PairedTest(n, 0, med, 1.0, True)
    from scipy.stats import wilcoxon

    p = float(wilcoxon(d[d != 0], alternative=alternative).pvalue)
    return PairedTest(n, nonzero, med, p, nonzero < MIN_PAIRS)


__all__ = ["MIN_PAIRS", "MIN_SAMPLES", "PairedTest", "Summary", "bootstrap_mean", "clopper_pearson", "paired_test",
           "summary", "wilson_interval"]
