"""Semantic leakage metrics: does a reconstruction reveal who it is and their attributes?

Seed 003 (user-level gradient inversion, Table 1b) scores reconstructions by
face detection rate, its batch-ensemble variant (the batch counts as detected
when at least one reconstruction holds a detectable face), facial
similarity in an embedding space, gender and race accuracy and age error, and
reports the same figures on the original batch as a reference row (the
predictors' own error). Threat model: any; the metrics look at the
attack's output only, scored against the auditor's ground truth.

Pairs:
- sample level (``user_level=False``): row i of ``reconstruction`` against row
  i of ``original`` (the caller matched them already, e.g. Hungarian on MSE);
- user level (``user_level=True``): every reconstruction (usually the single
  representative image) against every original of the batch.

Truth for gender / race / age is the data's label when ``labels_meta[i]`` has
it (UTKFace file names: "gender" 0 male 1 female, "race" 0..4, "age" years),
otherwise the analyzer's own prediction on the original. Identity truth is
always the original's embedding.

Aggregates (keys): face_detection_rate, face_detection_batch,
identity_similarity (mean cosine similarity of embeddings),
identity_match_rate (share of pairs the backend verifies as the same person),
gender_accuracy, race_accuracy (only when the backend has a race model),
age_abs_error (years); with a ``gallery`` (`giaudit.metrics.faces.reid`):
reid_rank1 / reid_rank5 (share of reconstructions whose true person ranks
first / in the first five), reid_gallery_size (N: chance is 1/N and 5/N) and
reid_scored (how many reconstructions had an embedding to rank). Attributes of a reconstruction without a detected face
are read from its whole frame (our images are face crops), so a poor
reconstruction scores near chance rather than being dropped.

Reference row (same keys, on the originals): detection on the originals; the
analyzer's attribute error against the labels (attributes without labels have
no reference: the analyzer would be scored against itself); identity over
pairs of *different* originals of the batch (for a user-level batch: how
similar two photos of the same person look to the backend; for a
sample-level batch: the level between different images), absent for a batch
of one image.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from giaudit.errors import DataError
from giaudit.metrics.faces.base import FaceAnalysis, FaceAnalyzer, check_images, cosine_similarity
from giaudit.metrics.faces.reid import Gallery, reid_rank

ATTRIBUTES = ("gender", "race", "age")


@dataclass(frozen=True)
class SemanticResult:
    aggregate: dict[str, float]
    per_image: list[dict[str, Any]]
    reference: dict[str, float]
    notes: list[str] = field(default_factory=list)


def _label(meta: Mapping[str, Any] | None, key: str) -> float | None:
    if not meta or key not in meta or meta[key] is None:
        return None
    try:
        return float(meta[key])
    except (TypeError, ValueError) as exc:
        raise DataError(f"labels_meta[...][{key!r}] = {meta[key]!r} is not a number") from exc


def _attr_value(a: FaceAnalysis, attr: str) -> float | None:
    v = getattr(a, attr)
    return None if v is None else float(v)


def _score(attr: str, pred: float, truth: float) -> float:
    return abs(pred - truth) if attr == "age" else float(round(pred) == round(truth))


# How to get an attribute the backend lacks (named in the report's note).
_ENABLE = {"race": "; for race set output.semantic = 'deepface' and run `giaudit weights fetch deepface-race`"}

_KEY = {"gender": "gender_accuracy", "race": "race_accuracy", "age": "age_abs_error"}


def semantic_metrics(original: np.ndarray, reconstruction: np.ndarray, *, analyzer: FaceAnalyzer,
                     labels_meta: Sequence[Mapping[str, Any]] | None = None,
                     user_level: bool = False, gallery: Gallery | None = None,
                     identities: Sequence[Hashable] | None = None) -> SemanticResult:
    """Face, identity and attribute leakage of ``reconstruction`` about ``original``.

    ``original``/``reconstruction``: float N,C,H,W in [0, 1] (C = 1 or 3).
    ``labels_meta``: one mapping per original (may be empty or lack keys).
    ``gallery``: re-identification candidates; an ``identities`` gallery needs ``identities`` (the identity
    of each original, as in ``gallery.keys``).
    """
    orig = check_images(original, "original")
    rec = check_images(reconstruction, "reconstruction")
    n, r = orig.shape[0], rec.shape[0]
    if n == 0 or r == 0:
        raise DataError("semantic metrics: empty image batch")
    if not user_level and n != r:
        raise DataError(f"semantic metrics: {r} reconstructions for {n} originals; sample-level pairs need "
                        "matched batches of equal size (or pass user_level=True)")
    if labels_meta is not None and len(labels_meta) not in (0, n):
        raise DataError(f"labels_meta: {len(labels_meta)} entries for {n} originals")
    metas: list[Mapping[str, Any] | None] = list(labels_meta) if labels_meta else [None] * n
    if gallery is not None and gallery.kind == "identities" and (identities is None or len(identities) != n):
        raise DataError("semantic metrics: an identity gallery needs one identity per original")

    provides = analyzer.provides
    what = [c for c in ("detection", "identity", *ATTRIBUTES) if c in provides or c == "detection"]
    a_orig = analyzer.analyze(orig, what=what)
    a_rec = analyzer.analyze(rec, what=what)
    if len(a_orig) != n or len(a_rec) != r:
        raise DataError(f"analyzer {analyzer.name} returned the wrong number of results")

    notes = [f"faces analysed by {analyzer.describe()}; input images "
             f"{orig.shape[2]}x{orig.shape[3]} {'grey' if orig.shape[1] == 1 else 'RGB'}"]
    attrs = [a for a in ATTRIBUTES if a in provides]
    for a in ATTRIBUTES:
        if a not in provides:
            notes.append(f"{a}: unavailable with the {analyzer.name} backend{_ENABLE.get(a, '')}")
    sources = {}
    for a in attrs:
        labelled = sum(_label(m, a) is not None for m in metas)
        sources[a] = ("labels" if labelled == n else "analyzer on the originals" if labelled == 0
                      else f"labels for {labelled} of {n} originals, analyzer on the others")
        notes.append(f"{a} truth: {sources[a]}")

    pairs = [(j, i) for j in range(r) for i in range(n)] if user_level else [(i, i) for i in range(n)]
    per_image: list[dict[str, Any]] = []
    acc: dict[str, list[float]] = {k: [] for k in ("sim", "match", "rank", *attrs)}
    for j, i in pairs:
        ar, ao = a_rec[j], a_orig[i]
        row: dict[str, Any] = {"recon_index": j, "truth_index": i, "face_detected": ar.detected,
                               "original_face_detected": ao.detected}
        if "identity" in provides and ar.embedding is not None and ao.embedding is not None:
            sim = cosine_similarity(ar.embedding, ao.embedding)
            dist = analyzer.identity_distance(ar.embedding, ao.embedding)
            match = dist < analyzer.identity_threshold
            row.update(identity_similarity=sim, identity_distance=dist, identity_match=bool(match))
            acc["sim"].append(sim)
            acc["match"].append(float(match))
        if gallery is not None and "identity" in provides:
            rank = reid_rank(analyzer, gallery, ar.embedding, ao.embedding, identities[i] if identities else None)
            row["reid_rank"] = rank
            if rank is not None:
                acc["rank"].append(float(rank))
        for a in attrs:
            truth = _label(metas[i], a)
            if truth is None:
                truth = _attr_value(ao, a)
            pred = _attr_value(ar, a)
            row[f"{a}_true"], row[f"{a}_pred"] = truth, pred
            if truth is not None and pred is not None:
                acc[a].append(_score(a, pred, truth))
        per_image.append(row)

    aggregate: dict[str, float] = {
        "face_detection_rate": float(np.mean([x.detected for x in a_rec])),
        "face_detection_batch": float(any(x.detected for x in a_rec)),
    }
    if acc["sim"]:
        aggregate["identity_similarity"] = float(np.mean(acc["sim"]))
        aggregate["identity_match_rate"] = float(np.mean(acc["match"]))
    for a in attrs:
        if acc[a]:
            aggregate[_KEY[a]] = float(np.mean(acc[a]))
    if gallery is not None and "identity" in provides:
        aggregate.update(_reid_aggregate(acc["rank"], gallery))
        notes.append(f"re-identification: {gallery.describe()}")

    reference: dict[str, float] = {
        "face_detection_rate": float(np.mean([x.detected for x in a_orig])),
        "face_detection_batch": float(any(x.detected for x in a_orig)),
    }
    embs = [x.embedding for x in a_orig if x.embedding is not None]
    if "identity" in provides and n > 1 and len(embs) == n:
        sims, matches = [], []
        for i in range(n):
            for k in range(i + 1, n):
                sims.append(cosine_similarity(embs[i], embs[k]))
                matches.append(float(analyzer.same_identity(embs[i], embs[k])))
        reference["identity_similarity"] = float(np.mean(sims))
        reference["identity_match_rate"] = float(np.mean(matches))
        notes.append("reference identity: between different originals of the batch")
    for a in attrs:
        scores = [_score(a, p, t) for m, x in zip(metas, a_orig)
                  if (t := _label(m, a)) is not None and (p := _attr_value(x, a)) is not None]
        if scores:
            reference[_KEY[a]] = float(np.mean(scores))
    if gallery is not None and gallery.kind == "identities" and "identity" in provides and identities:
        # The originals against the same gallery: how well the backend re-identifies a perfect reconstruction.
        ranks = [rank for x, ident in zip(a_orig, identities)
                 if (rank := reid_rank(analyzer, gallery, x.embedding, None, ident)) is not None]
        reference.update(_reid_aggregate([float(r) for r in ranks], gallery))
    return SemanticResult(aggregate, per_image, reference, notes)


def _reid_aggregate(ranks: Sequence[float], gallery: Gallery) -> dict[str, float]:
    out = {"reid_gallery_size": float(gallery.size), "reid_scored": float(len(ranks))}
    if ranks:
        r = np.asarray(ranks)
        out["reid_rank1"] = float(np.mean(r <= 1))
        out["reid_rank5"] = float(np.mean(r <= 5))
    return out
