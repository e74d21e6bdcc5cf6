"""Audit reports: self-contained HTML and Markdown from a results folder.

`render(store, out_dir=None, *, verdict=None)` writes report.html and
report.md; `giaudit.report.figures` holds the generic figure helpers (image
pair grids, loss curves, PNG data URIs) that other reports reuse.
"""
from giaudit.report.render import collect, render, render_path

__all__ = ["render", "render_path", "collect"]
