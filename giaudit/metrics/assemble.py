"""A cell's metrics: every client's reconstruction scored against its private batch, then merged.

`assess` runs `giaudit.metrics.evaluate` (Hungarian matching, MSE / PSNR /
SSIM / LPIPS, label accuracy) on each client's (ground truth, reconstruction)
pair, adds the semantic metrics of a face analyzer (`giaudit.metrics.faces`)
and the attribute classifiers' scores when they are configured, and merges
the clients' aggregates (`merge_metrics`: means and rates weighted by
images, worst cases over all images). With several clients the per-image rows
are ranked together, most leaked first. Each row carries an `image_key` (a
hash of the private image), so comparisons pair the same image across
defenses.

User-level scoring (`Scorers.user_level`: the run holds a user-level attack
such as DiffULA, which reconstructs one representative image per user): the
semantic and attribute scores are also taken over every (distinct
reconstruction, original) pair, user_-prefixed.

Metrics see only reconstructions and ground truth: nothing here knows the
attack or the defense that produced them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from giaudit.metrics.attributes import AttributeClassifier, score_attributes
from giaudit.metrics.evaluate import distinct_rows, evaluate
from giaudit.metrics.faces import Gallery, semantic_metrics
from giaudit.metrics.registry import merge_values, parse
from giaudit.types import GroundTruth, Reconstruction


@dataclass(frozen=True)
class Scorers:
    """What scores a reconstruction beyond the image metrics; every part is optional."""

    lpips: Any = None                     # a loaded LPIPS metric (giaudit.metrics.lpips.load_lpips)
    analyzer: Any = None                  # a face analyzer (giaudit.metrics.faces.get_analyzer)
    classifiers: dict[str, AttributeClassifier] | None = None  # attribute name -> classifier
    identities: bool = False              # the labels are people: re-identify against identities
    user_level: bool = False              # also score every (reconstruction, original) pair


@dataclass(frozen=True)
class Assessment:
    """The merged scores of one cell's clients, and the matched images they were taken on."""

    metrics: dict[str, float]
    per_image: list[dict[str, Any]]
    notes: list[str]
    original: numpy.ndarray         # N,C,H,W float32, every client's matched originals in order
    reconstruction: numpy.ndarray   # paired row by row with `original`


def image_key(image: numpy.ndarray) -> str:
    """Identifies a private image (a hash of its pixels), so comparisons pair the same image across defenses."""
    return hashlib.sha256(numpy.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def assess(truths: Sequence[GroundTruth], reconstructions: Sequence[Reconstruction], scorers: Scorers,
           galleries: Sequence[Gallery | None] | None = None) -> Assessment:
    """Score client c's reconstruction against its batch `truths[c]` (with its re-identification gallery
    `galleries[c]`) and merge the clients; rows of several clients carry `client` and a joint `rank`."""
    parts, per_image, notes, originals, recs = [], [], [], [], []
    several = len(reconstructions) > 1
    for c, (truth, rec) in enumerate(zip(truths, reconstructions)):
        m, rows, n, ev = _evaluate_one(truth, rec, scorers.lpips, scorers.analyzer,
                                       gallery=galleries[c] if galleries else None, identities=scorers.identities,
                                       classifiers=scorers.classifiers, user_level=scorers.user_level)
        parts.append(m)
        per_image += [{**row, "client": c} if several else row for row in rows]
        notes += [x for x in n if x not in notes]
        originals.append(ev.original)
        recs.append(ev.reconstruction)
    metrics = merge_metrics(parts, [len(t.labels) for t in truths])
    if several:
        per_image.sort(key=lambda p: (p["mse"], -p["ssim"], p["client"], p["truth_index"]))
        for r, row in enumerate(per_image):
            row["rank"] = r + 1
    return Assessment(metrics, per_image, notes, numpy.concatenate(originals), numpy.concatenate(recs))


def _evaluate_one(truth: Any, rec: Any, lpips_metric: Any, analyzer: Any, *, gallery: Gallery | None = None,
                  identities: bool = False, classifiers: dict[str, AttributeClassifier] | None = None,
                  user_level: bool = False) -> tuple[dict[str, float], list[dict[str, Any]], list[str], Any]:
    ev = evaluate(rec, truth, lpips=lpips_metric, user_level=user_level)
    metrics = dict(ev.aggregate)
    per_image = [dict(p) for p in ev.per_image]
    notes = list(ev.notes)
    metas = [truth.meta[p["truth_index"]] for p in per_image] if truth.meta else []
    labels = [int(truth.labels[p["truth_index"]]) for p in per_image]
    if analyzer is not None:
        sem = semantic_metrics(ev.original, ev.reconstruction, analyzer=analyzer, labels_meta=metas or None,
                               gallery=gallery, identities=labels if identities else None)
        metrics.update(sem.aggregate)
        metrics.update({f"reference_{k}": v for k, v in sem.reference.items()})
        for row, extra in zip(per_image, sem.per_image):
            row.update(extra)
        notes.extend(sem.notes)
    if classifiers:
        agg, rows, ref, attr_notes = score_attributes(ev.original, ev.reconstruction, metas, labels, classifiers)
        metrics.update(agg)
        metrics.update({f"reference_{k}": v for k, v in ref.items()})
        for row, extra in zip(per_image, rows):
            row.update(extra)
        notes.extend(attr_notes)
    if user_level and (analyzer is not None or classifiers):
        metrics.update(_user_level_semantics(ev, labels, metas, analyzer, gallery, identities, classifiers))
    for row, img in zip(per_image, ev.original):
        row["image_key"] = image_key(img)
    return metrics, per_image, notes, ev


def _user_level_semantics(ev: Any, labels: list[int], metas: list[dict[str, Any]], analyzer: Any,
                          gallery: Gallery | None, identities: bool,
                          classifiers: dict[str, AttributeClassifier] | None) -> dict[str, float]:
    """The semantic and attribute scores over every (distinct reconstruction, original) pair, user_-prefixed:
    what a user-level attack claims (one image stands for the whole batch), applied to every attack of the run
    so sample-level baselines are scored the same way."""
    keep = distinct_rows(ev.reconstruction)
    rec, orig = ev.reconstruction[keep], ev.original
    out: dict[str, float] = {}
    if analyzer is not None:
        sem = semantic_metrics(orig, rec, analyzer=analyzer, labels_meta=metas or None, user_level=True,
                               gallery=gallery, identities=labels if identities else None)
        out.update(sem.aggregate)
    if classifiers:
        n = len(orig)
        pairs_rec = numpy.repeat(rec, n, axis=0)
        pairs_orig = numpy.tile(orig, (len(keep), 1, 1, 1))
        agg, _, _, _ = score_attributes(pairs_orig, pairs_rec, metas * len(keep), labels * len(keep),
                                        classifiers)
        out.update(agg)
    # Counts and chance levels are not leakage measured over pairs: they keep their sample-level names only.
    return {f"user_{k}": v for k, v in out.items() if _leak_measure(k)}


def _leak_measure(key: str) -> bool:
    """The key measures leakage (not a count such as the gallery size, nor a chance level)."""
    found = parse(key)
    return found is None or (found.metric.kind != "count" and found.metric.leak is not None)


def merge_metrics(parts: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """Aggregates over several clients' images (`sizes` images each), key by key as the metric registry says:
    worst cases over all, counts summed or at their minimum, means and rates weighted by images."""
    if len(parts) == 1:
        return parts[0]
    return {key: merge_values(key, [(p[key], n) for p, n in zip(parts, sizes) if key in p and p[key] is not None])
            for key in dict.fromkeys(k for p in parts for k in p)}
