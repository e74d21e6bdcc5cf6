"""Image metrics, Hungarian matching, LPIPS, the evaluator and the metric registry.

Only `evaluate` ever sees ground truth: it pairs reconstructed with private
images (`match`), measures each pair (`mse`, `psnr`, `ssim`, optionally LPIPS
via `load_lpips`) and ranks them most leaked first. Every metric a record can
hold, with its direction, kind, unit and label, is one entry of
`giaudit.metrics.registry`. Note: `giaudit.metrics.evaluate` the *function*
shadows the submodule of the same name as a package attribute; import the
dataclass with ``from giaudit.metrics.evaluate import Evaluation``.
"""
from giaudit.metrics.evaluate import PSNR_CAP_DB, Evaluation, evaluate
from giaudit.metrics.image import mse, psnr, ssim
from giaudit.metrics.lpips import LPIPSMetric, load_lpips
from giaudit.metrics.matching import match, pairwise_mse
from giaudit.metrics.registry import METRICS, Metric, is_metric

__all__ = [
    "PSNR_CAP_DB", "Evaluation", "evaluate", "mse", "psnr", "ssim",
    "LPIPSMetric", "load_lpips", "match", "pairwise_mse", "METRICS", "Metric", "is_metric",
]
