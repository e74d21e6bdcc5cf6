"""Full-reference image metrics: MSE, PSNR and SSIM, per image, in torch.

Used by `giaudit.metrics.evaluate` to measure how much of a private batch a
gradient-inversion attack recovered (any threat model: the metrics compare a
reconstruction with the ground truth, which only the evaluator holds).

- PSNR: 10 log10(peak^2 / MSE), MSE over all C*H*W values of one image.
- SSIM: Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 2004. Gaussian 11x11 window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) covariance.

The SSIM reproduces exactly what
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=0)`` returns:
scikit-image filters with scipy's 'reflect' border mode and then averages the
SSIM map only over pixels at least ``(11 - 1) // 2 = 5`` pixels from every
border. A pixel kept by that crop has its whole 11-tap window inside the
image, so the padded values never reach the mean: a 'valid' convolution
(no padding at all) gives the same number. Channels are treated separately
and their means averaged, as scikit-image does with ``channel_axis``.

All inputs are N,C,H,W float tensors in [0, 1]; every function returns a
float64 tensor of length N. The arithmetic runs in float64 because SSIM's
variances are differences of nearly equal numbers (E[x^2] - E[x]^2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from giaudit.errors import DataError

# SSIM constants of Wang et al. (2004) and scikit-image's window rule:
# radius = int(truncate * sigma + 0.5) with truncate = 3.5 gives 11 taps.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Check two image batches have the same N,C,H,W shape; return float64 copies."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise DataError(f"image metrics take torch tensors; got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 4 or b.dim() != 4:
        raise DataError(f"image metrics take N,C,H,W batches; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise DataError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error of each image pair over all C*H*W values."""
    x, y = _pair(a, b)
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(a: Tensor, b: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, per image.

    Identical images (MSE exactly 0) give +inf: that is the true value and the
    per-image tables keep it; aggregates cap it (see `evaluate.PSNR_CAP_DB`).
    """
    if not peak > 0:
        raise DataError(f"psnr peak must be positive; got {peak}")
    err = mse(a, b)
    out = torch.full_like(err, math.inf)
    nz = err > 0
    out[nz] = 10.0 * torch.log10(peak * peak / err[nz])
    return out


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> Tensor:
    """1-D Gaussian weights as scipy.ndimage.gaussian_filter builds them (normalised to sum 1)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device="cpu")
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _blur_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian filter per channel, keeping only fully-covered pixels."""
    c = x.shape[1]
    k = taps.numel()
    kh = taps.view(1, 1, k, 1).expand(c, 1, k, 1)
    kw = taps.view(1, 1, 1, k).expand(c, 1, 1, k)
    return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of each image pair (channels averaged), as scikit-image computes it."""
    x, y = _pair(a, b)
    if not data_range > 0:
        raise DataError(f"ssim data_range must be positive; got {data_range}")
    taps = _gaussian_taps()
    win = taps.numel()
    h, w = x.shape[-2:]
    if h < win or w < win:
        raise DataError(f"SSIM needs images of at least {win}x{win} pixels (its Gaussian window); got {h}x{w}")
    n, c = x.shape[:2]
    # One pass over the five filtered maps by stacking them along the channel axis.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    ux, uy, uxx, uyy, uxy = _blur_valid(stack, taps).split(c, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # Mean over the cropped map of each channel, then over channels; equal-sized
    # channels make this the mean over all kept values.
    return s.reshape(n, -1).mean(1)
