"""The defense comparison report: a table (defense x attack), a privacy-utility plot, leakage over training.

Rendered from the rows `giaudit.aggregate.summarise` computed from saved
records; nothing is recomputed here. Leakage is read from the metrics the
registry marks as summarised (PSNR, SSIM, LPIPS), over images: the mean with its
bootstrap 95 % interval, the 95th percentile and the worst (most leaked)
image. The paired column is the one-sided Wilcoxon signed-rank p-value that
the defense's per-image PSNR is lower than the reference's on the same images
and attack starts. Utility is the held-out accuracy with the Wilson 95 %
interval of the pooled test.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.metrics.registry import headline, summarised
from giaudit.report.figures import figure_to_png, new_figure, png_data_uri
from giaudit.report.summary import class_lines
from giaudit.report.templating import environment
from giaudit.results import write_table
from giaudit.types import a_server


def _metric_columns() -> list[tuple[str, str, tuple[str, str] | None, int]]:
    """The summarised image metrics (the registry's): mean [95 % CI] and the most leaked image; the headline
    metric (PSNR) also its 95th percentile and the paired test against the reference."""
    out: list[tuple[str, str, tuple[str, str] | None, int]] = []
    for m in summarised():
        d = m.decimals + 1
        out.append((f"{m.heading} [95% CI]", f"{m.name}_mean", (f"{m.name}_ci_low", f"{m.name}_ci_high"), d))
        if m.headline:
            out.append((f"{m.label} p95", f"{m.name}_p95", None, d))
        out.append((f"{m.label} {m.worst_word}", f"{m.name}_worst", None, d))
        if m.headline:
            out.append(("paired vs ref.", "paired_p", None, 3))
    return out


COLUMNS = (  # (header, key of the value, (low key, high key) or None, decimals)
    ("images", "images", None, 0),
    *_metric_columns(),
    ("label acc.", "label_accuracy_mean", ("label_accuracy_low", "label_accuracy_high"), 2),
    ("ε (δ)", "epsilon", None, 2),
    ("utility acc. [95% CI]", "utility_accuracy_mean", ("utility_accuracy_low", "utility_accuracy_high"), 3),
    ("acc. drop", "utility_drop_mean", None, 3),
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


def _ok(v: Any) -> bool:
    f = _num(v)
    return f is not None and math.isfinite(f)


def cell(row: Mapping[str, Any], key: str, ci: tuple[str, str] | None, decimals: int) -> str:
    if key == "paired_p":
        note = str(row.get("paired_note") or "")
        v = _num(row.get(key))
        if v is None or math.isnan(v):
            return note or "–"
        few = " (too few)" if row.get("paired_too_few") else ""
        return f"p = {v:.2g}, n = {row.get('paired_n')}{few}"
    v = _num(row.get(key))
    if v is None or math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞"
    text = f"{v:.{decimals}f}"
    if key == "epsilon" and row.get("delta") is not None:
        text += f" ({float(row['delta']):.0e})"
    if ci and _ok(row.get(ci[0])) and _ok(row.get(ci[1])):
        text += f" [{float(row[ci[0]]):.{decimals}f}, {float(row[ci[1]]):.{decimals}f}]"
    if key == "psnr_db_mean" and row.get("psnr_db_too_few"):
        text += " (few images)"
    return text


def _final_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of the scenario's model, or with checkpoints those of the last round (the trained model)."""
    last: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        k = (str(r["defense"]), str(r["attack"]))
        if k not in last or (r.get("round") or -1) > (last[k].get("round") or -1):
            last[k] = r
    return list(last.values())


def privacy_utility_png(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PSNR mean over images (bootstrap 95 % CI) against utility accuracy (Wilson 95 % CI)."""
    points = [r for r in _final_rows(rows) if _ok(r.get("utility_accuracy_mean")) and _ok(r.get("psnr_db_mean"))]
    if not points:
        return None
    fig = new_figure((7.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>P*X"
    attacks = list(dict.fromkeys(r["attack"] for r in points))

    def err(r: Mapping[str, Any], mean: str, lo: str, hi: str) -> tuple[float, float]:
        m = float(r[mean])
        return ((m - float(r[lo])) if _ok(r.get(lo)) else 0.0, (float(r[hi]) - m) if _ok(r.get(hi)) else 0.0)

    for i, attack in enumerate(attacks):
        pts = [r for r in points if r["attack"] == attack]
        xe = [err(r, "utility_accuracy_mean", "utility_accuracy_low", "utility_accuracy_high") for r in pts]
        ye = [err(r, "psnr_db_mean", "psnr_db_ci_low", "psnr_db_ci_high") for r in pts]
        ax.errorbar([float(r["utility_accuracy_mean"]) for r in pts], [float(r["psnr_db_mean"]) for r in pts],
                    xerr=[[a for a, _ in xe], [b for _, b in xe]], yerr=[[a for a, _ in ye], [b for _, b in ye]],
                    fmt=markers[i % len(markers)], capsize=3, label=attack, alpha=0.85)
        for r in pts:
            ax.annotate(str(r["defense"]), (float(r["utility_accuracy_mean"]), float(r["psnr_db_mean"])),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    base = [float(r["utility_baseline_accuracy"]) for r in points if _ok(r.get("utility_baseline_accuracy"))]
    if base:
        ax.axvline(base[0], color="grey", ls="--", lw=0.8, label="no-defense utility")
    ax.set_xlabel("utility: held-out accuracy after federated training (higher is better)")
    ax.set_ylabel("leakage: reconstruction PSNR dB (lower is better)")
    ax.set_title("Privacy-utility trade-off (mean, 95 % CI over images / held-out test)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_to_png(fig)


def leakage_over_training_png(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PSNR (95 % CI) and label accuracy of each defense x attack against the training round it was taken at,
    with the model's held-out accuracy at that round."""
    pts = [r for r in rows if r.get("round") is not None and _ok(r.get("psnr_db_mean"))]
    if not pts:
        return None
    fig = new_figure((11.0, 4.2))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.subplots_adjust(wspace=0.55)
    acc_ax = ax.twinx()
    series = list(dict.fromkeys((str(r["defense"]), str(r["attack"])) for r in pts))
    for d, a in series:
        rs = sorted((r for r in pts if (str(r["defense"]), str(r["attack"])) == (d, a)), key=lambda r: r["round"])
        x = [int(r["round"]) for r in rs]
        y = [float(r["psnr_db_mean"]) for r in rs]
        lo = [float(r["psnr_db_ci_low"]) if _ok(r.get("psnr_db_ci_low")) else v for r, v in zip(rs, y)]
        hi = [float(r["psnr_db_ci_high"]) if _ok(r.get("psnr_db_ci_high")) else v for r, v in zip(rs, y)]
        line = ax.plot(x, y, marker="o", label=f"{d} / {a}")[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax2.plot(x, [float(r["label_accuracy_mean"]) if _ok(r.get("label_accuracy_mean")) else math.nan
                     for r in rs], marker="s", color=line.get_color(), label=f"{d} / {a}")
        accs = [float(r["model_accuracy"]) if _ok(r.get("model_accuracy")) else math.nan for r in rs]
        acc_ax.plot(x, accs, ls=":", color=line.get_color(), alpha=0.7)
    ax.set_xlabel("training round of the attacked update")
    ax.set_ylabel("reconstruction PSNR dB (mean, 95 % CI)")
    acc_ax.set_ylabel("model held-out accuracy (dotted)")
    acc_ax.set_ylim(0.0, 1.0)
    ax.set_title("Leakage over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax2.set_xlabel("training round of the attacked update")
    ax2.set_ylabel("label recovery accuracy")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    return figure_to_png(fig)


def _untuned_columns() -> list[tuple[str, str, tuple[str, str] | None, int]]:
    """A tuned attack's headline metric at the attack's defaults on the same images (the untuned audit)."""
    h = headline()
    d = h.decimals + 1
    return [(f"untuned {h.heading} [95% CI]", f"untuned_{h.name}_mean",
             (f"untuned_{h.name}_ci_low", f"untuned_{h.name}_ci_high"), d),
            (f"untuned {h.label} {h.worst_word}", f"untuned_{h.name}_worst", None, d)]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, tuple[str, str] | None, int]]:
    """COLUMNS, and the untuned figures after the headline metric's when some attack was tuned."""
    if not any(r.get("tuned") for r in rows):
        return list(COLUMNS)
    keys = [c[1] for c in COLUMNS]
    at = keys.index("paired_p") + 1 if "paired_p" in keys else len(keys)
    return [*COLUMNS[:at], *_untuned_columns(), *COLUMNS[at:]]


def _head(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    rounds = any(r.get("round") is not None for r in rows)
    return ["defense", "attack"] + (["round", "model acc."] if rounds else []) + [c[0] for c in _columns(rows)]


def _cells(r: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    rounds = any(x.get("round") is not None for x in rows)
    extra = [str(r.get("round")), cell(r, "model_accuracy", None, 3)] if rounds else []
    return [str(r["defense"]), _attack_cell(r)] + extra + [cell(r, k, ci, d) for _, k, ci, d in _columns(rows)]


def _attack_cell(r: Mapping[str, Any]) -> str:
    """The attack, and for a malicious server's row that it is one (and whether its clients refused it); a tuned
    attack with the options it was tuned to under this defense."""
    if r.get("tuned"):
        return f"{r['attack']} (tuned: {r.get('tuned_options')})"
    if not r.get("active"):
        return str(r["attack"])
    blocked = f"; blocked in {r['blocked']} of {r['records']} records" if r.get("blocked") else ""
    return f"{r['attack']} ({a_server(True)}, class {r.get('sok_class')}{blocked})"


def _ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of an honest-but-curious server first, then a malicious one's (each in their order)."""
    return sorted(rows, key=lambda r: bool(r.get("active")))


def _table_md(rows: Sequence[Mapping[str, Any]]) -> str:
    head = _head(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ordered(rows):
        lines.append("| " + " | ".join(_cells(r, rows)) + " |")
    return "\n".join(lines)


def _table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    head = _head(rows)
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in _ordered(rows):
        cells = _cells(r, rows)
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


READING = ("Leakage is measured per image (every private batch of every seed and client): PSNR and SSIM are "
           "higher, LPIPS lower, when the attacker recovered more; the bracket is the bootstrap 95 % interval of "
           "the mean over images, p95 the 95th percentile and worst the most leaked image. Paired vs ref. is the "
           "one-sided Wilcoxon signed-rank p-value that the defense's per-image PSNR is lower than the reference's "
           "on the same images and attack starts (n pairs; 'too few' when fewer than 5 pairs differ, so no claim "
           "at 5 % is possible). Label acc. carries its Wilson 95 % interval. ε is Opacus's accountant for exactly "
           "the utility training's rounds and sampling rate, at δ (DP-SGD only). Utility is the held-out accuracy "
           "after the federated training with the defense on every client, with the Wilson 95 % interval of the "
           "held-out test pooled over seeds; acc. drop is the difference to the same training without defenses "
           "(positive = the defense costs accuracy).")


def _verdict_lines(verdict: Mapping[str, Any]) -> list[str]:
    """The comparison's verdict in lines: each preset's (its worst attack), every rule that passed untuned and
    fails tuned, every failed rule, what the policy covers."""
    out = [f"{d}: {'PASS' if v.get('passed') else 'FAIL'} (worst attack: {v.get('worst_attack')})"
           for d, v in (verdict.get("defenses") or {}).items()]
    out += [str(f) for f in verdict.get("tuning_flips") or []]
    out += [str(f) for f in verdict.get("failed") or []]
    out.append(f"policy {verdict.get('policy')}; {verdict.get('coverage')}")
    return out


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
    over = leakage_over_training_png(rows)
    if over is not None:
        atomic_write_bytes(out / "compare_leakage_over_training.png", over)
    settings = meta.get("utility", {})
    target = settings.get("target_accuracy")
    reached = "reached" if meta.get("utility_baseline_reached") else "did not reach"
    facts = [f"Scenario: {meta.get('scenario', '')} (base config: {meta.get('base_config', '')})",
             f"Seeds: {', '.join(str(s) for s in meta.get('seeds', []))} x {meta.get('clients_per_seed', 1)} "
             f"private batches each; attacks: {', '.join(meta.get('attacks', {}))}; paired reference: "
             f"{meta.get('reference') or 'none (no preset without defenses)'}",
             f"Utility training: {meta.get('utility_rounds')} rounds x {settings.get('clients')} clients "
             f"(the no-defense baseline {reached} the target {target} within the budget of "
             f"{settings.get('max_rounds')} rounds; {meta.get('utility_cached', 0)} runs from the cache)",
             f"Wall time: {float(meta.get('wall_s', 0.0)):.0f} s"]
    presets = meta.get("presets", {})
    notes = [str(n) for n in meta.get("notes", [])]
    classes = class_lines(rows)
    verdict: Mapping[str, Any] = meta.get("verdict") or {}
    judged = _verdict_lines(verdict) if verdict else []
    md = ["# Defense comparison", "", *[f"- {f}" for f in facts], "", _table_md(rows), "", READING, ""]
    if classes:
        md += ["Threat classes attacked:", "", *[f"- {line}" for line in classes], ""]
    if judged:
        md += [f"## Policy verdict: **{'PASS' if verdict['passed'] else 'FAIL'}**", "",
               *[f"- {line}" for line in judged], ""]
    if notes:
        md += ["Notes from the runs:", "", *[f"- {n}" for n in notes], ""]
    if png is not None:
        md += ["![privacy-utility](compare_privacy_utility.png)", ""]
    if over is not None:
        md += ["![leakage over training](compare_leakage_over_training.png)", ""]
    md += ["## Presets", ""] + [f"- **{k}** ({v['file']}): `{json.dumps(v['defenses'])}`" for k, v in presets.items()]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    parts = ["<h1>Defense comparison</h1><ul>"
             + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>", _table_html(rows),
             f"<p>{html.escape(READING)}</p>"]
    if classes:
        parts.append("<p>Threat classes attacked:</p><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in classes)
                     + "</ul>")
    if judged:
        parts.append(f"<h2>Policy verdict: {'PASS' if verdict['passed'] else 'FAIL'}</h2><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in judged) + "</ul>")
    if notes:
        parts.append("<p>Notes from the runs:</p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if png is not None:
        parts.append(f"<img alt='privacy-utility plot' src='{png_data_uri(png)}'>")
    if over is not None:
        parts.append(f"<h2>Leakage over training</h2><img alt='leakage over training' src='{png_data_uri(over)}'>")
    parts.append("<h2>Presets</h2><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b> ({html.escape(str(v['file']))}): <code>{html.escape(json.dumps(v['defenses']))}"
        "</code></li>" for k, v in presets.items()) + "</ul>")
    path = out / "compare.html"
    # The shell (head, styles) is the audit report's base template.
    atomic_write_text(path, environment().get_template("compare.html").render(body=Markup("\n".join(parts)
                                                                                         )))
    return path
