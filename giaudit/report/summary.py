"""The report's answer: one row per (defense, attack), aggregated over seeds, with a plain-language finding.

Every figure is read from the saved records (no metric is recomputed) and
aggregated over the records of a (defense, attack):

- PSNR / SSIM / LPIPS: the worst case (the most leaked image over all
  records: highest PSNR / SSIM, lowest LPIPS) and the mean over every
  reconstructed image with its 95 % bootstrap interval over images
  (`giaudit.stats.summary`, the statistics `compare` and policies use).
- Label recovery: the mean label accuracy.
- Re-identification: rank-1 hits pooled over all scored reconstructions,
  with the 95 % Wilson interval and chance 1/N (N = gallery size).
- Attributes: accuracy on the reconstructions next to the same classifier on
  the originals (the reference) and chance.
- ε (δ) where the defense discloses it (DP-SGD).
- Utility (optional, from a comparison): held-out accuracy with the defense, pooled over seeds with its
  Wilson interval.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from giaudit.results import AuditRecord, disclosed_value
from giaudit.stats import pooled_accuracy, summary, wilson_interval

MISSING = "—"


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def pct(v: float | None, digits: int = 0) -> str:
    return f"{100 * v:.{digits}f} %" if _finite(v) else MISSING


@dataclass
class Cell:
    """One summary cell: a headline and optional smaller detail lines."""

    main: str
    detail: list[str] = field(default_factory=list)

    def text(self) -> str:
        return " ".join([self.main, *[f"({d})" for d in self.detail]]) if self.detail else self.main


@dataclass
class SummaryRow:
    defense: str
    attack: str
    cells: dict[str, Cell]
    finding: str
    values: dict[str, Any]  # the aggregated numbers (for plots and tests)


@dataclass
class Summary:
    columns: list[tuple[str, str]]  # (key, human header with unit)
    rows: list[SummaryRow]


ATTACK_NAMES = {"ig": "Inverting Gradients", "dlg": "DLG", "idlg": "iDLG", "gias": "GIAS", "giml": "GIML",
                "ggl": "GGL"}


def _image_stats(recs: Sequence[AuditRecord], base: str, worst_is_max: bool) -> dict[str, float]:
    """Mean over every reconstructed image with its bootstrap interval, and the most leaked image."""
    values = [row.get(base) for r in recs for row in r.per_image]
    s = summary([float(v) for v in values if _finite(v)], worst="max" if worst_is_max else "min")
    return {"mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high, "worst": s.worst, "n": s.n}


def _image_cell(s: Mapping[str, float], decimals: int) -> Cell:
    if not _finite(s["worst"]) and not _finite(s["mean"]):
        return Cell(MISSING)
    worst = f"{s['worst']:.{decimals}f}" if _finite(s["worst"]) else MISSING
    mean = f"{s['mean']:.{decimals}f}" if _finite(s["mean"]) else MISSING
    if _finite(s["ci_low"]) and _finite(s["ci_high"]):
        mean += f" [{s['ci_low']:.{decimals}f}, {s['ci_high']:.{decimals}f}]"
    return Cell(worst, [f"mean {mean} over {int(s['n'])} images"])


def _attribute_names(records: Sequence[AuditRecord]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k in r.metrics:
            m = re.match(r"^attribute_(.+)_accuracy$", k)
            if m and m.group(1) not in names:
                names.append(m.group(1))
    for builtin in ("gender", "race"):  # the face backends' own predictors
        if any(f"{builtin}_accuracy" in r.metrics for r in records) and builtin not in names:
            names.append(builtin)
    return names


def _attr_keys(name: str, records: Sequence[AuditRecord]) -> tuple[str, str | None, str | None]:
    """(metric on reconstructions, reference metric, chance metric) for an attribute."""
    own = f"attribute_{name}_accuracy"
    if any(own in r.metrics for r in records):
        return own, f"reference_{own}", f"attribute_{name}_chance"
    return f"{name}_accuracy", f"reference_{name}_accuracy", None


def _mean_of(recs: Sequence[AuditRecord], key: str | None) -> float:
    vals = [float(v) for r in recs if key is not None and _finite(v := r.metrics.get(key))]
    return sum(vals) / len(vals) if vals else math.nan


def summarise(records: Sequence[AuditRecord], utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
              ) -> Summary:
    """One row per (defense, attack) in the order the records first appear."""
    keys = list(dict.fromkeys((r.defense, r.attack) for r in records))
    attrs = _attribute_names(records)
    has_lpips = any("lpips_mean" in r.metrics for r in records)
    has_reid = any("reid_rank1" in r.metrics for r in records)
    has_match = any("identity_match_rate" in r.metrics for r in records)
    columns: list[tuple[str, str]] = [("setting", "Defense / attack"), ("psnr", "PSNR (dB) worst; mean (95 % CI)"),
                                      ("ssim", "SSIM (0–1) worst; mean (95 % CI)")]
    if has_lpips:
        columns.append(("lpips", "LPIPS (0–1, low = close) best; mean (95 % CI)"))
    columns.append(("labels", "Labels recovered"))
    if has_reid:
        columns.append(("reid", "Re-identified (rank-1), 95 % CI, chance"))
    elif has_match:
        columns.append(("reid", "Verified as same person"))
    for a in attrs:
        columns.append((f"attr:{a}", f"{a.replace('_', ' ').capitalize()} inferred (originals, chance)"))
    if utility:
        columns.append(("utility", "Model accuracy with the defense"))
    rows = []
    for defense, attack in keys:
        recs = [r for r in records if r.defense == defense and r.attack == attack]
        values: dict[str, Any] = {"defense": defense, "attack": attack, "records": len(recs),
                                  "seeds": len({r.seed for r in recs})}
        cells: dict[str, Cell] = {}
        # Beside a utility figure, epsilon is the accountant's for that training (its rounds and sampling
        # rate); otherwise what the audited client's defense disclosed.
        trained = [u for u in (utility or {}).get(defense, []) if u.get("epsilon") is not None]
        eps = trained[0]["epsilon"] if trained else next(
            (v for v in (disclosed_value(r, "epsilon") for r in recs) if v is not None), None)
        delta = trained[0].get("delta") if trained else next(
            (v for v in (disclosed_value(r, "delta") for r in recs) if v is not None), None)
        values["epsilon"], values["delta"] = eps, delta
        setting = [f"{ATTACK_NAMES.get(attack, attack)} · {values['seeds']} seed{'s' if values['seeds'] != 1 else ''}"]
        if _finite(eps):
            setting.append(f"ε = {float(eps):.3g}" + (f", δ = {float(delta):.0e}" if _finite(delta) else ""))
        cells["setting"] = Cell(defense, setting)
        psnr, ssim = _image_stats(recs, "psnr_db", True), _image_stats(recs, "ssim", True)
        lpips = _image_stats(recs, "lpips", False)
        for prefix, stats_ in (("psnr_db", psnr), ("ssim", ssim), ("lpips", lpips)):
            # The same keys as compare's table rows, so one privacy-utility plot serves both reports.
            values.update({f"{prefix}_mean": stats_["mean"], f"{prefix}_ci_low": stats_["ci_low"],
                           f"{prefix}_ci_high": stats_["ci_high"], f"{prefix}_worst": stats_["worst"],
                           f"{prefix}_n": stats_["n"]})
        cells["psnr"], cells["ssim"], cells["lpips"] = _image_cell(psnr, 1), _image_cell(ssim, 2), _image_cell(lpips, 2)
        lab = _mean_of(recs, "label_accuracy")
        values["label_accuracy"] = lab
        sources = sorted({r.label_source for r in recs})
        cells["labels"] = Cell(pct(lab), [", ".join(sources)] if sources else [])
        reid = _reid(recs)
        values.update(reid)
        if reid.get("reid_n"):
            lo, hi = reid["reid_ci_low"], reid["reid_ci_high"]
            extra = ([f"rank-5 {pct(reid['reid_rank5'])}"] if _finite(reid.get("reid_rank5")) else []) + (
                [f"verified {pct(reid['identity_match_rate'])}"] if _finite(reid.get("identity_match_rate")) else [])
            cells["reid"] = Cell(f"{reid['reid_hits']} of {reid['reid_n']} ({pct(reid['reid_rank1'])})",
                                 [f"CI {pct(lo)}–{pct(hi)} · chance {pct(reid['reid_chance'], 1)}, N "
                                  f"{reid['reid_gallery_size']}"] + ([" · ".join(extra)] if extra else []))
        elif _finite(reid.get("identity_match_rate")):
            cells["reid"] = Cell(pct(reid["identity_match_rate"]), ["backend's verification threshold"])
        else:
            cells["reid"] = Cell(MISSING)
        for a in attrs:
            rec_key, ref_key, chance_key = _attr_keys(a, recs)
            acc, ref, chance = _mean_of(recs, rec_key), _mean_of(recs, ref_key), _mean_of(recs, chance_key)
            values[f"attr_{a}"] = {"accuracy": acc, "reference": ref, "chance": chance}
            detail = ([f"originals {pct(ref)}"] if _finite(ref) else []) + (
                [f"chance {pct(chance)}"] if _finite(chance) else [])
            cells[f"attr:{a}"] = Cell(pct(acc), [" · ".join(detail)] if detail else [])
        if utility:
            util = [u for u in utility.get(defense, []) if "accuracy" in u and "n_test" in u]
            acc_m, acc_lo, acc_hi = pooled_accuracy(util)
            base = _mean_of_runs(util, "baseline_accuracy")
            values.update(utility_accuracy_mean=acc_m, utility_accuracy_low=acc_lo, utility_accuracy_high=acc_hi,
                          utility_baseline_accuracy=base)
            interval = f" [{pct(acc_lo, 1)}, {pct(acc_hi, 1)}]" if _finite(acc_lo) else ""
            cells["utility"] = Cell(pct(acc_m, 1) + interval,
                                    [f"undefended {pct(base, 1)}"] if _finite(base) else [])
        rows.append(SummaryRow(defense, attack, cells, finding(values, attrs), values))
    return Summary(columns, rows)


def _mean_of_runs(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(u[key]) for u in runs if _finite(u.get(key))]
    return sum(vals) / len(vals) if vals else math.nan


def _reid(recs: Sequence[AuditRecord]) -> dict[str, Any]:
    hits = n = 0
    sizes = []
    r5 = []
    for r in recs:
        m = r.metrics
        scored = m.get("reid_scored")
        if _finite(m.get("reid_rank1")) and _finite(scored) and scored:
            n += int(scored)
            hits += int(round(float(m["reid_rank1"]) * float(scored)))
            sizes.append(int(m.get("reid_gallery_size") or 0))
            if _finite(m.get("reid_rank5")):
                r5.append((float(m["reid_rank5"]), int(scored)))
    out: dict[str, Any] = {"identity_match_rate": _mean_of(recs, "identity_match_rate")}
    if n:
        size = min(sizes) if sizes else 0
        lo, hi = wilson_interval(hits, n)
        out.update(reid_hits=hits, reid_n=n, reid_rank1=hits / n, reid_ci_low=lo, reid_ci_high=hi,
                   reid_gallery_size=size, reid_chance=1.0 / size if size else math.nan,
                   reid_rank5=sum(a * b for a, b in r5) / sum(b for _, b in r5) if r5 else math.nan)
    return out


def _quality(ssim_worst: float, psnr_worst: float) -> str:
    if _finite(ssim_worst):
        if ssim_worst >= 0.6:
            return "was a recognisable copy"
        if ssim_worst >= 0.3:
            return "was a partial likeness"
        return "bore little resemblance"
    if _finite(psnr_worst):
        return "was a close copy" if psnr_worst >= 20 else "bore little resemblance"
    return "could not be measured"


def finding(v: Mapping[str, Any], attrs: Sequence[str]) -> str:
    """One plain-language sentence for a summary row."""
    attack = ATTACK_NAMES.get(str(v["attack"]), str(v["attack"]))
    defense = str(v["defense"])
    if defense in ("none", ""):
        where = "With no defense"
    else:
        where = f"Under {defense}"
        if _finite(v.get("epsilon")):
            where += f" (ε = {float(v['epsilon']):.3g})"
    parts = []
    if v.get("reid_n"):
        chance = v.get("reid_chance")
        parts.append(f"{attack} re-identified {v['reid_hits']} of {v['reid_n']} faces among "
                     f"{v['reid_gallery_size']} (chance {chance:.2f})")
        q = _quality(v.get("ssim_worst", math.nan), v.get("psnr_db_worst", math.nan))
        parts.append(f"its closest image {q}")
    else:
        q = _quality(v.get("ssim_worst", math.nan), v.get("psnr_db_worst", math.nan))
        if _finite(v.get("psnr_db_worst")):
            parts.append(f"{attack}'s most leaked image {q} ({v['psnr_db_worst']:.1f} dB, SSIM "
                         f"{v.get('ssim_worst', math.nan):.2f})")
        else:
            parts.append(f"{attack}'s reconstruction {q}")
    for a in attrs:
        s = v.get(f"attr_{a}") or {}
        acc, ref, chance = s.get("accuracy"), s.get("reference"), s.get("chance")
        if not _finite(acc):
            continue
        text = f"{a.replace('_', ' ')} read right for {pct(acc)}"
        extra = []
        if _finite(ref):
            extra.append(f"originals {pct(ref)}")
        if _finite(chance):
            extra.append(f"chance {pct(chance)}")
        if extra:
            text += f" ({', '.join(extra)})"
        parts.append(text)
    lab = v.get("label_accuracy")
    if _finite(lab):
        parts.append(f"labels recovered for {pct(lab)}")
    if _finite(v.get("utility_accuracy_mean")):
        parts.append(f"model accuracy {pct(v['utility_accuracy_mean'], 1)}")
    return f"{where}, " + "; ".join(parts) + "."


__all__ = ["Cell", "Summary", "SummaryRow", "summarise", "finding", "ATTACK_NAMES"]
