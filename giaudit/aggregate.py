"""Saved records -> one summary per (defense, attack[, training round]): the one aggregation.

The report's answer table, `giaudit compare` and the policy check all read
their figures from here, so a figure they share is the same number in each.
Nothing is recomputed from images: every value comes from the records.

- Image metrics the registry marks as summarised (PSNR, SSIM, LPIPS): the
  mean over every reconstructed image with its 95 % bootstrap interval over
  images, the 95th percentile on the leaky side and the most leaked image
  (`giaudit.stats.summary`). Images are identified by (seed, client, round,
  image key), so the same private image is never counted twice.
- Rates (label accuracy, re-identification): pooled over images, with the
  95 % Wilson interval of the pooled counts.
- Attributes: accuracy on the reconstructions next to the same classifier on
  the originals (the reference) and chance, weighted by images.
- ε (δ): the accountant's for the utility training when one was measured
  (its rounds and sampling rate), otherwise what the audited client's defense
  disclosed.
- Utility: held-out accuracy pooled over seeds with its Wilson interval.
- Leakage bracketed (`giaudit.bounds`): per success criterion (re-identified
  rank-1 among N, an attribute inferred, a reconstruction within τ dB PSNR),
  the DP bound on any attacker's success beside the share of images the
  attacks run reached (Clopper-Pearson interval) and the empirical μ, under
  ``rero_<criterion>_*`` keys; ``rero_bound`` and ``empirical_mu`` are their
  largest over the criteria (the registry's derived metrics).
- Against a reference defense (the preset without defenses): a one-sided
  paired Wilcoxon test of the headline metric's (PSNR's) per-image values on
  the same images and attack starts.
- An attack tuned on the server's own data (``attacks.NAME.tune``): its row
  is the tuned attack's, with ``tuned`` set, the tuned options
  (``tuned_options``) and the same attack at its defaults on the same audited
  clients and attack starts under ``untuned_*`` keys (`untuned_view` gives
  that measurement as records, which the policy check judges too).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from giaudit.bounds import (
    CONFIDENCE,
    DEFAULT_DELTA,
    BoundsContext,
    Criterion,
    attribute_kappa,
    bracket,
    reid_kappa,
    release_guarantee,
    training_guarantee,
    training_spent,
)
from giaudit.metrics.registry import Metric, headline, parse, summarised
from giaudit.results import UNTUNED, AuditRecord, disclosed_value
from giaudit.stats import bootstrap_mean, finite, mean_ci, paired_test, pooled_accuracy, summary, wilson_interval

Utility = Mapping[str, Sequence[Mapping[str, Any]]]  # defense label -> per-seed utility results


def record_round(r: AuditRecord) -> int | None:
    """The training round a record attacked (None: the scenario's initial or pretrained model)."""
    v = r.training.get("round") if r.training else None
    return None if v is None else int(v)


def image_count(r: AuditRecord) -> int:
    """The images a record's aggregates stand for (one for a record that kept no per-image rows)."""
    return max(len(r.per_image), 1)


def group(records: Iterable[AuditRecord], *, by_round: bool = False) -> dict[tuple[Any, ...], list[AuditRecord]]:
    """Records by (defense, attack) or (defense, attack, round), in the order the groups first appear."""
    out: dict[tuple[Any, ...], list[AuditRecord]] = {}
    for r in records:
        key = (str(r.defense), str(r.attack)) + ((record_round(r),) if by_round else ())
        out.setdefault(key, []).append(r)
    return out


def image_values(records: Sequence[AuditRecord], key: str) -> dict[tuple[Any, ...], float]:
    """Per-image values keyed by what identifies the image and the attack start: (seed, client, round, image)."""
    out: dict[tuple[Any, ...], float] = {}
    for r in records:
        for row in r.per_image:
            v = row.get(key)
            if v is None:
                continue
            ident = row.get("image_key", row.get("truth_index"))
            out[(r.seed, row.get("client", 0), record_round(r), ident)] = float(v)
    return out


def per_image_values(records: Sequence[AuditRecord], key: str) -> list[float] | None:
    """Every image's value of the per-image form of `key` (``psnr_db_mean`` -> each image's ``psnr_db``), or
    None when the metric has no per-image form or some record did not keep it."""
    found = parse(key)
    if found is None or found.prefix or found.metric.per_image is None or found.stat == "_worst":
        return None
    if not records or not all(r.per_image for r in records):
        return None
    values = [row.get(found.metric.per_image) for r in records for row in r.per_image]
    if any(v is None for v in values):
        return None
    return [float(v) for v in values if v is not None]


def untuned_view(r: AuditRecord) -> AuditRecord | None:
    """A tuned record's companion measurement as a record: the same attack at its defaults on the same audited
    clients and attack starts (its options, threat, labels, metrics and per-image rows); None for a record
    whose attack was not tuned (or one written before the companion was measured)."""
    u = r.tuning.get(UNTUNED) if r.tuning else None
    if not isinstance(u, Mapping) or "metrics" not in u:
        return None
    return dataclasses.replace(
        r, record_id=f"{r.record_id}:{UNTUNED}", threat=dict(u.get("threat") or r.threat),
        attack_params=dict(u.get("attack_params") or {}), label_source=str(u.get("label_source") or ""),
        metrics=dict(u["metrics"]), per_image=tuple(u.get("per_image") or ()),
        timings={"attack_s": float(u.get("attack_s", math.nan))}, trace={}, notes=(), images_file=None,
        tuning={})


def untuned_views(records: Iterable[AuditRecord]) -> list[AuditRecord]:
    """`untuned_view` of every tuned record among `records`."""
    return [v for v in (untuned_view(r) for r in records) if v is not None]


def options_text(params: Mapping[str, Any]) -> str:
    """Tuned options in words: ``lr = 0.0123, schedule = cosine``."""
    return ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in params.items())


def tuned_options(records: Iterable[AuditRecord]) -> str:
    """The options a group's records were tuned to (one text per distinct choice, with the seeds that made it:
    each seed's cell tunes on its own surrogate clients); empty when none was tuned."""
    by_text: dict[str, list[int]] = {}
    for r in records:
        if r.tuning and r.tuning.get("params") is not None:
            by_text.setdefault(options_text(r.tuning["params"]), []).append(int(r.seed))
    if len(by_text) <= 1:
        return next(iter(by_text), "")
    return "; ".join(f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}: {t}" for t, s in by_text.items())


@dataclass(frozen=True)
class Pooled:
    """A mean or a rate over a group's images: the values it rests on, their count and what they are."""

    mean: float
    n: int
    values: tuple[float, ...]  # per-image values, or one value per record (its mean weighted by images)
    unit: str                  # "images" or "records"

    def interval(self, *, rate: bool, confidence: float = 0.95) -> tuple[float, float]:
        """The Wilson interval of a rate's pooled counts, or the bootstrap interval of a mean."""
        if not finite(self.mean) or self.n == 0:
            return math.nan, math.nan
        if rate:
            return wilson_interval(int(round(self.mean * self.n)), self.n, confidence)
        _, lo, hi = bootstrap_mean(list(self.values), confidence=confidence)
        return lo, hi


def pooled(records: Sequence[AuditRecord], key: str) -> Pooled:
    """The mean of `key` over every image of `records`: per-image values where the records keep them, else the
    records' values weighted by their image counts (a record without the key or with a non-number adds NaN)."""
    values = per_image_values(records, key)
    if values:
        return Pooled(sum(values) / len(values), len(values), tuple(values), "images")
    weights = [image_count(r) for r in records]
    raw = []
    for r in records:
        try:
            raw.append(float(r.metrics[key]))
        except (KeyError, TypeError, ValueError):
            raw.append(math.nan)
    n = sum(weights)
    mean = sum(w * v for w, v in zip(weights, raw)) / n if n else math.nan
    unit = "images" if any(r.per_image for r in records) else "records"
    return Pooled(mean, n, tuple(raw), unit)


def rate(records: Sequence[AuditRecord], key: str) -> tuple[float, float, float, int]:
    """(mean, low, high, images) of a rate pooled over the images of the records that measured it."""
    have = [r for r in records if finite(r.metrics.get(key))]
    if not have:
        return math.nan, math.nan, math.nan, 0
    p = pooled(have, key)
    lo, hi = p.interval(rate=True)
    return p.mean, lo, hi, p.n


def image_summary(records: Sequence[AuditRecord], metric: Metric) -> dict[str, Any]:
    """The summary statistics of an image metric over every image, under ``<name>_<stat>`` keys."""
    vals = list(image_values(records, metric.per_image or metric.name).values())
    return summary(vals, worst=metric.worst).as_dict(metric.name)


def _reid(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Rank-1 hits pooled over every scored reconstruction, with the Wilson interval and chance 1/N."""
    hits = n = 0
    sizes: list[int] = []
    r5: list[tuple[float, int]] = []
    for r in records:
        m = r.metrics
        scored = m.get("reid_scored")
        if finite(m.get("reid_rank1")) and finite(scored) and scored:
            n += int(scored)
            hits += int(round(float(m["reid_rank1"]) * float(scored)))
            sizes.append(int(m.get("reid_gallery_size") or 0))
            if finite(m.get("reid_rank5")):
                r5.append((float(m["reid_rank5"]), int(scored)))
    match = [r for r in records if finite(r.metrics.get("identity_match_rate"))]
    out: dict[str, Any] = {"identity_match_rate": pooled(match, "identity_match_rate").mean if match else math.nan}
    if n:
        size = min(sizes) if sizes else 0
        lo, hi = wilson_interval(hits, n)
        out.update(reid_hits=hits, reid_n=n, reid_rank1=hits / n, reid_ci_low=lo, reid_ci_high=hi,
                   reid_gallery_size=size, reid_chance=1.0 / size if size else math.nan,
                   reid_rank5=sum(a * b for a, b in r5) / sum(b for _, b in r5) if r5 else math.nan)
    return out


def attribute_names(records: Sequence[AuditRecord]) -> list[str]:
    """The attributes the records inferred: classifier attributes first, then the face backends' own."""
    names: list[str] = []
    for r in records:
        for k in r.metrics:
            m = re.match(r"^attribute_(.+)_accuracy$", k)
            if m and m.group(1) not in names:
                names.append(m.group(1))
    for builtin in ("gender", "race"):  # the face backends' own predictors
        if any(f"{builtin}_accuracy" in r.metrics for r in records) and builtin not in names:
            names.append(builtin)
    return names


def _weighted(records: Sequence[AuditRecord], key: str | None) -> float:
    have = [r for r in records if key is not None and finite(r.metrics.get(key))]
    return pooled(have, key).mean if have and key is not None else math.nan


def _attribute(records: Sequence[AuditRecord], name: str) -> dict[str, float]:
    own = f"attribute_{name}_accuracy"
    if any(own in r.metrics for r in records):
        keys: tuple[str, str, str | None] = (own, f"reference_{own}", f"attribute_{name}_chance")
    else:
        keys = (f"{name}_accuracy", f"reference_{name}_accuracy", None)
    acc, ref, chance = (_weighted(records, k) for k in keys)
    return {"accuracy": acc, "reference": ref, "chance": chance}


def epsilon(records: Sequence[AuditRecord], runs: Sequence[Mapping[str, Any]]) -> tuple[Any, Any, str | None]:
    """(ε, δ, where from): the utility training's accountant, else what the audited update's defense disclosed."""
    trained = [u for u in runs if u.get("epsilon") is not None]
    if trained:
        return float(trained[0]["epsilon"]), trained[0].get("delta"), "utility training"
    eps = next((v for v in (disclosed_value(r, "epsilon") for r in records) if v is not None), None)
    delta = next((v for v in (disclosed_value(r, "delta") for r in records) if v is not None), None)
    return (float(eps) if eps is not None else None), delta, ("audited update" if eps is not None else None)


def _attribute_hits(records: Sequence[AuditRecord], name: str) -> tuple[int, int]:
    """(correct, images) of an attribute over the group's images: per-image true/predicted values where the
    records keep them, else the records' accuracies times their image counts."""
    hits = n = 0
    for r in records:
        rows = [row for row in r.per_image if f"attribute_{name}_true" in row and f"attribute_{name}_pred" in row]
        if rows:
            n += len(rows)
            hits += sum(row[f"attribute_{name}_true"] == row[f"attribute_{name}_pred"] for row in rows)
        elif finite(r.metrics.get(f"attribute_{name}_accuracy")):
            k = image_count(r)
            n += k
            hits += int(round(float(r.metrics[f"attribute_{name}_accuracy"]) * k))
    return hits, n


def criteria(records: Sequence[AuditRecord], context: BoundsContext | None = None) -> list[Criterion]:
    """The success criteria a (defense, attack)'s records can be judged on, each with its baseline κ and the
    images that met it: re-identified rank-1 among N, each classifier attribute inferred (κ: its majority
    class), and, when the context holds the pool's baseline, a reconstruction within τ dB PSNR."""
    out: list[Criterion] = []
    reid = _reid(records)
    if reid.get("reid_n") and reid.get("reid_gallery_size"):
        size = int(reid["reid_gallery_size"])
        out.append(Criterion("reid", f"re-identified among {size}", reid_kappa(size), int(reid["reid_hits"]),
                             int(reid["reid_n"])))
    for a in attribute_names(records):
        chance = _weighted(records, f"attribute_{a}_chance")
        hits, n = _attribute_hits(records, a)
        if finite(chance) and 0 < chance < 1 and n:
            out.append(Criterion(f"attr_{a}", f"{a.replace('_', ' ')} inferred", attribute_kappa(chance), hits, n))
    if context is not None and context.psnr_kappa is not None:
        key = headline().per_image or headline().name
        vals = list(image_values(records, key).values())
        if vals:
            tau = context.psnr_threshold
            out.append(Criterion("psnr", f"reconstructed within {tau:g} dB PSNR", context.psnr_kappa,
                                 sum(v >= tau for v in vals), len(vals)))
    return out


def rero(records: Sequence[AuditRecord], runs: Sequence[Mapping[str, Any]] = (),
         context: BoundsContext | None = None, *, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The leakage bracket of a (defense, attack): per criterion (`criteria`) the DP bound on the audited update
    and on the whole training, the measured success with its Clopper-Pearson interval at `confidence`, the
    alarm and the empirical μ; then the derived metrics (`rero_bound`, `empirical_mu`: the largest over the
    criteria) and what the guarantees rest on."""
    context = context or BoundsContext()
    disclosed = records[0].disclosed if records else {}
    release = release_guarantee(disclosed)
    spent, spent_from = training_spent(disclosed, runs)
    training = training_guarantee(spent) if spent is not None else None
    eps, delta, _ = epsilon(records, runs)
    at = float(delta) if finite(delta) and delta > 0 else DEFAULT_DELTA
    out: dict[str, Any] = {"rero_release": release.what if release is not None else None,
                           "rero_training": (f"{training.what} ({spent_from})" if training is not None else None),
                           "rero_adjacency": context.adjacency, "rero_delta": at, "rero_note": context.note}
    crits = criteria(records, context)
    out["rero_criteria"] = ",".join(c.key for c in crits)
    for c in crits:
        out.update(bracket(c, release, training, adjacency=context.adjacency, confidence=confidence, delta=at))
    bounds = [(out[f"rero_{c.key}_bound"], c.key) for c in crits if finite(out[f"rero_{c.key}_bound"])]
    mus = [(out[f"rero_{c.key}_mu"], c.key) for c in crits if not math.isnan(out[f"rero_{c.key}_mu"])]
    top_bound = max(bounds) if bounds else (math.nan, None)
    top_mu = max(mus) if mus else (math.nan, None)
    out.update({"rero_bound": top_bound[0], "rero_bound_criterion": top_bound[1],
                "empirical_mu": top_mu[0], "empirical_mu_criterion": top_mu[1],
                "empirical_mu_epsilon": out.get(f"rero_{top_mu[1]}_epsilon", math.nan) if top_mu[1] else math.nan,
                "rero_alarm": any(out[f"rero_{c.key}_alarm"] for c in crits)})
    return out


def _paired(records: Sequence[AuditRecord], reference: Sequence[AuditRecord]) -> dict[str, Any]:
    key = headline().per_image or headline().name
    ref, got = image_values(reference, key), image_values(records, key)
    common = sorted(set(ref) & set(got), key=str)
    test = paired_test([got[k] for k in common], [ref[k] for k in common])
    return {"paired_n": test.n_pairs, "paired_p": test.p_value, "paired_too_few": test.too_few,
            "paired_median_diff": test.median_difference, "paired_note": test.describe()}


def summarise(records: Sequence[AuditRecord], utility: Utility | None = None, *, by_round: bool = False,
              reference: str | None = None, order: Sequence[tuple[str, str]] | None = None,
              context: BoundsContext | None = None) -> list[dict[str, Any]]:
    """One row (a plain dict) per (defense, attack[, round]): every figure the report, `compare` and the
    policy check share.

    `utility`: per defense label, the per-seed utility results of a comparison (``accuracy``, ``n_test``,
    ``epsilon``...). `reference`: the defense label the paired test compares against. `order`: the
    (defense, attack) pairs to show, in that order (default: as the records first appear). `context`: the
    run's bounds context (`giaudit.bounds.bounds_context`: the pool's PSNR baseline, τ, adjacency)."""
    utility = utility or {}
    groups = group(records, by_round=by_round)
    keys = list(groups)
    if order is not None:
        rank = {pair: i for i, pair in enumerate(order)}
        keys = sorted((k for k in keys if k[:2] in rank),
                      key=lambda k: (rank[k[:2]], -1 if not by_round or k[2] is None else k[2]))
    attrs = attribute_names(records)
    base_runs = list(utility.get(reference, [])) if reference else []
    rows = []
    for key in keys:
        defense, attack = key[0], key[1]
        recs = sorted(groups[key], key=lambda r: r.seed)
        runs = list(utility.get(defense, []))
        row: dict[str, Any] = {"defense": defense, "attack": attack, "records": len(recs),
                               "seeds": len({r.seed for r in recs}),
                               "images": sum(image_count(r) for r in recs),
                               "sok_class": recs[0].threat.get("sok_class"),
                               "label_sources": sorted({r.label_source for r in recs if r.label_source})}
        if by_round:
            row["round"] = key[2]
        for metric in summarised():
            row.update(image_summary(recs, metric))
        lab, lab_lo, lab_hi, _ = rate(recs, "label_accuracy")
        row.update(label_accuracy_mean=lab, label_accuracy_low=lab_lo, label_accuracy_high=lab_hi)
        row.update(_reid(recs))
        for a in attrs:
            for stat, v in _attribute(recs, a).items():
                row[f"attr_{a}_{stat}"] = v
        row["epsilon"], row["delta"], row["epsilon_source"] = epsilon(recs, runs)
        row.update(rero(recs, runs, context))
        if reference and defense != reference:
            row.update(_paired(recs, [r for r in records if str(r.defense) == reference and str(r.attack) == attack
                                      and (not by_round or record_round(r) == key[2])]))
        else:
            row.update(paired_n=None, paired_p=None, paired_too_few=None, paired_median_diff=None,
                       paired_note="reference" if defense == reference else "")
        util = [u for u in runs if "accuracy" in u and "n_test" in u]
        acc, acc_lo, acc_hi = pooled_accuracy(util)
        base_acc = pooled_accuracy(base_runs)[0] if base_runs else _mean(util, "baseline_accuracy")
        row.update(utility_accuracy_mean=acc, utility_accuracy_low=acc_lo, utility_accuracy_high=acc_hi,
                   utility_baseline_accuracy=base_acc,
                   utility_drop_mean=base_acc - acc if finite(base_acc) and util else math.nan,
                   utility_rounds=util[0].get("rounds") if util else None)
        if any(r.active for r in recs):  # a malicious server's row (passive rows keep their keys as they were)
            stopped = [r for r in recs if r.blocked]
            row.update(active=True, blocked=len(stopped), blocked_reason=stopped[0].blocked if stopped else None,
                       modification=next((dict(r.threat["modification"]) for r in recs
                                          if r.threat.get("modification")), {}))
        accs = [r.training.get("held_out_accuracy") for r in recs if r.training]
        row["model_accuracy"] = accs[0] if accs else None
        row["attack_s_mean"] = mean_ci([r.timings.get("attack_s", math.nan) for r in recs])[0]
        row.update(_untuned_row(recs))
        rows.append(row)
    return rows


def _untuned_row(recs: Sequence[AuditRecord]) -> dict[str, Any]:
    """A tuned group's tuning and its attack at the defaults on the same images (``untuned_<key>``)."""
    views = untuned_views(recs)
    if not views:
        return {"tuned": False}
    first = next(r.tuning for r in recs if r.tuning)
    out: dict[str, Any] = {"tuned": True, "tuned_options": tuned_options(recs), "tuning_trials": first.get("trials"),
                           "tuning_clients": first.get("clients"), "tuning_metric": first.get("metric"),
                           "tuning_s": sum(float(r.tuning.get("time_s") or 0.0) for r in recs if r.tuning)}
    for metric in summarised():
        out.update({f"{UNTUNED}_{k}": v for k, v in image_summary(views, metric).items()})
    lab, lo, hi, _ = rate(views, "label_accuracy")
    out.update({f"{UNTUNED}_label_accuracy_mean": lab, f"{UNTUNED}_label_accuracy_low": lo,
                f"{UNTUNED}_label_accuracy_high": hi})
    return out


def _mean(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(u[key]) for u in runs if finite(u.get(key))]
    return sum(vals) / len(vals) if vals else math.nan


__all__ = ["UNTUNED", "Pooled", "attribute_names", "criteria", "epsilon", "rero", "group", "image_count",
           "image_summary", "image_values", "options_text", "per_image_values", "pooled", "rate", "record_round",
           "summarise", "tuned_options", "untuned_view", "untuned_views"]
