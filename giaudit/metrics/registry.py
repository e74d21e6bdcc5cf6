"""Every metric a record can hold, once: its direction, kind, unit, label and per-image key.

A `Metric` is the one place a fact about a metric lives. The evaluator writes
records under these names, and the merge of several clients' aggregates, the
policy check, the aggregation the report and `compare` share, and the report's
wording all read them from here; none keeps its own list.

Record keys are a metric's name with an optional prefix and suffix:

- ``<name>_mean`` / ``<name>_worst``: the mean over a record's images and its
  most leaked image (image metrics: MSE, PSNR, SSIM, LPIPS);
- ``reference_<key>``: the same measure on the originals (what a perfect
  reconstruction would score: a detector's or classifier's own accuracy);
- ``user_<key>``: a user-level run's score over every (reconstruction,
  original) pair;
- ``attribute_<NAME>_accuracy`` / ``attribute_<NAME>_chance``: one family per
  attribute classifier (`giaudit attribute train`).

Direction (`leak`): ``"higher"`` when a larger value means more leaked (PSNR,
SSIM, accuracies, re-identification rates), ``"lower"`` when a smaller one
does (MSE, LPIPS, age error); ``None`` for counts and chance levels, which
measure nothing leaked. The worst case of a direction is its max or min.

Derived metrics (`derived`) are not in any record: `giaudit.aggregate.rero`
computes them per (defense, attack) from the records and the defenses'
disclosures: ``rero_bound``, the largest DP bound on any attacker's success
over the success criteria measured (`giaudit.bounds`), and ``empirical_mu``,
the largest empirical μ (the weakest Gaussian DP the measured success still
permits).

Kind: ``"rate"`` (a share of images: pooled with a Wilson interval),
``"mean"`` (a mean of continuous values: a bootstrap interval) or
``"count"`` (how many: summed or taken at its minimum when clients merge).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["rate", "mean", "count"]
Leak = Literal["higher", "lower"] | None
PREFIXES = ("reference_", "user_")
STATS = ("_mean", "_worst")


@dataclass(frozen=True)
class Metric:
    """One measure a record holds (see the module docstring for the fields' meaning)."""

    name: str                      # the base key, e.g. "psnr_db"
    label: str                     # what a reader sees, e.g. "PSNR"
    kind: Kind
    leak: Leak
    unit: str = ""                 # "dB", "0–1", "years"; "" when none
    per_image: str | None = None   # the key each per_image row holds, when the evaluator writes one
    has_worst: bool = False        # records hold <name>_mean and <name>_worst (image metrics)
    summarised: bool = False       # the report and compare show it as worst and mean (95 % CI) over images
    decimals: int = 2              # decimals the summary tables show
    worst_word: str = "worst"      # how the report names the most leaked value ("best" for LPIPS)
    merge: Literal["mean", "sum", "min"] = "mean"  # how several clients' values combine (counts)
    optional: bool = False         # measured only when its model is installed (LPIPS): shown only where measured
    headline: bool = False         # the one figure the comparison's paired test and percentile columns use
    derived: bool = False          # computed per (defense, attack) by giaudit.aggregate.rero, never in a record

    @property
    def worst(self) -> Literal["max", "min"]:
        """The most leaked value of several: the max for higher-leaks metrics, the min for lower-leaks ones."""
        return "min" if self.leak == "lower" else "max"

    @property
    def heading(self) -> str:
        """The label with its unit, e.g. "PSNR (dB)"."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


_ALL: tuple[Metric, ...] = (
    Metric("mse", "MSE", "mean", "lower", per_image="mse", has_worst=True, decimals=4, worst_word="lowest"),
    Metric("psnr_db", "PSNR", "mean", "higher", unit="dB", per_image="psnr_db", has_worst=True, summarised=True,
           decimals=1, headline=True),
    Metric("ssim", "SSIM", "mean", "higher", unit="0–1", per_image="ssim", has_worst=True, summarised=True),
    Metric("lpips", "LPIPS", "mean", "lower", unit="0–1, low = close", per_image="lpips", has_worst=True,
           summarised=True, worst_word="best", optional=True),
    Metric("label_accuracy", "labels recovered", "rate", "higher"),
    Metric("face_detection_rate", "faces detected", "rate", "higher"),
    Metric("face_detection_batch", "batch has a detected face", "rate", "higher"),
    Metric("identity_similarity", "embedding cosine (raw)", "mean", "higher", per_image="identity_similarity"),
    Metric("identity_match_rate", "verified as same person", "rate", "higher", per_image="identity_match"),
    Metric("gender_accuracy", "gender read correctly", "rate", "higher"),
    Metric("race_accuracy", "race read correctly", "rate", "higher"),
    Metric("age_abs_error", "age error", "mean", "lower", unit="years"),
    Metric("reid_rank1", "re-identified rank-1", "rate", "higher"),
    Metric("reid_rank5", "re-identified rank-5", "rate", "higher"),
    Metric("reid_gallery_size", "gallery size N", "count", None, merge="min"),
    Metric("reid_scored", "reconstructions ranked", "count", None, merge="sum"),
    Metric("rero_bound", "DP bound on any attacker's success", "rate", "higher", derived=True),
    Metric("empirical_mu", "empirical μ (Gaussian DP)", "mean", "higher", derived=True),
)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}

# Families with a name inside the key: one per attribute classifier.
_ATTRIBUTE = re.compile(r"^attribute_([A-Za-z0-9_]+?)_(accuracy|chance)$")


def _attribute(key: str) -> Metric | None:
    m = _ATTRIBUTE.match(key)
    if not m:
        return None
    name = m.group(1).replace("_", " ")
    if m.group(2) == "accuracy":
        return Metric(key, f"{name} inferred", "rate", "higher")
    return Metric(key, f"{name} chance", "rate", None)


@dataclass(frozen=True)
class MetricKey:
    """A record key taken apart: the metric, its prefix ("", "reference_", "user_") and its statistic."""

    key: str
    metric: Metric
    prefix: str = ""
    stat: str = ""   # "", "_mean" or "_worst"

    @property
    def is_rate(self) -> bool:
        return self.metric.kind == "rate"

    @property
    def worst(self) -> Literal["max", "min"]:
        return self.metric.worst

    @property
    def label(self) -> str:
        """The report's name for this key: the metric's label, marked as the originals' or every pair's."""
        text = self.metric.heading
        if self.stat == "_mean" and self.metric.has_worst:
            text += " mean"
        if self.prefix == "user_":
            text += ", every pair"
        if self.prefix == "reference_":
            text += " (originals)"
        return text


def parse(key: str) -> MetricKey | None:
    """The metric a record key names (None for a key no metric has)."""
    base, prefix = key, ""
    for p in PREFIXES:
        if base.startswith(p):
            base, prefix = base.removeprefix(p), prefix + p
    found = METRICS.get(base) or _attribute(base)
    if found is not None:
        return MetricKey(key, found, prefix)
    for stat in STATS:
        if base.endswith(stat):
            found = METRICS.get(base.removesuffix(stat))
            if found is not None and (stat == "_mean" or found.has_worst):
                return MetricKey(key, found, prefix, stat)
    return None


def is_metric(name: str) -> bool:
    """`name` is a metric's key (optionally reference_- or user_-prefixed and _mean / _worst-suffixed)."""
    return parse(name) is not None


def is_rate(key: str) -> bool:
    """A share of images (pooled, Wilson interval) rather than a mean of continuous values (bootstrap)."""
    found = parse(key)
    return found is not None and found.is_rate


def names() -> tuple[str, ...]:
    """The registered metric names (attribute families aside), for messages that list them."""
    return tuple(METRICS)


def summarised() -> tuple[Metric, ...]:
    """The metrics the report and `compare` show as worst and mean (95 % CI) over images."""
    return tuple(m for m in _ALL if m.summarised)


def derived() -> tuple[Metric, ...]:
    """The metrics computed per (defense, attack) from the records (`giaudit.aggregate.rero`), not stored."""
    return tuple(m for m in _ALL if m.derived)


def headline() -> Metric:
    """The headline image metric (PSNR): the paired test against the reference defense runs on it."""
    return next(m for m in _ALL if m.headline)


def policy_key(metrics: Mapping[str, Any], name: str) -> str | None:
    """The aggregate a policy rule on `name` reads from a record's metrics: the key as written, else, for a
    metric with a worst case, ``<name>_worst`` (the most leaked image); None when the record has neither."""
    if name in metrics:
        return name
    found = parse(name)
    if found is not None and found.stat == "" and found.metric.has_worst and f"{name}_worst" in metrics:
        return f"{name}_worst"
    return None


def merge_values(key: str, values: list[tuple[float, int]]) -> float:
    """Several clients' values of one key (each with its image count) as one: the worst of the worsts, counts
    summed or at their minimum as the metric says, everything else weighted by images."""
    found = parse(key)
    if key.endswith("_worst"):  # the most leaked of the clients' worst cases, by the metric's direction
        base = parse(key.removesuffix("_worst"))
        return (min if base is not None and base.worst == "min" else max)(v for v, _ in values)
    if found is not None and found.metric.kind == "count":
        return sum(v for v, _ in values) if found.metric.merge == "sum" else min(v for v, _ in values)
    return sum(v * n for v, n in values) / max(sum(n for _, n in values), 1)


__all__ = ["METRICS", "Metric", "MetricKey", "derived", "headline", "is_metric", "is_rate", "merge_values", "names",
           "parse", "policy_key", "summarised"]
