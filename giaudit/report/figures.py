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


# Grid layout, in pixels of the drawn PNG (figures are drawn at 100 dpi).
_CELL_PX = 125            # an image's drawn side (1.25 inches): small images are enlarged by whole pixels
_BORDER = (0x9A, 0xA5, 0xB1)
_PAIR_GAP, _GROUP_GAP, _LINE_PX, _LABEL_PX, _TITLE_PX = 5, 30, 13, 16, 28


def _rgb(image: np.ndarray) -> np.ndarray:
    """One CHW/HW image as H,W,3 float in [0, 1], shown as `to_display` shows it."""
    img, cmap = to_display(image)
    return np.repeat(img[:, :, None], 3, axis=2) if cmap == "gray" else img


def _mosaic(images: np.ndarray, cols: int, group: int, *, captions: Sequence[str] = (),
            labels: Sequence[str] | None = None, title: str | None = None,
            footer: str | None = None) -> tuple[np.ndarray, list[tuple[float, float, str, dict]]]:
    """Images side by side in groups of ``group`` (an original and its reconstruction: 2), ``cols`` groups per
    row, each enlarged by a whole factor to about `_CELL_PX`, with a border; ``captions[g]`` under group g,
    ``labels[j]`` above the j-th image of each group in the first row. Returns the H,W,3 canvas and the texts
    (x, y, string, style) to draw on it in its pixel coordinates. One canvas and one axes: a grid of 64
    images costs one image draw instead of 64 subplots."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    f = max(1, round(_CELL_PX / max(h, w)))
    ih, iw = h * f + 2, w * f + 2  # with a one-pixel border
    rows = math.ceil(math.ceil(n / group) / cols)
    lines = max((c.count("\n") + 1 for c in captions), default=0)
    gw = group * iw + (group - 1) * _PAIR_GAP
    gap = _GROUP_GAP if group > 1 else _PAIR_GAP + 3
    top = (_TITLE_PX if title else 0) + (_LABEL_PX if labels else 0)
    row_h = ih + lines * _LINE_PX + (10 if lines else 6)
    width = cols * gw + (cols - 1) * gap
    height = top + rows * row_h + (_LINE_PX + 4 if footer else 0)
    canvas = np.ones((height, width, 3), np.float32)
    border = np.asarray(_BORDER, np.float32) / 255.0
    texts: list[tuple[float, float, str, dict]] = []
    if title:
        texts.append((width / 2, 6, title, {"fontsize": 10}))
    label_style = {"fontsize": 8, "color": "#52606d"}
    for i in range(n):
        g, j = divmod(i, group)
        r, c = divmod(g, cols)
        gx, y0 = c * (gw + gap), top + r * row_h
        x0 = gx + j * (iw + _PAIR_GAP)
        canvas[y0:y0 + ih, x0:x0 + iw] = border
        canvas[y0 + 1:y0 + ih - 1, x0 + 1:x0 + iw - 1] = np.repeat(np.repeat(_rgb(images[i]), f, axis=0), f, axis=1)
        if labels and r == 0:
            texts.append((x0 + iw / 2, y0 - 3, labels[j], {**label_style, "va": "bottom"}))
        if j == 0 and g < len(captions):
            texts.append((gx + gw / 2, y0 + ih + 3, captions[g], {"fontsize": 7.5}))
    if footer:
        texts.append((width / 2, height - _LINE_PX - 2, footer, label_style))
    return canvas, texts


def _draw(canvas: np.ndarray, texts: Sequence[tuple[float, float, str, dict]]) -> bytes:
    height, width = canvas.shape[:2]
    fig = new_figure((width / 100, height / 100))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for x, y, text, style in texts:
        ax.text(x, y, text, **{"ha": "center", "va": "top", "color": "#1f2933", **style})
    return figure_to_png(fig)


def pair_grid_png(original: np.ndarray, reconstruction: np.ndarray,
                  captions: Sequence[str] | None = None, *, pairs_per_row: int = 4,
                  max_pairs: int | None = 32,
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
    shown = list(captions[:n]) if captions is not None else []
    interleaved = np.stack([original[:n], reconstruction[:n]], axis=1).reshape(2 * n, *original.shape[1:])
    footer = f"showing the {n} most leaked of {n_total} pairs" if n < n_total else None
    return _draw(*_mosaic(interleaved, cols, 2, captions=shown, labels=labels, title=title, footer=footer))


def image_grid_png(images: np.ndarray, *, per_row: int = 8, max_images: int | None = 32,
                   title: str | None = None) -> bytes:
    """Grid of images alone (N,C,H,W or N,H,W in [0, 1]): the reconstructions of an audit without ground truth."""
    images = np.asarray(images)
    n = images.shape[0] if max_images is None else min(images.shape[0], max_images)
    if n == 0:
        raise ValueError("no images to draw")
    return _draw(*_mosaic(images[:n], max(1, min(per_row, n)), 1, title=title))


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
