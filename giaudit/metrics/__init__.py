"""Image metrics, Hungarian matching, LPIPS and the evaluator.

Only `evaluate` ever sees ground truth (see ../../shared/spec/design.md): it
pairs reconstructed with private images (`match`), measures each pair (`mse`,
`psnr`, `ssim`, optionally LPIPS via `load_lpips`) and ranks them most leaked
first. Note: `giaudit.metrics.evaluate` the *function* shadows the submodule
of the same name as a package attribute; import the dataclass with
``import re

from giaudit.metrics.evaluate import Evaluation`` (which works) rather than
``import giaudit.metrics.evaluate as m``.
"""
import re

from giaudit.metrics.evaluate import PSNR_CAP_DB, Evaluation, evaluate
from giaudit.metrics.image import mse, psnr, ssim
from giaudit.metrics.lpips import LPIPSMetric, load_lpips
from giaudit.metrics.matching import match, pairwise_mse

# Every metric a record can hold (image metrics from `evaluate`, semantic ones from
# `faces.semantic_metrics`); records add _mean / _worst variants and reference_ values.
# Policies are checked against this list when they are read.
METRIC_NAMES = (
    "mse", "psnr_db", "ssim", "lpips", "label_accuracy",
    "face_detection_rate", "face_detection_batch", "identity_similarity", "identity_match_rate",
    "gender_accuracy", "race_accuracy", "age_abs_error",
    "reid_rank1", "reid_rank5", "reid_gallery_size", "reid_scored",
)
# A run with a user-level attack also scores every (reconstruction, original) pair: the same names, user_-prefixed.
# Attribute classifiers (`giaudit attribute train`) add attribute_NAME_accuracy and attribute_NAME_chance.
_ATTRIBUTE = re.compile(r"^attribute_[A-Za-z0-9_]+_(accuracy|chance)$")


def is_metric(name: str) -> bool:
    """`name` is one of METRIC_NAMES, optionally reference_- or user_-prefixed and _mean/_worst-suffixed."""
    base = name.removeprefix("reference_").removeprefix("user_")
    for suffix in ("_mean", "_worst"):
        base = base.removesuffix(suffix)
    return base in METRIC_NAMES or bool(_ATTRIBUTE.match(base))


__all__ = [
    "PSNR_CAP_DB", "Evaluation", "evaluate", "mse", "psnr", "ssim",
    "LPIPSMetric", "load_lpips", "match", "pairwise_mse", "METRIC_NAMES", "is_metric",
]
