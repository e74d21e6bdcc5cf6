"""Figures for audit reports: image grids and loss curves as PNG bytes.

Generic helpers shared by the single-run report (`giaudit.report.render`) and
the defense comparison report: nothing here knows about records or threat
models. The grid shows what a gradient-inversion attacker recovered next to
the private original (the visual evidence of Zhu et al.'s DLG and Geiping et
al.'s Inverting Gradients papers); the loss curves show the attacker's
gradient-matching loss per iteration, which is all the attacker itself can
see (it never sees the originals).

Matplotlib is used through `matplotlib.figure.Figure` + the Agg canvas
directly, never `pyplot`, so rendering neither changes the process-wide
backend nor leaks figures in long sweeps. PNGs carry no timestamp or software
metadata, so rendering the same results twice gives identical bytes.
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

# Deterministic PNG output: no "Software" key (it names the matplotlib version).
_PNG_META = {"Software": None}


def new_figure(figsize: tuple[float, float], dpi: int = 100):
    """A headless matplotlib Figure attached to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig, *, dpi: int | None = None) -> bytes:
    """Render a Figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08,
                facecolor="white", metadata=_PNG_META)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...` so HTML reports need no side files."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """One CHW (or HW) float image -> (array for imshow, colormap).

    Values are clipped to [0, 1]: reconstructions may overshoot the data range
    and imshow would otherwise rescale each image on its own, hiding how far
    off it is.
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        return np.clip(a, 0.0, 1.0), "gray"
    if a.ndim != 3:
        raise ValueError(f"expected a CHW or HW image, got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    if a.shape[0] == 1:
        return np.clip(a[0], 0.0, 1.0), "gray"
    if a.shape[0] == 3:
        return np.clip(np.transpose(a, (1, 2, 0)), 0.0, 1.0), None
    # Other channel counts: show the mean as grey rather than refusing.
    return np.clip(a.mean(axis=0), 0.0, 1.0), "gray"


def pair_grid_png(original: np.ndarray, reconstruction: np.ndarray,
                  captions: Sequence[str] | None = None, *, pairs_per_row: int = 4,
                  max_pairs: int | None = 32, cell_inches: float = 1.25,
                  labels: tuple[str, str] = ("original", "reconstruction"),
                  title: str | None = None) -> bytes:
    """Grid of (original | reconstruction) pairs, row i of one beside row i of the other.

    `original` and `reconstruction` are N,C,H,W (or N,H,W) arrays in [0,1],
    already matched and ordered (most leaked first in our reports).
    `captions[i]` is written under pair i. At most `max_pairs` pairs are drawn
    (the first ones, i.e. the most leaked); None draws all.
    """
    original = np.asarray(original)
    reconstruction = np.asarray(reconstruction)
    if original.shape[0] != reconstruction.shape[0]:
        raise ValueError(f"{original.shape[0]} originals but {reconstruction.shape[0]} reconstructions")
    n_total = original.shape[0]
    n = n_total if max_pairs is None else min(n_total, max_pairs)
    if n == 0:
        raise ValueError("no image pairs to draw")
    cols = max(1, min(pairs_per_row, n))
    rows = math.ceil(n / cols)
    has_caption = captions is not None
    # Height per grid row: the images plus room for the caption line(s).
    row_h = cell_inches + (0.42 if has_caption else 0.12)
    fig = new_figure((cols * 2 * cell_inches + (cols - 1) * 0.25, rows * row_h + (0.35 if title else 0.0)))
    outer = fig.add_gridspec(rows, cols, wspace=0.12, hspace=0.45 if has_caption else 0.15)
    for i in range(n):
        r, c = divmod(i, cols)
        inner = outer[r, c].subgridspec(1, 2, wspace=0.04)
        for j, (arr, lab) in enumerate(((original[i], labels[0]), (reconstruction[i], labels[1]))):
            ax = fig.add_subplot(inner[0, j])
            img, cmap = to_display(arr)
            ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("#9aa5b1")
            if r == 0:
                ax.set_title(lab, fontsize=8, color="#52606d", pad=3)
            if j == 0 and captions is not None and i < len(captions):
                # Caption centred under the pair: anchor at the right edge of the original.
                ax.text(1.02, -0.06, captions[i], transform=ax.transAxes, ha="center", va="top",
                        fontsize=7.5, color="#1f2933")
    if title:
        fig.suptitle(title, fontsize=10)
    if n < n_total:
        fig.text(0.5, 0.0, f"showing the {n} most leaked of {n_total} pairs", ha="center", va="top",
                 fontsize=8, color="#52606d")
    return figure_to_png(fig)


def image_grid_png(images: np.ndarray, *, per_row: int = 8, max_images: int | None = 32,
                   cell_inches: float = 1.25, title: str | None = None) -> bytes:
    """Grid of images alone (N,C,H,W or N,H,W in [0, 1]): the reconstructions of an audit without ground truth."""
    images = np.asarray(images)
    n = images.shape[0] if max_images is None else min(images.shape[0], max_images)
    if n == 0:
        raise ValueError("no images to draw")
    cols = max(1, min(per_row, n))
    rows = math.ceil(n / cols)
    fig = new_figure((cols * cell_inches, rows * cell_inches + (0.35 if title else 0.1)))
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        img, cmap = to_display(images[i])
        ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_png(fig)


def positive_finite(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(iteration index, value) for the entries a log axis can show.

    Losses can reach exactly 0 or become NaN when an optimiser diverges; those
    points are dropped rather than breaking the log scale.
    """
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    x = np.arange(1, y.size + 1)
    keep = np.isfinite(y) & (y > 0)
    return x[keep], y[keep]


def loss_curves_figure(series: Mapping[str, Sequence[float]], *, title: str = "Gradient-matching loss",
                       xlabel: str = "iteration", ylabel: str = "matching loss (log scale)",
                       max_legend: int = 16, figsize: tuple[float, float] = (8.0, 4.2)):
    """One log-scale line per named series (e.g. per record). Returns the Figure.

    Raises ValueError when no series has a point to plot, so callers can say
    "no loss trace recorded" instead of embedding an empty plot.
    """
    fig = new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for name, values in series.items():
        x, y = positive_finite(values)
        if y.size == 0:
            continue
        label = name if drawn < max_legend else None
        if y.size == 1:
            ax.plot(x, y, marker="o", label=label)
        else:
            ax.plot(x, y, linewidth=1.3, label=label)
        drawn += 1
    if drawn == 0:
        raise ValueError("no positive finite loss values to plot")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ncol = 1 if drawn <= 8 else 2
    ax.legend(fontsize=7.5, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol)
    if drawn > max_legend:
        ax.text(1.01, 0.0, f"(+{drawn - max_legend} more lines)", transform=ax.transAxes, fontsize=7.5,
                color="#52606d")
    return fig


def loss_curves_png(series: Mapping[str, Sequence[float]], **kwargs) -> bytes:
    return figure_to_png(loss_curves_figure(series, **kwargs))
