"""giaudit.stats: bootstrap coverage, Wilson intervals, the paired Wilcoxon test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from giaudit.stats import MIN_SAMPLES, bootstrap_mean, paired_test, summary, wilson_interval


def test_bootstrap_covers_a_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    trials, hits = 300, 0
    for t in range(trials):
        x = rng.normal(loc=20.0, scale=4.0, size=40)  # e.g. per-image PSNR, true mean 20 dB
        _, lo, hi = bootstrap_mean(x, resamples=1000, seed=t)
        hits += lo <= 20.0 <= hi
    coverage = hits / trials
    assert 0.90 <= coverage <= 0.99, coverage  # nominal 0.95 (the percentile bootstrap runs slightly under)


def test_bootstrap_is_seeded_and_degenerate_cases():
    x = [1.0, 2.0, 5.0, 7.0, 11.0]
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean([4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(v) for v in bootstrap_mean([]))
    assert bootstrap_mean([float("nan"), 2.0]) == (2.0, 2.0, 2.0)


def test_summary_worst_percentile_and_too_few():
    s = summary(list(range(1, 101)))
    assert s.n == 100 and s.mean == 50.5 and s.worst == 100 and s.p95 == pytest.approx(95.05)
    assert s.ci_low < 50.5 < s.ci_high and not s.too_few
    low = summary([0.1, 0.5, 0.9], worst="min")  # LPIPS: lower = more leaked
    assert low.worst == 0.1 and low.p95 < 0.2 and low.too_few and low.n < MIN_SAMPLES


def test_wilson_interval():
    lo, hi = wilson_interval(1, 40)
    assert lo > 0 and hi == pytest.approx(0.1288, abs=2e-4)  # above 0.05: one in 40 is no proof of <= 5 %
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paired_test():
    rng = np.random.default_rng(0)
    ref = rng.normal(25, 3, size=16)
    lower = paired_test(ref - 10 + rng.normal(0, 1, size=16), ref)
    assert lower.p_value < 0.001 and lower.median_difference < -5 and not lower.too_few
    same = paired_test(ref, ref)
    assert same.p_value == 1.0 and same.n_nonzero == 0 and "identical" in same.describe()
    few = paired_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert few.too_few and few.p_value > 0.05 and "too few" in few.describe()
    assert math.isnan(paired_test([], []).p_value)
    with pytest.raises(ValueError):
        paired_test([1.0], [1.0, 2.0])
