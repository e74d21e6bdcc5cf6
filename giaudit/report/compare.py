"""The defense comparison report: one table (defense x attack) and a privacy-utility plot.

Rendered from the rows `giaudit.compare.summarise` computed from saved
records; nothing is recomputed here. Leakage is read as PSNR / SSIM (higher =
more leaked) and LPIPS (lower = more leaked); "worst" is the most leaked image
over all seeds. Every mean carries its 95 % confidence half-width over seeds.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.report.figures import figure_to_png, new_figure, png_data_uri
from giaudit.results import write_table

COLUMNS = (  # (header, key of the mean, key of the CI half-width or None, decimals)
    ("PSNR dB", "psnr_db_mean", "psnr_db_ci95", 2),
    ("PSNR worst", "psnr_db_worst", None, 2),
    ("SSIM", "ssim_mean", "ssim_ci95", 3),
    ("SSIM worst", "ssim_worst", None, 3),
    ("LPIPS", "lpips_mean", "lpips_ci95", 3),
    ("LPIPS worst", "lpips_worst", None, 3),
    ("label acc.", "label_accuracy_mean", "label_accuracy_ci95", 2),
    ("ε (δ)", "epsilon", None, 2),
    ("utility acc.", "utility_accuracy_mean", "utility_accuracy_ci95", 3),
    ("acc. drop", "utility_drop_mean", "utility_drop_ci95", 3),
    ("attack s", "attack_s_mean", None, 1),
)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


def cell(row: Mapping[str, Any], key: str, ci: str | None, decimals: int) -> str:
    v = _num(row.get(key))
    if v is None or math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞"
    text = f"{v:.{decimals}f}"
    if key == "epsilon" and row.get("delta") is not None:
        text += f" ({float(row['delta']):.0e})"
    c = _num(row.get(ci)) if ci else None
    if c is not None and not math.isnan(c):
        text += f" ± {c:.{decimals}f}"
    return text


def privacy_utility_png(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PSNR mean (leakage) against utility accuracy, one marker per defense x attack."""
    points = [r for r in rows if _num(r.get("utility_accuracy_mean")) is not None
              and _num(r.get("psnr_db_mean")) is not None
              and not math.isnan(float(r["psnr_db_mean"])) and not math.isnan(float(r["utility_accuracy_mean"]))]
    if not points:
        return None
    fig = new_figure((7.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>P*X"
    attacks = list(dict.fromkeys(r["attack"] for r in points))
    for i, attack in enumerate(attacks):
        pts = [r for r in points if r["attack"] == attack]
        xerr = [0.0 if math.isnan(_num(r.get("utility_accuracy_ci95")) or math.nan)
                else float(r["utility_accuracy_ci95"]) for r in pts]
        yerr = [0.0 if math.isnan(_num(r.get("psnr_db_ci95")) or math.nan) else float(r["psnr_db_ci95"]) for r in pts]
        ax.errorbar([float(r["utility_accuracy_mean"]) for r in pts], [float(r["psnr_db_mean"]) for r in pts],
                    xerr=xerr, yerr=yerr, fmt=markers[i % len(markers)], capsize=3, label=attack, alpha=0.85)
        for r in pts:
            ax.annotate(str(r["defense"]), (float(r["utility_accuracy_mean"]), float(r["psnr_db_mean"])),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    base = [b for b in (_num(r.get("utility_baseline_accuracy")) for r in points)
            if b is not None and not math.isnan(b)]
    if base:
        ax.axvline(sum(base) / len(base), color="grey", ls="--", lw=0.8, label="no-defense utility")
    ax.set_xlabel("utility: held-out accuracy after short federated training (higher is better)")
    ax.set_ylabel("leakage: reconstruction PSNR dB (lower is better)")
    ax.set_title("Privacy-utility trade-off (mean ± 95 % CI over seeds)")
    ax.set_xlim(0.0, 1.0)  # accuracies; wide CIs over few seeds would otherwise stretch the axis
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_to_png(fig)


def _table_md(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["defense", "attack", "seeds"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["defense"]), str(r["attack"]), str(r["seeds"])] + [cell(r, k, ci, d) for _, k, ci, d in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["defense", "attack", "seeds"] + [c[0] for c in COLUMNS]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [str(r["defense"]), str(r["attack"]), str(r["seeds"])] + [cell(r, k, ci, d) for _, k, ci, d in COLUMNS]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


READING = ("Leakage: PSNR and SSIM are higher, LPIPS lower, when the attacker recovered more; *worst* is the most "
           "leaked image over all seeds. Label acc. is the attacker's label-recovery accuracy. ε is Opacus's "
           "accountant at the configured δ (DP-SGD only). Utility is the held-out accuracy after a short federated "
           "training with the defense on every client; acc. drop is the paired difference to the same training "
           "without it (positive = the defense costs accuracy). ± is the 95 % Student-t half-width over seeds.")


def render_compare(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], out_dir: Path) -> Path:
    """Write compare.csv/.parquet, compare.md, compare.html and the plot PNG; return the HTML path."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.csv", pd.DataFrame(list(rows)).to_csv(index=False))
    write_table(out, [dict(r) for r in rows], stem="compare")
    png = privacy_utility_png(rows)
    if png is not None:
        atomic_write_bytes(out / "compare_privacy_utility.png", png)
    settings = meta.get("utility", {})
    facts = [f"Scenario: {meta.get('scenario', '')} (base config: {meta.get('base_config', '')})",
             f"Seeds: {', '.join(str(s) for s in meta.get('seeds', []))}; "
             f"attacks: {', '.join(meta.get('attacks', {}))}",
             f"Utility training: {settings.get('rounds')} rounds x {settings.get('clients')} clients",
             f"Wall time: {float(meta.get('wall_s', 0.0)):.0f} s"]
    presets = meta.get("presets", {})
    notes = [str(n) for n in meta.get("notes", [])]
    md = ["# Defense comparison", "", *[f"- {f}" for f in facts], "", _table_md(rows), "", READING, ""]
    if notes:
        md += ["Notes from the runs:", "", *[f"- {n}" for n in notes], ""]
    if png is not None:
        md += ["![privacy-utility](compare_privacy_utility.png)", ""]
    md += ["## Presets", ""] + [f"- **{k}** ({v['file']}): `{json.dumps(v['defenses'])}`" for k, v in presets.items()]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f2f2f2}td:nth-child(n+3){text-align:right}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Defense comparison</title>"
             f"<style>{style}</style></head><body><h1>Defense comparison</h1><ul>"
             + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>", _table_html(rows),
             f"<p>{html.escape(READING)}</p>"]
    if notes:
        parts.append("<p>Notes from the runs:</p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if png is not None:
        parts.append(f"<img alt='privacy-utility plot' src='{png_data_uri(png)}'>")
    parts.append("<h2>Presets</h2><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b> ({html.escape(str(v['file']))}): <code>{html.escape(json.dumps(v['defenses']))}"
        "</code></li>" for k, v in presets.items()) + "</ul></body></html>")
    path = out / "compare.html"
    atomic_write_text(path, "\n".join(parts))
    return path
