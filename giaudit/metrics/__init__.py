"""Image metrics, Hungarian matching, LPIPS and the evaluator.

Only `evaluate` ever sees ground truth (see ../../shared/spec/design.md): it
pairs reconstructed with private images (`match`), measures each pair (`mse`,
`psnr`, `ssim`, optionally LPIPS via `load_lpips`) and ranks them most leaked
first. Note: `giaudit.metrics.evaluate` the *function* shadows the submodule
of the same name as a package attribute; import the dataclass with
``from giaudit.metrics.evaluate import Evaluation`` (which works) rather than
``import giaudit.metrics.evaluate as m``.
"""
from giaudit.metrics.evaluate import PSNR_CAP_DB, Evaluation, evaluate
from giaudit.metrics.image import mse, psnr, ssim
from giaudit.metrics.lpips import LPIPSMetric, load_lpips
from giaudit.metrics.matching import match, pairwise_mse

__all__ = [
    "PSNR_CAP_DB", "Evaluation", "evaluate", "mse", "psnr", "ssim",
    "LPIPSMetric", "load_lpips", "match", "pairwise_mse",
]
