"""What scores a cell's reconstructions, loaded from the ``[output]`` section (once per process).

- LPIPS (`output.lpips`, Zhang et al. 2018; AlexNet weights, cached by
  `giaudit.metrics.lpips`);
- attribute classifiers (`output.attributes`: folders written by
  `giaudit attribute train`), which read a private attribute off every
  reconstruction;
- the face analyzer (`output.semantic`: "offline" or "deepface"); when its
  backend is not installed the cell runs without it and its record says why;
- the re-identification gallery of a batch: with identities (an image folder
  with one subfolder per person) the enrolment photos outside the client
  pool, else the original and ``output.reid_gallery - 1`` other images of the
  pool drawn from the seed.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from giaudit.config import AuditSpec, OutputSection
from giaudit.metrics.assemble import Scorers
from giaudit.metrics.attributes import AttributeClassifier
from giaudit.metrics.faces import FaceBackendUnavailable, Gallery, get_analyzer, identity_gallery, originals_gallery
from giaudit.metrics.lpips import load_lpips
from giaudit.scenario.build import AnyScenario, load_data
from giaudit.scenario.capture import CaptureScenario
from giaudit.scenario.sections import DataSection
from giaudit.training import stable_seed
from giaudit.types import GroundTruth


def lpips_metric(output: OutputSection) -> Any:
    """The LPIPS metric when `output.lpips` is on (cached per process and weights file), else False (off)."""
    return load_lpips() if output.lpips else False


@lru_cache(maxsize=8)
def _load_classifier(folder: str) -> AttributeClassifier:
    return AttributeClassifier.load(folder)


def classifiers(output: OutputSection) -> dict[str, AttributeClassifier]:
    """The configured attribute classifiers (loaded once per process)."""
    return {name: _load_classifier(folder) for name, folder in (output.attributes or {}).items()}


def analyzer(output: OutputSection) -> tuple[Any, str | None]:
    """The face analyzer the config asks for, or (None, why not) when its backend is not installed."""
    if not output.semantic or not isinstance(output.semantic, str):
        return None, None
    try:
        return get_analyzer(output.semantic), None
    except FaceBackendUnavailable as exc:
        return None, f"semantic metrics unavailable: {exc}"


def scorers(spec: AuditSpec, face_analyzer: Any, user_level: bool) -> Scorers:
    """Everything that scores the cell's reconstructions (`face_analyzer` from `analyzer`)."""
    return Scorers(lpips=lpips_metric(spec.output), analyzer=face_analyzer, classifiers=classifiers(spec.output),
                   identities=spec.data.has_identities, user_level=user_level)


@lru_cache(maxsize=2)
def _identity_gallery(face_analyzer: Any, data: DataSection) -> Gallery:
    images = load_data(data)
    idx = torch.arange(len(images))
    outside = idx[idx % data.pool_every != 0] if data.pool_every > 1 else idx
    return identity_gallery(face_analyzer, images.images[outside].numpy(), images.labels[outside].tolist())


def gallery(spec: AuditSpec, face_analyzer: Any, scenario: AnyScenario | CaptureScenario,
            truth: GroundTruth | None, seed: int) -> Gallery | None:
    """Re-identification candidates for this batch (None without an analyzer or ground truth, when the backend
    has no identity model, or for a capture: it holds no pool to draw other people from)."""
    if face_analyzer is None or truth is None:
        return None
    if "identity" not in face_analyzer.provides or scenario.pool is None:
        return None
    if spec.data.has_identities:
        # Enrolment photos: images outside the client pool (every photo but the attacked ones when pool_every = 1).
        return _identity_gallery(face_analyzer, spec.data)
    n = spec.output.gallery_size
    pool = scenario.pool.images
    gen = torch.Generator().manual_seed(stable_seed("gallery", seed))
    order = torch.randperm(len(pool), generator=gen, device=gen.device)
    batch = truth.images.reshape(truth.images.shape[0], -1)
    keep = [int(i) for i in order if not bool((pool[i].reshape(1, -1) == batch).all(1).any())][: n - 1]
    if not keep:
        return None
    return originals_gallery(face_analyzer, pool[keep].numpy(), len(keep) + 1)
