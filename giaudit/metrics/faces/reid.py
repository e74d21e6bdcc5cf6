"""Re-identification: could the curious server tell *who* a reconstruction shows?

A mean cosine similarity between embeddings (about 0.8 with dlib even for a
reconstruction with no visible face) is not a quantity a reader can act on.
Re-identification is: for every reconstruction, rank the candidates of a
gallery by the backend's own identity distance (dlib: Euclidean, deepface:
cosine) and ask whether the true person comes first (rank-1) or among the
first five (rank-5). Chance is 1/N and 5/N for a gallery of N candidates.

Two galleries, chosen by the data:

- ``identities`` (the data has identities, e.g. ORL's people or any
  ``subfolder`` data): one embedding per identity, the mean embedding of up
  to a few *other* photos of that person (images outside the client's pool,
  so the attacked photo itself is never in the gallery). This is the
  realistic server: it holds enrolment photos and asks whose face leaked.
- ``originals`` (no identities): the original plus N−1 other originals of
  the client pool (default N = 100). The true candidate is the exact
  original, so rank-1 says "the reconstruction is closer to this image than
  to 99 other people's images".

Rates over many records are reported with a 95 % Wilson score interval
(`giaudit.stats.wilson_interval`), which stays inside [0, 1] and is sensible
for the 0/1 outcomes of batch-1 audits.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from giaudit.errors import DataError
from giaudit.metrics.faces.base import FaceAnalyzer

GALLERY_KINDS = ("identities", "originals")


@dataclass(frozen=True)
class Gallery:
    """Candidates for re-identification.

    kind ``identities``: ``embeddings`` has one row per identity, ``keys`` the identity of each row.
    kind ``originals``: ``embeddings`` are distractors (other originals of the pool); the candidate set of
    original i is its own embedding followed by the first ``size - 1`` distractors.
    """

    kind: str
    embeddings: np.ndarray
    size: int
    keys: tuple[Hashable, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in GALLERY_KINDS:
            raise DataError(f"gallery kind {self.kind!r}: use one of {', '.join(GALLERY_KINDS)}")
        if self.kind == "identities" and len(self.keys) != len(self.embeddings):
            raise DataError("identity gallery: one key per embedding")
        if self.size < 1:
            raise DataError("gallery: empty")

    def describe(self) -> str:
        if self.kind == "identities":
            return f"gallery of {self.size} identities (mean embedding of other photos of each person)"
        return f"gallery of the original and {self.size - 1} other originals of the client pool"


def distances(analyzer: FaceAnalyzer, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The backend's identity distance from one embedding to each row of ``candidates``."""
    q = np.asarray(query, np.float64).ravel()
    c = np.asarray(candidates, np.float64).reshape(len(candidates), -1)
    if analyzer.identity_metric == "cosine":
        nq = np.linalg.norm(q)
        nc = np.linalg.norm(c, axis=1)
        denom = np.where((nc == 0) | (nq == 0), 1.0, nc * nq)
        return 1.0 - np.where((nc == 0) | (nq == 0), 0.0, c @ q / denom)
    return np.asarray(np.linalg.norm(c - q, axis=1))


def rank_of(d: np.ndarray, true_index: int) -> int:
    """1 + the number of candidates strictly closer than the true one (ties favour the true one)."""
    return 1 + int(np.sum(d < d[true_index]))


def identity_gallery(analyzer: FaceAnalyzer, images: np.ndarray, identities: Sequence[Hashable], *,
                     per_identity: int = 3) -> Gallery:
    """One mean embedding per identity from up to ``per_identity`` images of each (first ones, in order)."""
    if len(images) != len(identities):
        raise DataError(f"identity gallery: {len(images)} images for {len(identities)} identities")
    chosen: dict[Hashable, list[int]] = {}
    for i, key in enumerate(identities):
        if len(chosen.setdefault(key, [])) < per_identity:
            chosen[key].append(i)
    if not chosen:
        raise DataError("identity gallery: no images")
    order = [i for idx in chosen.values() for i in idx]
    embs = [a.embedding for a in analyzer.analyze(np.asarray(images)[order], what=("identity",))]
    by_index = dict(zip(order, embs))
    keys, rows = [], []
    for key, idx in chosen.items():
        got = [e for i in idx if (e := by_index[i]) is not None]
        if got:
            keys.append(key)
            rows.append(np.mean(np.stack(got).astype(np.float64), axis=0))
    if not rows:
        raise DataError("identity gallery: the backend computed no embedding")
    return Gallery("identities", np.stack(rows), len(rows), tuple(keys))


def originals_gallery(analyzer: FaceAnalyzer, distractors: np.ndarray, size: int = 100) -> Gallery:
    """The original plus ``size - 1`` distractors (other originals of the pool, none of them in the batch)."""
    if size < 2:
        raise DataError("re-identification gallery size: must be >= 2")
    pick = np.asarray(distractors)[: size - 1]
    embs = [a.embedding for a in analyzer.analyze(pick, what=("identity",))]
    rows = [e for e in embs if e is not None]
    if not rows:
        raise DataError("originals gallery: the backend computed no embedding")
    return Gallery("originals", np.stack(rows).astype(np.float64), len(rows) + 1)


def reid_rank(analyzer: FaceAnalyzer, gallery: Gallery, embedding: np.ndarray | None,
              original_embedding: np.ndarray | None, identity: Hashable | None) -> int | None:
    """Rank of the true candidate for one reconstruction's embedding (None when it cannot be scored)."""
    if embedding is None:
        return None
    if gallery.kind == "identities":
        if identity not in gallery.keys:
            return None
        return rank_of(distances(analyzer, embedding, gallery.embeddings), gallery.keys.index(identity))
    if original_embedding is None:
        return None
    cands = np.concatenate([np.asarray(original_embedding, np.float64)[None], gallery.embeddings])
    return rank_of(distances(analyzer, embedding, cands), 0)


__all__ = ["GALLERY_KINDS", "Gallery", "distances", "identity_gallery", "originals_gallery", "rank_of",
           "reid_rank"]
