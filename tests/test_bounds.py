"""Reconstruction-robustness bounds (giaudit.bounds): closed forms, Opacus's PRV profile against GDP and the
single release, the baselines κ, the empirical μ, and measured attack success never above the bound."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from giaudit import bounds as B
from giaudit.attacks import build_attack
from giaudit.attacks.base import Budget
from giaudit.defenses import build_chain
from giaudit.metrics.image import psnr
from giaudit.metrics.matching import match
from giaudit.stats import clopper_pearson
from giaudit.types import SharedUpdate, disclosed_values


class GaussianProfile(B.ProfileCurve):
    """The μ-GDP Gaussian mechanism's exact profile (Balle & Wang 2018), at every real ε."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def delta(self, eps: float) -> float:
        m = self.mu
        return float(norm.cdf(-eps / m + m / 2) - math.exp(eps) * norm.cdf(-eps / m - m / 2))

    def span(self) -> tuple[float, float]:
        return -30.0, 30.0


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kappa", [1e-3, 0.05, 0.3, 0.8])
def test_gaussian_bound_is_the_profile_bound_to_1e9(mu, kappa) -> None:
    """Φ(Φ⁻¹(κ) + μ) (Kaissis et al.) equals the profile route inf_ε δ(ε) + e^ε κ on the Gaussian's own profile:
    the machinery the PRV accountant's profile goes through."""
    closed = B.gaussian_gamma(kappa, mu)
    assert closed == pytest.approx(float(norm.cdf(norm.ppf(kappa) + mu)), abs=1e-15)
    assert GaussianProfile(mu).gamma(kappa) == pytest.approx(closed, abs=1e-9)
    # Replace adjacency: group privacy of two add/remove steps is 2μ for the Gaussian.
    g = B.gaussian_release(1.0 / mu)
    assert g.gamma(kappa, "replace") == pytest.approx(B.gaussian_gamma(kappa, 2 * mu), abs=1e-12)


def test_gaussian_edges_and_published_eps_delta_bound() -> None:
    assert B.gaussian_gamma(0.2, 0.0) == 0.2 and B.gaussian_gamma(0.2, math.inf) == 1.0
    assert B.gaussian_gamma(0.0, 2.0) == 0.0 and B.gaussian_gamma(1.0, 2.0) == 1.0
    # Balle, Cherubin & Hayes (S&P 2022): an (ε, δ)-DP mechanism is (η, e^ε κ + δ)-ReRo.
    for eps, delta, kappa in [(1.0, 0.0, 0.01), (2.0, 1e-5, 0.001), (0.5, 1e-3, 0.1)]:
        assert B.eps_delta_gamma(kappa, eps, delta) == pytest.approx(math.exp(eps) * kappa + delta, rel=1e-12)
    # The declared (ε, δ) of a Gaussian is weaker than its full curve.
    mu, eps = 1.0, 1.0
    delta = GaussianProfile(mu).delta(eps)
    for kappa in (0.01, 0.1, 0.4):
        assert B.eps_delta_gamma(kappa, eps, delta) >= B.gaussian_gamma(kappa, mu) - 1e-12
    with pytest.raises(ValueError, match="kappa"):
        B.gaussian_gamma(1.5, 1.0)


def test_prv_profile_is_the_gaussian_at_one_full_step() -> None:
    """Opacus's PRV at sampling rate 1 and one step is the Gaussian mechanism: its bound is at or above the
    closed form and within the discretisation's error (ε_err = 0.01) of it."""
    sigma = 1.0
    prv = B.subsampled_training(sigma, 1.0, 1)
    for kappa in (0.01, 0.1, 0.5):
        closed = B.gaussian_gamma(kappa, 1.0 / sigma)
        assert closed - 1e-9 <= prv.gamma(kappa) <= closed + 0.005


def test_prv_training_bound_against_gdp_and_the_single_release() -> None:
    """Where the CLT holds (1000 steps at q = 0.01, σ = 1: Bu et al.'s regime) the PRV bound is within 0.01 of
    Opacus's GDP μ; composition never lowers it: more steps at the same (σ, q) bound more, and T full steps
    bound at least one full release of the same σ."""
    many = B.subsampled_training(1.0, 0.01, 1000)
    for kappa in (0.01, 0.1, 0.3):
        assert abs(many.gamma(kappa) - many.gdp_gamma(kappa)) <= 0.01
    one, few = B.subsampled_training(1.0, 0.01, 1), B.subsampled_training(1.0, 0.01, 100)
    full = B.subsampled_training(2.0, 1.0, 3)
    for kappa in (0.01, 0.1, 0.3):
        assert one.gamma(kappa) <= few.gamma(kappa) + 1e-9 <= many.gamma(kappa) + 2e-9
        assert full.gamma(kappa) >= B.gaussian_gamma(kappa, 1 / 2.0) - 1e-9
        # The declared (ε, δ) folded in never loosens the curve's bound.
        assert B.subsampled_training(1.0, 0.01, 1000, epsilon=1.0, delta=1e-5).gamma(kappa) <= many.gamma(kappa)


def _neyman_pearson_monte_carlo(kappa: float, q: float, sigma: float, steps: int, n: int = 100_000,
                                 seed: int = 0) -> tuple[float, float]:
    """Hayes, Mahloujifar & Balle's (NeurIPS 2023) estimate of the tight DP-SGD bound, written from the paper's
    argument: under the release without the target, Q = N(0, σ²)^T, the likelihood ratio of the release with it,
    P = ((1 - q) N(0, σ²) + q N(1, σ²))^T, is r = Π (1 - q + q e^{(2x - 1) / 2σ²}); the most powerful test at
    type-I error κ rejects the top κ of Q by r, so 1 - f(κ) = 1 - (1 - κ) E_Q[r | r in its lowest 1 - κ].
    Returns (estimate, standard error)."""
    rng = np.random.default_rng(seed)
    log_r = np.zeros(n)
    for _ in range(steps):
        x = rng.normal(0.0, sigma, n)
        log_r += np.log1p(q * np.expm1((2 * x - 1) / (2 * sigma**2)))
    r = np.exp(np.sort(log_r))
    low = np.where(np.arange(n) < int(n * (1 - kappa)), r, 0.0)
    return float(1 - low.mean()), float(low.std() / math.sqrt(n))


@pytest.mark.parametrize(("sigma", "q", "steps", "kappa"), [(1.0, 0.1, 100, 0.1), (27.0, 1.0, 100, 1 / 8)])
def test_training_bound_reproduces_hayes_et_al_monte_carlo_bound(sigma, q, steps, kappa) -> None:
    """The PRV route against Hayes et al.'s own estimator of the tight bound: at or above it (within its
    sampling error) and within 0.005 of it. (27, 1, 100, 1/8) is the setting of the paper's released attack code
    (full batch, 100 steps, a prior of 8), where both equal Kaissis et al.'s closed form Φ(Φ⁻¹(κ) + √T / σ)."""
    estimate, se = _neyman_pearson_monte_carlo(kappa, q, sigma, steps)
    ours = B.subsampled_training(sigma, q, steps).gamma(kappa)
    assert estimate - 4 * se <= ours <= estimate + 0.005
    if q == 1.0:
        assert ours == pytest.approx(B.gaussian_gamma(kappa, math.sqrt(steps) / sigma), abs=0.005)
        assert abs(estimate - 0.2177) < 0.003


def test_low_noise_training_bound_is_fast_and_capped_by_participation() -> None:
    """With almost no noise the PRV mesh would span ±13 000 in privacy loss (minutes): the RDP profile is used,
    and Poisson subsampling alone bounds any attacker to κ + p (1 - κ), p = 1 - (1 - q)^T, the chance the target
    took part at all. The RDP profile, where both are cheap, is never tighter than the PRV one (both are upper
    bounds; the PRV is the tight accountant)."""
    import time

    start = time.perf_counter()
    g = B.subsampled_training(0.05, 1 / 4000, 100)
    assert g.profile is not None and g.profile.accountant == "rdp"
    p = 1 - (1 - 1 / 4000) ** 100
    assert g.gamma(0.05) == pytest.approx(0.05 + p * 0.95, rel=1e-9)
    assert time.perf_counter() - start < 2.0
    prv = B.Profile(0.7, 0.01, 50)
    assert prv.accountant == "prv"
    orders, values = B._rdp(0.7, 0.01, 50)
    for kappa in (0.01, 0.1):
        from_rdp = min(1.0, min(B._rdp_delta(orders, values, e) + math.exp(e) * kappa
                                for e in np.linspace(0, math.log(1 / kappa), 400)))
        assert prv.gamma(kappa) <= from_rdp + 1e-9


def test_clopper_pearson_and_empirical_mu() -> None:
    assert clopper_pearson(0, 16) == (0.0, pytest.approx(0.2059, abs=1e-4))  # "0 of 16 [0, 21 %]"
    lo, hi = clopper_pearson(8, 16)
    assert lo < 0.5 < hi and clopper_pearson(16, 16)[1] == 1.0 and math.isnan(clopper_pearson(0, 0)[0])
    # μ̂ inverts the Gaussian bound; no success above κ permits μ = 0.
    for mu, kappa in [(0.7, 0.01), (2.0, 0.1)]:
        assert B.empirical_mu(B.gaussian_gamma(kappa, mu), kappa) == pytest.approx(mu, abs=1e-9)
    assert B.empirical_mu(0.05, 0.1) == 0.0 and B.empirical_mu(1.0, 0.1) == math.inf
    from opacus.accountants.analysis.gdp import delta_eps_mu

    eps = B.mu_to_epsilon(1.5, 1e-5)
    assert delta_eps_mu(eps=eps, mu=1.5) == pytest.approx(1e-5, rel=1e-4) and B.mu_to_epsilon(0.0, 1e-5) == 0.0


def test_psnr_kappa_brackets_the_best_fixed_guess() -> None:
    """κ_lo / N: the best pool image as the guess; no guess beats κ_hi (the τ - 6.02 dB ball around a pool image),
    even one between two images that are not within τ of each other."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 8, 8, generator=g)
    far = torch.rand(40, 1, 8, 8, generator=g)
    # Two images 2 r apart around a midpoint m: each is within τ of m, not of the other.
    tau = 20.0
    r = math.sqrt(10 ** (-tau / 10))            # per-pixel offset giving MSE = 10^(-τ/10), PSNR exactly τ
    a, b = (base + 0.999 * r).clamp(0, 1), (base - 0.999 * r).clamp(0, 1)
    pool = torch.cat([a, b, far])
    k = B.psnr_kappa(pool, tau)
    n = pool.shape[0]
    assert k.estimate == pytest.approx(1 / n)   # no two pool images within τ of each other
    hits_of_midpoint = int((psnr(base.expand(n, -1, -1, -1), pool) >= tau).sum())
    assert hits_of_midpoint == 2                 # a better guess exists ...
    assert k.value >= 2 / n                      # ... and the bound covers it
    assert k.value == pytest.approx(clopper_pearson(2, n)[1]) and "6.0" in k.how or "14.0" in k.how
    with pytest.raises(ValueError, match="empty"):
        B.psnr_kappa(torch.zeros(0, 1, 4, 4))


def test_guarantees_read_what_the_defenses_disclose(unseen_pool, observe) -> None:
    """The keys the bounds read are the ones the real defenses disclose: DP-SGD per example, clip + Gaussian
    noise per client, post-processing keeps the bound, a defense in between or Laplace noise has none."""
    pool = unseen_pool.subset(torch.arange(200))

    def _disclosed(tables, _pool):
        return disclosed_values(observe(1, pool=pool, defense=build_chain(tables))[0].disclosed)

    dp = B.release_guarantee(_disclosed([{"name": "dpsgd", "noise_multiplier": 0.5, "max_grad_norm": 2.0,
                                          "delta": 1e-5, "rounds": 10}, {"name": "noise", "sigma": 0.1}], pool))
    assert dp is not None and dp.kind == "gaussian" and dp.mu == pytest.approx(2.0)  # μ = 1/σ, the clip cancels
    cn = B.release_guarantee(_disclosed([{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": 0.25}],
                                        pool))
    assert cn is not None and cn.mu == pytest.approx(4.0)  # μ = C / σ
    for tables in ([{"name": "noise", "sigma": 0.1}],
                   [{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": 0.1, "distribution": "laplace"}],
                   [{"name": "clip", "max_norm": 1.0}, {"name": "sparsify", "sparsity": 0.5},
                    {"name": "noise", "sigma": 0.1}]):
        assert B.release_guarantee(_disclosed(tables, pool)) is None, tables
    # Only (ε, δ) declared: the weaker bound.
    declared = B.release_guarantee({"0:custom": {"epsilon": 2.0, "delta": 1e-5}})
    assert declared is not None and declared.gamma(0.01) == pytest.approx(B.eps_delta_gamma(0.01, 2.0, 1e-5))
    # The whole training from the audited client's accounting (10 rounds of one step at q = 1/200).
    spent, where = B.training_spent(_disclosed([{"name": "dpsgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0,
                                                 "delta": 1e-5, "rounds": 10}], pool))
    train = B.training_guarantee(spent or {})
    assert where == "audited client's accounting" and train is not None and train.kind == "profile"
    assert train.profile == B.Profile(0.5, 1 / 200, 10)
    assert train.gamma(0.1) < B.gaussian_gamma(0.1, 2.0)  # subsampled over 10 rounds: less than one full release


@pytest.fixture(scope="module")
def ig_runs(unseen_pool, observe):
    """IG (10 iterations) on single digits under DP-SGD at three noise levels, two seeds (the full budgets,
    GIAS and more seeds: benchmarks/rero_bounds.py)."""
    pool = unseen_pool.subset(torch.arange(300))
    attack = build_attack("ig", labels="oracle", tv_weight=1e-4)
    out = {}
    for sigma in (0.01, 0.3, 3.0):
        tables = [{"name": "dpsgd", "noise_multiplier": sigma, "max_grad_norm": 1.0}]
        psnrs, release = [], None
        for seed in range(2):
            obs, truth = observe(1, seed=seed, pool=pool, defense=build_chain(tables), true_labels=True)
            release = B.release_guarantee(disclosed_values(obs.disclosed))
            r = attack.reconstruct(obs, budget=Budget(iterations=10), rng=torch.Generator().manual_seed(seed))
            psnrs.append(float(psnr(r.images[match(r.images, truth.images)], truth.images).min()))
        out[sigma] = (psnrs, release)
    return out, B.psnr_kappa(pool.images, 20.0)


def test_measured_success_never_exceeds_the_bound_under_dpsgd(ig_runs) -> None:
    runs, kappa = ig_runs
    bounds = []
    for sigma, (psnrs, release) in runs.items():
        assert release is not None and release.mu == pytest.approx(1 / sigma), sigma
        hits = sum(p >= 20.0 for p in psnrs)
        bound = release.gamma(kappa.value)
        assert clopper_pearson(hits, len(psnrs))[0] <= bound, (sigma, psnrs, bound)
        bounds.append(bound)
    assert bounds[0] > 0.999 and bounds[0] > bounds[1] > bounds[2]  # more noise, a smaller bound


def _flat(update) -> torch.Tensor:
    return torch.cat([t.flatten() for t in update.tensors])


def _informed_attack(chain, candidates, references, trials: int, seed: int) -> int:
    """Releases of a uniformly drawn candidate through `chain`; the guess is the nearer reference (the MAP test
    for two equally likely candidates under isotropic Gaussian noise). Returns the correct guesses."""
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(trials):
        b = int(torch.randint(0, 2, (1,), generator=g))
        out = _flat(chain.transform(candidates[b], g))
        hits += int((out - references[1]).norm() < (out - references[0]).norm()) == b
    return hits


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_the_prior_aware_attack_on_clip_noise_meets_but_never_passes_the_bound(unseen_pool, observe, sigma) -> None:
    """The attack that matches the bound (Hayes et al. 2023: an informed server that knows the target is one of
    two candidates, κ = 1/2), on the real clip + Gaussian noise chain: it guesses the candidate whose clipped
    update is nearer the release. On two digits it measures Φ(‖c₀ - c₁‖ / 2σ), under the bound Φ(C/σ); on
    the worst pair (antipodal updates, ‖c₀ - c₁‖ = 2C) it reaches the bound, so a μ taken half as large
    would be exceeded."""
    chain = build_chain([{"name": "clip", "max_norm": 1.0}, {"name": "noise", "sigma": sigma}])
    clip_only = build_chain([{"name": "clip", "max_norm": 1.0}])
    pool = unseen_pool.subset(torch.arange(2))
    digits = [observe(1, seed=0, pool=pool.subset(torch.tensor([i])), true_labels=True)[0].update for i in (0, 1)]
    bound = B.release_guarantee(disclosed_values(chain.disclosures(digits[0]))).gamma(0.5)  # type: ignore[union-attr]
    assert bound == pytest.approx(float(norm.cdf(1.0 / sigma)), abs=1e-12)
    refs = [_flat(clip_only.transform(u, torch.Generator())) for u in digits]
    lo, hi = clopper_pearson(_informed_attack(chain, digits, refs, 300, seed=1), 300)
    expected = float(norm.cdf(float((refs[0] - refs[1]).norm()) / (2 * sigma)))
    assert lo <= expected <= hi and expected <= bound and lo <= bound
    # The worst pair for any update: u and -u of norm above C (a 16-entry update keeps the test fast).
    u = SharedUpdate((torch.full((16,), 1.0),), "gradient")
    worst = [u, SharedUpdate((-u.tensors[0],), "gradient")]
    refs = [_flat(clip_only.transform(w, torch.Generator())) for w in worst]
    lo, hi = clopper_pearson(_informed_attack(chain, worst, refs, 2000, seed=2), 2000)
    assert lo <= bound <= hi                                  # tight: the bound is what the best attack reaches
    assert lo > B.gaussian_release(2 * sigma).gamma(0.5)      # half the μ would be broken


def _faces(defense: str, disclosed: dict, hits: int, n: int = 16, seed: int = 0):
    from giaudit.results import AuditRecord

    return AuditRecord(
        record_id=f"f__{defense}__ig__s{seed}", config_hash="h", scenario="f", defense=defense, attack="ig",
        seed=seed, threat={"sok_class": "B"}, attack_params={}, label_source="oracle",
        metrics={"reid_rank1": hits / n, "reid_scored": float(n), "reid_gallery_size": 100.0}, per_image=(),
        timings={}, trace={}, disclosed=disclosed)


def test_rero_row_policy_and_alarm() -> None:
    """The aggregation's bracket on re-identification among 100 (κ = 1 %), judged by rero_bound and
    empirical_mu rules; a measured lower bound above the bound raises the alarm."""
    from giaudit.aggregate import summarise
    from giaudit.policy import check, parse_policy
    from giaudit.report.summary import finding

    dp = {"0:dpsgd": {"dp_noise_multiplier": 2.0, "dp_max_grad_norm": 1.0, "dp_steps": 10, "dp_rounds": 10,
                      "dp_sample_rate": 0.01, "delta": 1e-5, "epsilon": 1.0}}
    recs = [_faces("dpsgd", dp, 0), _faces("none", {}, 12)]
    rows = {r["defense"]: r for r in summarise(recs)}
    v = rows["dpsgd"]
    bound = B.gaussian_gamma(0.01, 0.5)
    assert v["rero_reid_bound"] == pytest.approx(bound) and v["rero_bound"] == pytest.approx(bound)
    assert v["rero_reid_training_bound"] < bound and (v["rero_reid_low"], v["rero_reid_hits"]) == (0.0, 0)
    assert not v["rero_alarm"] and v["empirical_mu"] == 0.0
    assert "DP bounds any attacker to ≤ 3 % re-identified among 100 (κ = 1.0 %); the attacks run reached 0 of 16 " \
           "[0 %, 21 %]" in finding(v, [])
    none = rows["none"]
    assert none["rero_bound"] == 1.0 and none["rero_release"] is None
    lo = clopper_pearson(12, 16)[0]
    assert none["empirical_mu"] == pytest.approx(float(norm.ppf(lo) - norm.ppf(0.01)))
    assert none["empirical_mu_epsilon"] == pytest.approx(B.mu_to_epsilon(none["empirical_mu"], 1e-5))
    # A broken accountant (noise far above what the update had): the attacks' lower bound exceeds the bound.
    broken = summarise([_faces("dpsgd", {"0:dpsgd": {**dp["0:dpsgd"], "dp_noise_multiplier": 50.0}}, 12)])[0]
    assert broken["rero_alarm"] and "ALARM" in finding(broken, [])
    policy = parse_policy({"rules": {"rero_bound": {"max": 0.05}, "empirical_mu": {"max": 1.0}}})
    verdict = {(r.defense, r.metric): r for r in check(recs, policy).rules}
    assert verdict[("dpsgd", "rero_bound")].passed and not verdict[("none", "rero_bound")].passed
    assert verdict[("dpsgd", "empirical_mu")].passed and not verdict[("none", "empirical_mu")].passed
    # With confidence the empirical μ is taken at the Clopper-Pearson lower bound (smaller than at the share).
    point = verdict[("none", "empirical_mu")].measured
    conf = parse_policy({"confidence": 0.95, "rules": {"empirical_mu": {"max": 1.0}}})
    at_lo = check(recs, conf).rules[1].measured
    assert at_lo == pytest.approx(none["empirical_mu"]) and point == pytest.approx(
        float(norm.ppf(12 / 16) - norm.ppf(0.01))) and at_lo < point
    # Nothing to bound (no baseline): fails closed, or skips when asked.
    bare = [dataclasses.replace(recs[0], metrics={"psnr_db_worst": 10.0})]
    assert not check(bare, parse_policy({"rules": {"rero_bound": {"max": 0.5}}})).passed
    assert check(bare, parse_policy({"rules": {"rero_bound": {"max": 0.5, "missing": "skip"}}})).passed


def test_bounds_section_is_validated_read_by_the_context_and_out_of_the_cell_hash() -> None:
    from giaudit.config import demo_config_path, load_config
    from giaudit.errors import ConfigError
    from giaudit.orchestration.plan import plan_cells

    spec = load_config(demo_config_path())
    assert "bounds" not in spec.raw  # unset: the shipped configs' hashes are what they were
    tight = spec.replace(bounds={"psnr_threshold": 25.0, "adjacency": "replace"})
    ctx = B.bounds_context({"config": tight.raw})
    assert (ctx.psnr_threshold, ctx.adjacency) == (25.0, "replace") and ctx.psnr_kappa is not None
    assert "within 25 dB" in ctx.psnr_kappa.how
    assert B.bounds_context({"config": spec.raw}).psnr_threshold == B.PSNR_THRESHOLD_DB
    assert [c.config_hash for c in plan_cells(tight, "x")] == [c.config_hash for c in plan_cells(spec, "x")]
    for bad, key in [({"adjacency": "swap"}, "bounds.adjacency"), ({"tau": 3}, "bounds.tau"),
                     ({"psnr_threshold": float("inf")}, "bounds.psnr_threshold")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            spec.replace(bounds=bad)
    assert "captured update" in B.bounds_context({"config": {**spec.raw, "scenario": {"capture": "x"}}}).note
