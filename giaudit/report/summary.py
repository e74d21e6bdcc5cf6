"""The report's answer: one row per (defense, attack), aggregated over seeds, with a plain-language finding.

Every figure comes from `giaudit.aggregate.summarise` (the aggregation the
comparison table and the policy check share; no metric is recomputed): per
(defense, attack), the worst case and the mean with its 95 % bootstrap
interval over images for the image metrics, label recovery and
re-identification pooled over images with their Wilson intervals, attributes
beside the same classifier on the originals and chance, ε (δ) where the
defense discloses it or the utility training spent it, and utility when a
comparison measured it. This module only turns those numbers into cells and
one sentence per row. A malicious server's row (an active attack, SoK classes
F-H) says so in its sentence, with what the server changed, and a row whose
clients refused the server's model says it was blocked (nothing was sent),
not that the attack failed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from giaudit.aggregate import Utility, attribute_names
from giaudit.aggregate import summarise as aggregate
from giaudit.attacks import ATTACKS
from giaudit.metrics.registry import Metric, summarised
from giaudit.report.format import MISSING, pct
from giaudit.results import AuditRecord, undefended
from giaudit.stats import finite
from giaudit.types import UNDECLARED_DEFENSE, a_server, server_kind

BLOCKED = "blocked"  # the cells of a row whose clients refused the malicious server's model


def display_name(attack: str) -> str:
    """The attack's name as its paper gives it (the registered class's display name)."""
    return ATTACKS[attack].display_name if attack in ATTACKS else attack


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
    values: dict[str, Any]  # the aggregated numbers (giaudit.aggregate.summarise's row)

    @property
    def active(self) -> bool:
        """A malicious server's row (its attack changed the model)."""
        return bool(self.values.get("active"))

    @property
    def server(self) -> str:
        return server_kind(self.active)


@dataclass
class Summary:
    columns: list[tuple[str, str]]  # (key, human header with unit)
    rows: list[SummaryRow]

    @property
    def split(self) -> list[tuple[str, list[SummaryRow]]]:
        """The rows by the server they assume, honest-but-curious first: [(heading, rows)], only the servers
        some row assumes ("An honest-but-curious server (SoK classes A-E) could:" ...)."""
        out = []
        for active, classes in ((False, "A-E"), (True, "F-H, it changes the model it sends")):
            rows = [r for r in self.rows if r.active == active]
            if rows:
                out.append((f"{a_server(active).capitalize()} (SoK classes {classes}) could:", rows))
        return out


def _image_cell(v: Mapping[str, Any], metric: Metric) -> Cell:
    p, d = metric.name, metric.decimals
    worst, mean = v.get(f"{p}_worst"), v.get(f"{p}_mean")
    if not finite(worst) and not finite(mean):
        return Cell(MISSING)
    text = f"{worst:.{d}f}" if finite(worst) else MISSING
    m = f"{mean:.{d}f}" if finite(mean) else MISSING
    lo, hi = v.get(f"{p}_ci_low"), v.get(f"{p}_ci_high")
    if finite(lo) and finite(hi):
        m += f" [{lo:.{d}f}, {hi:.{d}f}]"
    return Cell(text, [f"mean {m} over {int(v.get(f'{p}_n') or 0)} images"])


def _shown(metric: Metric, records: Sequence[AuditRecord]) -> bool:
    """An optional metric (its model may be absent: LPIPS) gets a column only when some record measured it."""
    return not metric.optional or any(f"{metric.name}_mean" in r.metrics for r in records)


def summarise(records: Sequence[AuditRecord], utility: Utility | None = None) -> Summary:
    """One row per (defense, attack) in the order the records first appear."""
    attrs = attribute_names(records)
    metrics = [m for m in summarised() if _shown(m, records)]
    has_reid = any("reid_rank1" in r.metrics for r in records)
    has_match = any("identity_match_rate" in r.metrics for r in records)
    columns: list[tuple[str, str]] = [("setting", "Defense / attack")]
    columns += [(m.name, f"{m.heading} {m.worst_word}; mean (95 % CI)") for m in metrics]
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
    for values in aggregate(records, utility):
        defense, attack = values["defense"], values["attack"]
        cells: dict[str, Cell] = {}
        seeds = values["seeds"]
        setting = [f"{display_name(attack)} · {seeds} seed{'s' if seeds != 1 else ''}"]
        eps, delta = values["epsilon"], values["delta"]
        if finite(eps):
            setting.append(f"ε = {float(eps):.3g}" + (f", δ = {float(delta):.0e}" if finite(delta) else ""))
        cells["setting"] = Cell(defense, setting)
        for m in summarised():
            cells[m.name] = _image_cell(values, m)
        sources = values["label_sources"]
        cells["labels"] = Cell(pct(values["label_accuracy_mean"]), [", ".join(sources)] if sources else [])
        if values.get("reid_n"):
            lo, hi = values["reid_ci_low"], values["reid_ci_high"]
            extra = ([f"rank-5 {pct(values['reid_rank5'])}"] if finite(values.get("reid_rank5")) else []) + (
                [f"verified {pct(values['identity_match_rate'])}"] if finite(values.get("identity_match_rate"))
                else [])
            cells["reid"] = Cell(f"{values['reid_hits']} of {values['reid_n']} ({pct(values['reid_rank1'])})",
                                 [f"CI {pct(lo)}–{pct(hi)} · chance {pct(values['reid_chance'], 1)}, N "
                                  f"{values['reid_gallery_size']}"] + ([" · ".join(extra)] if extra else []))
        elif finite(values.get("identity_match_rate")):
            cells["reid"] = Cell(pct(values["identity_match_rate"]), ["backend's verification threshold"])
        else:
            cells["reid"] = Cell(MISSING)
        for a in attrs:
            acc, ref, chance = (values[f"attr_{a}_{k}"] for k in ("accuracy", "reference", "chance"))
            detail = ([f"originals {pct(ref)}"] if finite(ref) else []) + (
                [f"chance {pct(chance)}"] if finite(chance) else [])
            cells[f"attr:{a}"] = Cell(pct(acc), [" · ".join(detail)] if detail else [])
        if utility:
            acc_lo, acc_hi = values["utility_accuracy_low"], values["utility_accuracy_high"]
            base = values["utility_baseline_accuracy"]
            interval = f" [{pct(acc_lo, 1)}, {pct(acc_hi, 1)}]" if finite(acc_lo) else ""
            cells["utility"] = Cell(pct(values["utility_accuracy_mean"], 1) + interval,
                                    [f"undefended {pct(base, 1)}"] if finite(base) else [])
        if values.get("active") and values.get("blocked") == values["records"]:
            # Nothing was sent: every measurement cell says so, not that it is missing.
            cells.update({k: Cell(BLOCKED, ["the clients refused the model"]) for k, _ in columns if k != "setting"})
        rows.append(SummaryRow(defense, attack, cells, finding(values, attrs), values))
    return Summary(columns, rows)


def _quality(ssim_worst: float, psnr_worst: float) -> str:
    if finite(ssim_worst):
        if ssim_worst >= 0.6:
            return "was a recognisable copy"
        if ssim_worst >= 0.3:
            return "was a partial likeness"
        return "bore little resemblance"
    if finite(psnr_worst):
        return "was a close copy" if psnr_worst >= 20 else "bore little resemblance"
    return "could not be measured"


def _changed(modification: Mapping[str, Any]) -> str:
    """What a malicious server changed, in words (from the attack's record of its modification)."""
    if not modification:
        return "it changed the model"
    what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in modification.items() if k not in ("block", "placed"))
    block = modification.get("block", "a block")
    placed = f" {modification['placed']}" if modification.get("placed") else ""
    return f"it sent a model with an added {block} block{placed}" + (f" ({what})" if what else "")


def finding(v: Mapping[str, Any], attrs: Sequence[str]) -> str:
    """One plain-language sentence for a summary row."""
    attack = display_name(str(v["attack"]))
    defense = str(v["defense"])
    if undefended(defense):
        where = "With no defense"
    elif defense == UNDECLARED_DEFENSE:
        where = "In a deployment whose defenses were not declared"
    else:
        where = f"Under {defense}"
        if finite(v.get("epsilon")):
            where += f" (ε = {float(v['epsilon']):.3g})"
    if v.get("active"):
        changed = _changed(v.get("modification") or {})
        where += f", {a_server(True)} (SoK class {v.get('sok_class')}: {changed})"
        if v.get("blocked") and v["blocked"] == v.get("records"):
            return (f"{where} was blocked: the clients refused its model ({v['blocked_reason']}), so no update was "
                    f"sent and {attack} had nothing to attack.")
    parts = []
    if v.get("reid_n"):
        chance = v.get("reid_chance")
        parts.append(f"{attack} re-identified {v['reid_hits']} of {v['reid_n']} faces among "
                     f"{v['reid_gallery_size']} (chance {chance:.2f})")
        q = _quality(v.get("ssim_worst", math.nan), v.get("psnr_db_worst", math.nan))
        parts.append(f"its closest image {q}")
    else:
        q = _quality(v.get("ssim_worst", math.nan), v.get("psnr_db_worst", math.nan))
        if finite(v.get("psnr_db_worst")):
            parts.append(f"{attack}'s most leaked image {q} ({v['psnr_db_worst']:.1f} dB, SSIM "
                         f"{v.get('ssim_worst', math.nan):.2f})")
        else:
            parts.append(f"{attack}'s reconstruction {q}")
    for a in attrs:
        acc, ref, chance = (v.get(f"attr_{a}_{k}") for k in ("accuracy", "reference", "chance"))
        if not finite(acc):
            continue
        text = f"{a.replace('_', ' ')} read right for {pct(acc)}"
        extra = []
        if finite(ref):
            extra.append(f"originals {pct(ref)}")
        if finite(chance):
            extra.append(f"chance {pct(chance)}")
        if extra:
            text += f" ({', '.join(extra)})"
        parts.append(text)
    lab = v.get("label_accuracy_mean")
    if finite(lab):
        parts.append(f"labels recovered for {pct(lab)}")
    if finite(v.get("utility_accuracy_mean")):
        parts.append(f"model accuracy {pct(v['utility_accuracy_mean'], 1)}")
    if v.get("blocked"):
        parts.append(f"{v['blocked']} of {v['records']} records blocked (the clients refused the model)")
    return f"{where}, " + "; ".join(parts) + "."


__all__ = ["Cell", "Summary", "SummaryRow", "display_name", "finding", "summarise"]
