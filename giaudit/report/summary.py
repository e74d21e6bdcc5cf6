"""The report's answer: one row per (defense, attack), aggregated over seeds, with a plain-language finding.

Every figure comes from `giaudit.aggregate.summarise` (the aggregation the
comparison table and the policy check share; no metric is recomputed): per
(defense, attack), the worst case and the mean with its 95 % bootstrap
interval over images for the image metrics, label recovery and
re-identification pooled over images with their Wilson intervals, attributes
beside the same classifier on the originals and chance, ε (δ) where the
defense discloses it or the utility training spent it, and utility when a
comparison measured it, and the leakage bracket (`giaudit.bounds`): what DP
bounds *any* attacker to on each success criterion beside what the attacks run
reached (Clopper-Pearson interval), the alarm when the measured lower bound
exceeds the DP bound, and the empirical μ. This module only turns those
numbers into cells and one sentence per row. A malicious server's row (an
active attack, SoK classes F-H) says so in its sentence, with what the server
changed, and a row whose clients refused the server's model says it was
blocked (nothing was sent), not that the attack failed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from giaudit.aggregate import Utility, attribute_names
from giaudit.aggregate import summarise as aggregate
from giaudit.attacks import ATTACKS
from giaudit.bounds import ADJACENCIES, CONFIDENCE, BoundsContext
from giaudit.metrics.registry import Metric, headline, summarised
from giaudit.report.format import MISSING, Table, fmt_num, pct
from giaudit.results import AuditRecord, undefended
from giaudit.stats import finite
from giaudit.types import ACTIVE_CLASSES, SOK_CLASSES, UNDECLARED_DEFENSE, a_server, class_span, server_kind

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
    notes: list[str] = field(default_factory=list)  # how the bounds were obtained (adjacency, baselines)
    bounds: Table = field(default_factory=lambda: Table([], []))  # every criterion of every row

    @property
    def split(self) -> list[tuple[str, list[SummaryRow]]]:
        """The rows by the server they assume, honest-but-curious first: [(heading, rows)], only the servers
        some row assumes ("An honest-but-curious server (SoK classes A-E) could:" ...)."""
        out = []
        for active in (False, True):
            rows = [r for r in self.rows if r.active == active]
            how = ", it departs from the protocol" if active else ""
            if rows:
                out.append((f"{a_server(active).capitalize()} (SoK classes {class_span(active)}{how}) could:", rows))
        return out

    @property
    def classes(self) -> list[str]:
        """Which SoK classes were attacked and what each reached (`class_lines`)."""
        return class_lines([r.values for r in self.rows])


def row_letter(v: Mapping[str, Any]) -> str:
    """The SoK letter of a summary row (records without one: class A, the least the server knows)."""
    return str(v.get("sok_class") or "A")[:1]


def class_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per kind of server and per SoK letter attacked, what the summary rows (`giaudit.aggregate.summarise`)
    reached: "An honest-but-curious server (SoK classes A-E) was run in class B: ..." then one line per letter
    naming each defense / attack with its most leaked image (or that its clients refused the model)."""
    h = headline()
    worst = f"{h.name}_worst"
    out = []
    for active in (False, True):
        letters = sorted({row_letter(v) for v in rows if (row_letter(v) in ACTIVE_CLASSES) == active})
        if not letters:
            continue
        out.append(f"{a_server(active).capitalize()} (SoK classes {class_span(active)}) was run in "
                   f"class{'es' if len(letters) > 1 else ''} {', '.join(letters)}:")
        for letter in letters:
            parts = []
            for v in rows:
                if row_letter(v) != letter:
                    continue
                pair = f"{v['defense']} / {v['attack']}"
                if v.get("blocked") and v["blocked"] == v.get("records"):
                    parts.append(f"{pair} blocked (the clients refused the model)")
                elif finite(v.get(worst)):
                    parts.append(f"{pair} most leaked image {float(v[worst]):.{h.decimals}f} {h.unit} {h.label}")
                else:
                    parts.append(f"{pair} not measured")
            out.append(f"class {letter} ({SOK_CLASSES.get(letter, 'unknown class')}): {'; '.join(parts)}")
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


def _criteria(v: Mapping[str, Any]) -> list[str]:
    return [k for k in str(v.get("rero_criteria") or "").split(",") if k]


def _top(v: Mapping[str, Any]) -> str | None:
    """The criterion a row's bracket sentence names: the one with the largest DP bound."""
    return v.get("rero_bound_criterion") or next(iter(_criteria(v)), None)


def bound_sentence(v: Mapping[str, Any], key: str) -> str:
    """"DP bounds any attacker to ≤ 9 % re-identified among 100 (κ = 1 %); the attacks run reached 0 of 16
    [0, 21 %]" for one criterion of a summary row (or "no DP guarantee" when the release has none)."""
    p = f"rero_{key}_"
    label, kappa = v[p + "label"], v[p + "kappa"]
    reached = (f"the attacks run reached {v[p + 'hits']} of {v[p + 'n']} "
               f"[{pct(v[p + 'low'])}, {pct(v[p + 'high'])}]")
    if v.get("rero_release") is None:
        return f"no DP guarantee bounds {label} (κ = {pct(kappa, 1)}); {reached}"
    text = f"DP bounds any attacker to ≤ {pct(v[p + 'bound'])} {label} (κ = {pct(kappa, 1)}); {reached}"
    if v.get(p + "alarm"):
        text += (" — ALARM: the measured lower bound is above the DP bound (a bug, or an accountant that does "
                 "not describe this release)")
    return text


def mu_sentence(v: Mapping[str, Any]) -> str | None:
    """The empirical μ of a row, with its meaning."""
    key, mu = v.get("empirical_mu_criterion"), v.get("empirical_mu")
    if key is None or mu is None or not (finite(mu) or mu == math.inf):
        return None
    eps = v.get("empirical_mu_epsilon")
    at = f"ε = {eps:.3g} at δ = {v.get('rero_delta', 0):.0e}" if finite(eps) else "ε = ∞"
    if mu == 0:
        return f"empirical μ 0: no success above κ at the {CONFIDENCE * 100:.0f} % lower confidence bound"
    return f"against these attacks it behaved no better than a {mu:.2f}-GDP mechanism ({at})"


def bounds_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Every criterion of every row: κ, the bound on the audited update and on the whole training (with the
    GDP approximation), what the attacks reached, the alarm and the empirical μ (ε at δ)."""
    out = []
    for v in rows:
        for k in _criteria(v):
            p = f"rero_{k}_"
            has = v.get("rero_release") is not None
            gdp = v.get(p + "training_gdp")
            out.append([f"{v['defense']} · {display_name(str(v['attack']))}", str(v[p + "label"]),
                        pct(v[p + "kappa"], 1), pct(v[p + "bound"], 1) if has else "no DP guarantee",
                        pct(v[p + "training_bound"], 1) + (f" (GDP {pct(gdp, 1)})" if finite(gdp) else ""),
                        f"{v[p + 'hits']} of {v[p + 'n']} [{pct(v[p + 'low'])}, {pct(v[p + 'high'])}]",
                        "ALARM" if v.get(p + "alarm") else "no",
                        f"{v[p + 'mu']:.2f} (ε {fmt_num(v[p + 'epsilon'], 3)})" if not math.isnan(v[p + "mu"])
                        else MISSING])
    return Table(["defense · attack", "criterion", "κ", "bound (audited update)", "bound (whole training)",
                  "attacks reached (95 % CI)", "alarm", "empirical μ"], out, numeric={2, 3})


def _bound_notes(rows: Sequence[Mapping[str, Any]], context: BoundsContext | None) -> list[str]:
    """How the bracket was obtained: each guarantee, the adjacency, each baseline's estimator."""
    if not any(_criteria(v) for v in rows):
        return []
    adjacency = rows[0].get("rero_adjacency") or ""
    notes = [f"DP bounds (reconstruction robustness: γ ≤ 1 − f(κ), Φ(Φ⁻¹(κ) + μ) for μ-GDP) under {adjacency} "
             f"adjacency ({ADJACENCIES.get(adjacency, adjacency)}), for the audited update; the whole training's "
             "bound comes from Opacus's PRV accountant. Measured: the share of images meeting the criterion with "
             f"its {CONFIDENCE * 100:.0f} % Clopper–Pearson interval. Empirical μ = Φ⁻¹(p_lo) − Φ⁻¹(κ), the weakest "
             "Gaussian DP the measured lower-confidence success permits."]
    seen: set[str] = set()
    for v in rows:
        for what in (v.get("rero_release"), v.get("rero_training")):
            if what and what not in seen:
                seen.add(what)
                notes.append(f"{v['defense']}: {what}")
        for k in _criteria(v):
            how = f"κ for {v[f'rero_{k}_label']}: {v[f'rero_{k}_kappa_how']}"
            if how not in seen:
                seen.add(how)
                notes.append(how)
    worst: dict[str, Mapping[str, Any]] = {}
    for v in rows:  # each defense's empirical μ: the largest over its attacks
        mu = v.get("empirical_mu")
        if finite(mu) and (v["defense"] not in worst or mu > worst[v["defense"]]["empirical_mu"]):
            worst[v["defense"]] = v
    for defense, v in worst.items():
        sentence, label = mu_sentence(v), v.get(f"rero_{v.get('empirical_mu_criterion')}_label")
        if sentence:
            notes.append(f"{defense} ({display_name(str(v['attack']))}, {label}): {sentence}")
    if context is not None and context.note:
        notes.append(f"No reconstruction criterion: {context.note}")
    return notes


def summarise(records: Sequence[AuditRecord], utility: Utility | None = None,
              context: BoundsContext | None = None) -> Summary:
    """One row per (defense, attack) in the order the records first appear; `context` (the run's
    `giaudit.bounds.bounds_context`) adds the reconstruction criterion to the DP bounds."""
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
    aggregated = aggregate(records, utility, context=context)
    rows = []
    for values in aggregated:
        defense, attack = values["defense"], values["attack"]
        cells: dict[str, Cell] = {}
        seeds = values["seeds"]
        setting = [f"{display_name(attack)} · {seeds} seed{'s' if seeds != 1 else ''}"]
        eps, delta = values["epsilon"], values["delta"]
        if finite(eps):
            setting.append(f"ε = {float(eps):.3g}" + (f", δ = {float(delta):.0e}" if finite(delta) else ""))
        if values.get("tuned"):
            setting.append(f"tuned on {values.get('tuning_clients')} clients of the server's own: "
                           f"{values.get('tuned_options')}")
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
    return Summary(columns, rows, _bound_notes(aggregated, context), bounds_table(aggregated))


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
    what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in modification.items()
                     if k not in ("block", "placed", "did"))
    if modification.get("did"):  # no added block: other values (class fishing), or a second round (class H)
        return f"it {modification['did']}" + (f" ({what})" if what else "")
    block = modification.get("block", "a block")
    placed = f" {modification['placed']}" if modification.get("placed") else ""
    return f"it sent a model with an added {block} block{placed}" + (f" ({what})" if what else "")


def untuned_sentence(v: Mapping[str, Any]) -> str:
    """A tuned row's attack beside itself at its defaults on the same images, in words."""
    h = headline()
    tuned, untuned = v.get(f"{h.name}_worst"), v.get(f"untuned_{h.name}_worst")
    mean, umean = v.get(f"{h.name}_mean"), v.get(f"untuned_{h.name}_mean")
    unit = f" {h.unit}" if h.unit else ""

    def num(x: Any) -> str:
        return f"{float(x):.{h.decimals}f}" if finite(x) else MISSING

    return (f"Its options were tuned on {v.get('tuning_clients')} clients the server simulated from its own data "
            f"({v.get('tuning_trials')} trials: {v.get('tuned_options')}); with its defaults on the same images "
            f"the most leaked image was {num(untuned)}{unit} {h.label} (mean {num(umean)}), tuned "
            f"{num(tuned)}{unit} (mean {num(mean)}).")


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
    text = f"{where}, " + "; ".join(parts) + "."
    if v.get("tuned"):
        text += " " + untuned_sentence(v)
    top = _top(v)
    if top is not None and v.get("rero_release") is not None:  # a DP guarantee: the bracket, in words
        text += " " + bound_sentence(v, top) + "."
    return text


__all__ = ["Cell", "Summary", "SummaryRow", "bound_sentence", "display_name", "finding", "mu_sentence", "summarise",
           "untuned_sentence"]
