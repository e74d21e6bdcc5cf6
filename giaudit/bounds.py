"""What any attacker could reconstruct: reconstruction-robustness bounds from the defenses' DP guarantees.

Every attack an audit runs gives a lower bound on leakage. Differential
privacy gives the matching upper bound for *any* attack, through
reconstruction robustness (ReRo; Balle, Cherubin & Hayes, "Reconstructing
training data with informed adversaries", IEEE S&P 2022): a mechanism is
(η, γ)-ReRo for a prior π over the target when no attack reconstructs the
target within error η with probability above γ; κ is the success of the best
guess that ignores the output. Through the hypothesis-testing view (Hayes,
Mahloujifar & Balle, "Bounding training data reconstruction in DP-SGD",
NeurIPS 2023; Kaissis, Hayes, Ziller & Rueckert, "Bounding data
reconstruction attacks with the hypothesis testing interpretation of
differential privacy", 2023): a mechanism whose trade-off function (the
smallest type-II error at type-I error α of a test telling the release
without the target from the release with it) is at least f is
(η, 1 - f(κ))-ReRo; for μ-GDP, γ ≤ Φ(Φ⁻¹(κ) + μ). The argument compares
the release with the one made without the target, which does not depend on
the target, so success there is at most κ.

Guarantees this module reads (from what the defenses disclosed, or what the
utility training's accountant spent), all on Opacus's accountants:

- One Gaussian release (`release_guarantee`), the audited client update:
  DP-SGD per example (sum of per-example gradients clipped to C plus
  N(0, (σC)²), sensitivity C: μ = √k / σ over the k local DP steps of one
  round, k = 1 for FedSGD; exact when the example is in every local step,
  an upper bound otherwise) or clip + Gaussian noise per client (clip the
  whole update to C, then N(0, s²) per entry: μ = C / s). The audited update
  holds the target, so no subsampling amplification applies to it.
  Transforms after the noise are post-processing and keep the bound (their
  extra noise is not credited); a defense between the clip and the noise, or
  Laplace noise, leaves the chain without a Gaussian guarantee.
- The whole federated training (`training_guarantee`): the Poisson-subsampled
  Gaussian over the training's steps, from the privacy profile δ(ε) of
  Opacus's PRV accountant (Gopi, Lee & Wutschitz 2021). The profile is turned
  into a lower bound on the trade-off curve through
  f(α) ≥ sup_ε 1 - δ(ε) - e^ε α over every real ε (and its mirror
  e^-ε (1 - δ(ε) - α) where the profile is symmetric), evaluated with
  Gopi et al.'s error bound δ(ε) ≤ δ̂(ε - ε_err) + δ_err. Where the PRV's
  discretisation would span more than ±`PRV_MAX_DOMAIN` in privacy loss
  (very little noise: millions of mesh points, minutes), the profile comes
  from Opacus's RDP accountant instead, through the conversion its
  `get_privacy_spent` uses, δ(ε) ≤ min over orders α of
  exp((α-1)(ρ_α - ε + log(1 - 1/α)) - log α): looser, also an upper bound.
  Poisson subsampling bounds the training whatever the noise: the target
  takes part in none of the T steps with probability (1 - q)^T, when the
  release is distributed exactly as without it, so γ ≤ κ + p (1 - κ) with
  p = 1 - (1 - q)^T; the bound is the smaller of the two. Opacus's GDP
  central-limit μ (Bu, Dong, Long & Su 2020) is its cross-check, not a bound.
- A defense that declares only (ε, δ): f(α) = max(0, 1 - δ - e^ε α,
  e^-ε (1 - δ - α)), the weakest of the three.

Adjacency (`ADJACENCIES`): ``add_remove`` (default), the target's record
(DP-SGD) or client (clip + noise) present or absent, the adjacency Opacus
accounts under; ``replace``, the target replaced by another value, is two
add/remove steps and is bounded by group privacy (Dong, Roth & Su 2022,
Theorem 2.14): γ_replace(κ) = γ(γ(κ)), which is Φ(Φ⁻¹(κ) + 2μ) for μ-GDP.

Baselines κ per success criterion (`Kappa`): re-identified rank-1 among N
(κ = 1/N); an attribute inferred (κ = the majority-class rate of the
classifier's training data); a reconstruction within τ dB PSNR (`psnr_kappa`:
the largest share of pool images within τ dB of one fixed guess).

Measured success (`Criterion`): the share of records meeting the criterion
with its Clopper-Pearson interval. A lower confidence bound above the DP
bound is an alarm (a bug, or an accountant that does not describe the
release). The empirical μ of a defense, DP or not, is the smallest μ-GDP that
permits the measured lower-confidence success: μ̂ = Φ⁻¹(p_lo) - Φ⁻¹(κ)
(0 when p_lo ≤ κ), also stated as ε at δ (Opacus's GDP-to-(ε, δ) dual).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from giaudit.errors import GiauditError, ParamError
from giaudit.scenario.build import client_pool
from giaudit.scenario.sections import DataSection
from giaudit.stats import clopper_pearson

Adjacency = Literal["add_remove", "replace"]
ADJACENCIES: dict[str, str] = {
    "add_remove": "the target's record (DP-SGD) or client (clip + noise) present or absent",
    "replace": "the target replaced by any other value (group privacy over two add/remove steps)",
}
DEFAULT_ADJACENCY: Adjacency = "add_remove"
PSNR_THRESHOLD_DB = 20.0   # bounds.psnr_threshold: a reconstruction within this PSNR of its original succeeds
DEFAULT_DELTA = 1e-5       # the δ an empirical μ is stated at when the run's defenses declare none
CONFIDENCE = 0.95          # the Clopper-Pearson interval of measured success and of κ estimated from a pool
# Opacus's PRV discretisation: ε and δ errors of the privacy profile (Gopi et al.'s Theorem 5.5).
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR = 1e-9
# The largest privacy-loss span (±) of the PRV discretisation computed; beyond it the RDP profile is used.
PRV_MAX_DOMAIN = 150.0
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512])
# The most pool images the PSNR baseline compares pairwise (a seeded subset of a larger pool).
KAPPA_POOL_MAX = 2000


def gaussian_gamma(kappa: float, mu: float) -> float:
    """The ReRo bound of a μ-GDP mechanism at baseline κ: Φ(Φ⁻¹(κ) + μ)."""
    if not 0.0 <= kappa <= 1.0 or math.isnan(mu) or mu < 0:
        raise ValueError(f"gaussian_gamma: kappa must be in [0, 1] and mu >= 0; got kappa={kappa}, mu={mu}")
    if mu == math.inf:
        return 1.0 if kappa > 0 else 0.0
    if kappa in (0.0, 1.0) or mu == 0:
        return float(kappa)
    return float(norm.cdf(norm.ppf(kappa) + mu))


def eps_delta_gamma(kappa: float, epsilon: float, delta: float) -> float:
    """The ReRo bound of an (ε, δ)-DP mechanism: 1 - f(κ) with f(α) = max(0, 1-δ-e^ε α, e^-ε (1-δ-α))."""
    if epsilon == math.inf or epsilon > 700 or math.exp(epsilon) * kappa >= 1.0:  # e^ε κ ≥ 1: nothing bounded
        return 1.0
    f = max(0.0, 1.0 - delta - math.exp(epsilon) * kappa, math.exp(-epsilon) * (1.0 - delta - kappa))
    return min(1.0, max(kappa, 1.0 - f))


def _prv_dprv(sigma: float, sample_rate: float, steps: int) -> Any:
    """Opacus's composed discrete PRV of `steps` Poisson-subsampled Gaussian steps (its PRVAccountant's own
    discretisation, `_get_dprv`, at `PRV_EPS_ERROR` / `PRV_DELTA_ERROR`)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(sigma), float(sample_rate), int(steps))]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore")  # Opacus's RDP search warns at its largest order; q = 1 divides by zero
        return acc._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=PRV_DELTA_ERROR)


class ProfileCurve:
    """A privacy profile δ(ε), an upper bound at every real ε for the (with target || without) pair, and the
    ReRo bound it implies. Subclasses give `delta` and the losses `span` where it varies."""

    def delta(self, eps: float) -> float:
        raise NotImplementedError

    def span(self) -> tuple[float, float]:
        raise NotImplementedError

    def gamma(self, kappa: float) -> float:
        """1 - f(κ) ≤ inf over ε of δ(ε) + e^ε κ (each real ε gives a valid bound): a grid over the span, then
        refined around its best point."""
        if kappa <= 0.0:
            return 0.0
        if kappa >= 1.0:
            return 1.0
        # The minimiser is the log-likelihood ratio at the test's threshold, inside the span; every real ε gives a
        # valid bound, so the search may stop at ln(1/κ), beyond which e^ε κ alone exceeds 1, and at -50, below
        # which δ(ε) ≥ 1 - e^ε is 1 to double precision.
        lo, hi = self.span()
        hi = min(hi, math.log(1.0 / kappa))
        lo = min(max(lo, -50.0), hi - 1e-6)

        def g(e: float) -> float:
            return self.delta(e) + math.exp(e) * kappa

        grid = np.linspace(lo, max(hi, lo + 1e-6), 160)
        vals = [g(float(e)) for e in grid]
        i = int(np.argmin(vals))
        best = vals[i]
        a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
        res = minimize_scalar(g, bounds=(a, b), method="bounded", options={"xatol": 1e-7})
        best = min(best, float(res.fun))
        return min(1.0, max(kappa, best))


@dataclass(frozen=True)
class Profile(ProfileCurve):
    """The privacy profile of `steps` Poisson-subsampled Gaussian steps, from Opacus's PRV accountant."""

    sigma: float
    sample_rate: float
    steps: int

    @cached_property
    def accountant(self) -> Literal["prv", "rdp"]:
        """Which of Opacus's accountants gives the profile: the PRV unless its domain would be too wide."""
        orders, rdp = _rdp(self.sigma, self.sample_rate, self.steps)
        return "prv" if _rdp_epsilon(orders, rdp, PRV_DELTA_ERROR) <= PRV_MAX_DOMAIN else "rdp"

    @property
    def participation(self) -> float:
        """The probability that the target takes part in at least one of the steps."""
        return float(-np.expm1(self.steps * np.log1p(-self.sample_rate))) if self.sample_rate < 1 else 1.0

    def delta(self, eps: float) -> float:
        """δ(ε) ≤ δ̂(ε - ε_err) + δ_err: the PRV accountant's estimate made an upper bound (Gopi et al.); or the
        RDP accountant's conversion (`accountant`)."""
        if self.accountant == "rdp":
            return min(1.0, _rdp_delta(*_rdp(self.sigma, self.sample_rate, self.steps), eps))
        d = _dprv(self.sigma, self.sample_rate, self.steps)
        with np.errstate(over="ignore"):
            est = float(d.compute_delta_estimate(eps - PRV_EPS_ERROR))
        return min(1.0, max(0.0, est) + PRV_DELTA_ERROR)

    def span(self) -> tuple[float, float]:
        if self.accountant == "rdp":
            orders, rdp = _rdp(self.sigma, self.sample_rate, self.steps)
            top = _rdp_epsilon(orders, rdp, PRV_DELTA_ERROR)
            return -top, top
        d = _dprv(self.sigma, self.sample_rate, self.steps)
        return float(d.domain.t_min), float(d.domain.t_max)

    def gamma(self, kappa: float) -> float:
        """The profile's bound, or the participation bound κ + p (1 - κ) where that is smaller."""
        g = super().gamma(kappa)
        return min(g, max(kappa, kappa + self.participation * (1.0 - kappa))) if 0.0 < kappa < 1.0 else g


@lru_cache(maxsize=64)
def _rdp(sigma: float, sample_rate: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Opacus's RDP of `steps` Poisson-subsampled Gaussian steps at `RDP_ORDERS`."""
    from opacus.accountants.analysis.rdp import compute_rdp

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        rdp = compute_rdp(q=float(sample_rate), noise_multiplier=float(sigma), steps=int(steps),
                          orders=list(RDP_ORDERS))
    return np.asarray(RDP_ORDERS, dtype=np.float64), np.asarray(rdp, dtype=np.float64)


def _rdp_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """ε at δ from RDP, by the conversion of Opacus's `get_privacy_spent`."""
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    eps = eps[np.isfinite(eps)]
    return float(eps.min()) if eps.size else math.inf


def _rdp_delta(orders: np.ndarray, rdp: np.ndarray, eps: float) -> float:
    """δ at ε from RDP: the same conversion solved for δ, the smallest over the orders."""
    with np.errstate(over="ignore", invalid="ignore"):
        log_delta = (orders - 1) * (rdp - eps + np.log((orders - 1) / orders)) - np.log(orders)
    log_delta = log_delta[np.isfinite(log_delta)]
    return float(math.exp(min(0.0, float(log_delta.min())))) if log_delta.size else 1.0


@lru_cache(maxsize=16)
def _dprv(sigma: float, sample_rate: float, steps: int) -> Any:
    return _prv_dprv(sigma, sample_rate, steps)


@dataclass(frozen=True)
class Guarantee:
    """One DP guarantee of a release: a Gaussian μ, a PRV privacy profile or a declared (ε, δ)."""

    kind: Literal["gaussian", "profile", "eps_delta"]
    what: str                         # the mechanism and its parameters, in words
    mu: float | None = None           # gaussian: μ (add/remove)
    profile: Profile | None = None    # profile: Opacus's PRV
    epsilon: float | None = None      # eps_delta: the declared pair; profile: the accountant's ε at delta
    delta: float | None = None
    gdp_mu: float | None = None       # profile: Opacus's CLT μ, the cross-check

    def _gamma(self, kappa: float) -> float:
        if self.kind == "gaussian":
            return gaussian_gamma(kappa, float(self.mu if self.mu is not None else math.inf))
        if self.kind == "profile" and self.profile is not None:
            g = self.profile.gamma(kappa)
            if self.epsilon is not None and self.delta is not None:
                g = min(g, eps_delta_gamma(kappa, self.epsilon, self.delta))
            return g
        return eps_delta_gamma(kappa, float(self.epsilon or math.inf), float(self.delta or 0.0))

    def gamma(self, kappa: float, adjacency: Adjacency = DEFAULT_ADJACENCY) -> float:
        """The largest success probability any attack can have at baseline κ under `adjacency`."""
        if adjacency not in ADJACENCIES:
            raise ValueError(f"bounds.adjacency: {adjacency!r}; use one of {', '.join(ADJACENCIES)}")
        g = _cached_gamma(self, round(float(kappa), 15))
        return _cached_gamma(self, round(g, 15)) if adjacency == "replace" else g

    def gdp_gamma(self, kappa: float, adjacency: Adjacency = DEFAULT_ADJACENCY) -> float | None:
        """The same bound from the CLT's μ (profile guarantees only): an approximation to compare with."""
        if self.gdp_mu is None:
            return None
        return gaussian_gamma(kappa, self.gdp_mu * (2.0 if adjacency == "replace" else 1.0))


@lru_cache(maxsize=512)
def _cached_gamma(guarantee: Guarantee, kappa: float) -> float:
    return guarantee._gamma(kappa)


def gaussian_release(sigma: float, sensitivity: float = 1.0, compositions: int = 1, what: str = "") -> Guarantee:
    """A Gaussian mechanism of noise std `sigma` and L2 sensitivity `sensitivity`, composed `compositions` times:
    μ = √compositions · sensitivity / sigma (μ = ∞ without noise)."""
    mu = math.inf if sigma <= 0 else math.sqrt(compositions) * sensitivity / sigma
    return Guarantee("gaussian", what or f"Gaussian release, μ = {mu:.3g}", mu=mu)


def subsampled_training(sigma: float, sample_rate: float, steps: int, *, epsilon: float | None = None,
                        delta: float | None = None, what: str = "") -> Guarantee:
    """`steps` Poisson-subsampled Gaussian steps (noise multiplier `sigma`, rate `sample_rate`): Opacus's PRV
    profile, its (ε, δ) where given, and Opacus's GDP CLT μ as the cross-check."""
    from opacus.accountants.analysis.gdp import compute_mu_poisson

    if sigma <= 0:
        return Guarantee("gaussian", what or "no noise", mu=math.inf)
    mu = float(compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=sample_rate))
    return Guarantee("profile", what or f"{steps} steps of the Poisson-subsampled Gaussian (σ = {sigma:.3g}, "
                     f"q = {sample_rate:.3g})", profile=Profile(float(sigma), float(sample_rate), int(steps)),
                     epsilon=epsilon, delta=delta, gdp_mu=mu)


# ---- reading what the defenses disclosed --------------------------------------------------------------


def _ordered(disclosed: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """The chain's disclosures in chain order: (defense name, its disclosure)."""
    def position(key: str) -> int:
        head = key.split(":", 1)[0]
        return int(head) if head.isdigit() else 0

    return [(k.split(":", 1)[-1], v) for k, v in sorted(disclosed.items(), key=lambda kv: position(kv[0]))
            if isinstance(v, Mapping)]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


def release_guarantee(disclosed: Mapping[str, Mapping[str, Any]]) -> Guarantee | None:
    """The DP guarantee of one audited update from its chain's disclosures; None when it has none.

    DP-SGD (per example), clip immediately followed by Gaussian noise (per client), else the first defense
    that declares a finite (epsilon, delta). Everything after the guarantee's noise is post-processing."""
    chain = _ordered(disclosed)
    for i, (name, d) in enumerate(chain):
        sigma, clip = _number(d.get("dp_noise_multiplier")), _number(d.get("dp_max_grad_norm"))
        if name == "dpsgd" and sigma is not None and clip is not None:
            steps, rounds = _number(d.get("dp_steps")), _number(d.get("dp_rounds"))
            k = max(1, int(steps // rounds)) if steps and rounds else 1
            return gaussian_release(sigma, 1.0, k, f"DP-SGD per example: {k} Gaussian step{'s' * (k > 1)} of "
                                    f"noise multiplier {sigma:.3g} (μ = √{k}/σ = {math.sqrt(k) / sigma:.3g})"
                                    if sigma > 0 else "DP-SGD without noise")
        if name == "clip" and i + 1 < len(chain) and chain[i + 1][0] == "noise":
            c, nxt = _number(d.get("clip_norm")), chain[i + 1][1]
            s = _number(nxt.get("noise_sigma"))
            if c is not None and s is not None and nxt.get("noise") == "gaussian":
                return gaussian_release(s, c, 1, f"clip {c:.3g} + Gaussian noise σ = {s:.3g} per client "
                                        f"(μ = C/σ = {c / s:.3g})" if s > 0 else "clip without noise")
    for name, d in chain:
        eps, delta = _number(d.get("epsilon")), _number(d.get("delta"))
        if eps is not None and delta is not None:
            return Guarantee("eps_delta", f"{name} declares (ε = {eps:.3g}, δ = {delta:.0e})", epsilon=eps,
                             delta=delta)
    return None


def training_guarantee(spent: Mapping[str, Any]) -> Guarantee | None:
    """The whole training of a DP-SGD client from its accounting (`Defense.spent` of the utility training, or
    the audited client's disclosure): sampling rate, steps, noise multiplier, and its ε at δ."""
    sigma, q, steps = (_number(spent.get(k)) for k in ("dp_noise_multiplier", "dp_sample_rate", "dp_steps"))
    if sigma is None or q is None or not steps:
        eps, delta = _number(spent.get("epsilon")), _number(spent.get("delta"))
        if eps is not None and delta is not None:
            return Guarantee("eps_delta", f"declared (ε = {eps:.3g}, δ = {delta:.0e})", epsilon=eps, delta=delta)
        return None
    eps, delta = _number(spent.get("epsilon")), _number(spent.get("delta"))
    return subsampled_training(sigma, q, int(steps), epsilon=eps if eps is not None and math.isfinite(eps) else None,
                               delta=delta)


def training_spent(disclosed: Mapping[str, Mapping[str, Any]],
                   runs: Sequence[Mapping[str, Any]] = ()) -> tuple[Mapping[str, Any] | None, str | None]:
    """The accounting a training bound rests on: the utility training's (what the model's utility came from),
    else the audited client's disclosed accounting over its configured rounds; with where it came from."""
    for u in runs:
        for info in (u.get("spent") or {}).values():
            if isinstance(info, Mapping) and info.get("dp_noise_multiplier") is not None:
                return info, "utility training"
    for _name, d in _ordered(disclosed):
        if d.get("dp_noise_multiplier") is not None and d.get("dp_steps"):
            return d, "audited client's accounting"
    return None, None


# ---- baselines --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kappa:
    """The baseline of one success criterion: the best guess's success that ignores the release."""

    value: float          # what the bound uses (an upper estimate where κ is estimated)
    estimate: float       # the point estimate
    how: str              # the estimator, in words


def reid_kappa(gallery_size: int) -> Kappa:
    return Kappa(1.0 / gallery_size, 1.0 / gallery_size, f"1/N: one of {gallery_size} candidates guessed")


def attribute_kappa(majority_rate: float) -> Kappa:
    return Kappa(float(majority_rate), float(majority_rate),
                 "the majority class's rate in the classifier's training data (always guessing it)")


def psnr_kappa(pool: Any, tau_db: float = PSNR_THRESHOLD_DB, *, peak: float = 1.0,
               confidence: float = CONFIDENCE, seed: int = 0) -> Kappa:
    """κ for "reconstructed within τ dB PSNR" with the target drawn uniformly from `pool` (N,C,H,W in [0, peak]).

    Estimator: the best pool image as the fixed guess reaches k_lo / N (the point estimate, achievable).
    No guess does better than k_hi / N, the largest share of pool images within τ - 6.02 dB of one pool image:
    a ball of radius r around any guess holding a set S lies in the ball of radius 2r around each member of S
    (the triangle inequality; twice the distance is 6.02 dB less PSNR). The bound uses the Clopper-Pearson
    upper `confidence` bound of k_hi / N, which also covers the pool as a sample of a larger population.
    Pools above `KAPPA_POOL_MAX` images are subsampled (seeded) first."""
    x = torch.as_tensor(np.asarray(pool), dtype=torch.float64).flatten(1)
    n_all = x.shape[0]
    if n_all == 0:
        raise ValueError("psnr_kappa: the pool is empty")
    if n_all > KAPPA_POOL_MAX:
        x = x[torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:KAPPA_POOL_MAX]]
    n, d = x.shape
    mse = torch.cdist(x, x).pow(2) / d                         # N x N per-image MSE
    within = peak * peak * 10.0 ** (-tau_db / 10.0)             # MSE at exactly tau dB
    k_lo = int((mse <= within).sum(1).max())
    k_hi = int((mse <= 4.0 * within).sum(1).max())
    upper = clopper_pearson(k_hi, n, confidence)[1]
    sub = f" (a seeded {n} of {n_all})" if n < n_all else ""
    return Kappa(upper, k_lo / n, f"best fixed guess among {n} pool images{sub}: {k_lo}/{n} within {tau_db:g} dB "
                 f"(a pool image as the guess); no guess exceeds {k_hi}/{n} (within {tau_db - 6.02:.1f} dB of one "
                 f"pool image); bound at its Clopper-Pearson {confidence:.0%} upper limit {upper:.3g}")


# ---- measured success beside the bound ----------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """One success criterion of a (defense, attack): its baseline, the records meeting it, and the bounds."""

    key: str          # "reid", "psnr", "attr_<name>"
    label: str        # e.g. "re-identified among 100"
    kappa: Kappa
    hits: int
    n: int

    def measured(self, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
        """(share, low, high): the measured success and its Clopper-Pearson interval."""
        lo, hi = clopper_pearson(self.hits, self.n, confidence)
        return (self.hits / self.n if self.n else math.nan), lo, hi


def empirical_mu(p_low: float, kappa: float) -> float:
    """The smallest μ-GDP that permits success `p_low` at baseline κ: Φ⁻¹(p_lo) - Φ⁻¹(κ), 0 when p_lo ≤ κ."""
    if not (0.0 < kappa < 1.0) or not math.isfinite(p_low) or p_low <= kappa:
        return 0.0 if math.isfinite(p_low) else math.nan
    if p_low >= 1.0:
        return math.inf
    return float(norm.ppf(p_low) - norm.ppf(kappa))


def mu_to_epsilon(mu: float, delta: float) -> float:
    """The ε at δ of a μ-GDP mechanism (Opacus's GDP dual)."""
    from opacus.accountants.analysis.gdp import eps_from_mu

    if not math.isfinite(mu):
        return math.inf
    if mu <= 0:
        return 0.0
    try:
        return float(eps_from_mu(mu=mu, delta=delta))
    except ValueError:  # no root below Opacus's bracket: beyond ε = 500
        return math.inf


def bracket(criterion: Criterion, release: Guarantee | None, training: Guarantee | None, *,
            adjacency: Adjacency = DEFAULT_ADJACENCY, confidence: float = CONFIDENCE,
            delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """The bound, the measured success and the empirical μ of one criterion, under ``rero_<key>_*`` keys."""
    k = criterion.kappa.value
    share, lo, hi = criterion.measured(confidence)
    # No guarantee on the release bounds nothing: any attacker may succeed every time. A training without an
    # accountant (no DP-SGD) has no training bound to state (nan).
    bound = release.gamma(k, adjacency) if release is not None else 1.0
    train = training.gamma(k, adjacency) if training is not None else math.nan
    gdp = training.gdp_gamma(k, adjacency) if training is not None else None
    mu = empirical_mu(lo, k)
    mu_point = empirical_mu(share, k) if criterion.n else math.nan
    p = f"rero_{criterion.key}_"
    return {p + "label": criterion.label, p + "kappa": k, p + "kappa_estimate": criterion.kappa.estimate,
            p + "kappa_how": criterion.kappa.how, p + "hits": criterion.hits, p + "n": criterion.n,
            p + "measured": share, p + "low": lo, p + "high": hi, p + "bound": bound, p + "training_bound": train,
            p + "training_gdp": gdp if gdp is not None else math.nan,
            p + "alarm": bool(math.isfinite(bound) and math.isfinite(lo) and lo > bound + 1e-12),
            p + "mu": mu, p + "mu_point": mu_point, p + "epsilon": mu_to_epsilon(mu, delta)}


# ---- the run's context: the pool's baseline and the settings -------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BoundsSection:
    """``[bounds]``: the reconstruction criterion's PSNR threshold τ (dB) and the adjacency of the bounds. Read
    by the report, `compare` and the policy only: it changes no attack, so no record's config hash."""

    psnr_threshold: float = PSNR_THRESHOLD_DB
    adjacency: str = DEFAULT_ADJACENCY

    def __post_init__(self) -> None:
        if not math.isfinite(self.psnr_threshold):
            raise ParamError("psnr_threshold", f"must be a finite number of dB, got {self.psnr_threshold}")
        if self.adjacency not in ADJACENCIES:
            raise ParamError("adjacency", f"{self.adjacency!r}; use one of {', '.join(ADJACENCIES)}")


@dataclass(frozen=True)
class BoundsContext:
    """What the bounds of a run need beyond its records: the reconstruction baseline from the client's pool,
    the PSNR threshold τ and the adjacency."""

    psnr_kappa: Kappa | None = None
    psnr_threshold: float = PSNR_THRESHOLD_DB
    adjacency: Adjacency = DEFAULT_ADJACENCY
    note: str = ""    # why psnr_kappa is missing, when it is


def _settings(config: Mapping[str, Any]) -> tuple[float, Adjacency]:
    """τ and the adjacency of a recorded config's ``[bounds]`` (validated when the config was read)."""
    found = config.get("bounds")
    section = BoundsSection(**found) if isinstance(found, Mapping) else BoundsSection()
    adjacency: Adjacency = "replace" if section.adjacency == "replace" else "add_remove"
    return float(section.psnr_threshold), adjacency


@lru_cache(maxsize=8)
def _pool_kappa(data: Any, seeds: tuple[int, ...], tau: float) -> Kappa:
    kappas = [psnr_kappa(client_pool(data, seed).images, tau, seed=seed) for seed in seeds]
    return max(kappas, key=lambda k: k.value)  # the seeds' pools differ: the largest baseline holds for all


def bounds_context(meta: Mapping[str, Any]) -> BoundsContext:
    """The context of a run folder's metadata (``meta["config"]``): the PSNR baseline of its client pool (the
    largest over its seeds), τ and the adjacency (``[bounds]`` when the config has it, else the defaults). A
    run whose pool cannot be rebuilt (a captured update, data no longer on disk) has no PSNR baseline and says
    why."""
    found = meta.get("config")
    config: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    tau, adjacency = _settings(config)
    section = config.get("scenario")
    scenario: Mapping[str, Any] = section if isinstance(section, Mapping) else {}
    if not config.get("data"):
        return BoundsContext(None, tau, adjacency, "the run folder records no config: no pool to take κ from")
    if scenario.get("capture"):
        return BoundsContext(None, tau, adjacency, "a captured update has no client pool to take κ from")
    try:
        data = DataSection(**dict(config["data"]))
        seeds = tuple(int(s) for s in config.get("seeds") or (0,))
        return BoundsContext(_pool_kappa(data, seeds, tau), tau, adjacency)
    except (GiauditError, TypeError, ValueError, OSError) as exc:
        return BoundsContext(None, tau, adjacency, f"the client pool could not be rebuilt ({exc})")


__all__ = ["ADJACENCIES", "BoundsContext", "BoundsSection", "CONFIDENCE", "Criterion", "DEFAULT_ADJACENCY",
           "DEFAULT_DELTA", "Guarantee", "Kappa", "PSNR_THRESHOLD_DB", "Profile", "ProfileCurve", "attribute_kappa",
           "bounds_context", "bracket", "empirical_mu", "eps_delta_gamma", "gaussian_gamma", "gaussian_release",
           "mu_to_epsilon", "psnr_kappa", "reid_kappa", "release_guarantee", "subsampled_training",
           "training_guarantee", "training_spent"]
