"""The audit report: one self-contained HTML file and one Markdown file per run.

The report states the threat model in the vocabulary of Carletti et al.'s
"SoK: Gradient Inversion Attacks in Federated Learning" (USENIX Security
2025): the SoK letter, the capabilities actually granted, and, in bold, any
oracle outside that table (true labels, the client's batch-norm statistics),
so that two audits are compared like for like. It then shows what each
defense disclosed, the metric table (mean and worst case = most leaked), the
original | reconstruction grids most leaked first, the attacker's
gradient-matching loss per iteration (DLG, Zhu et al. 2019; Inverting
Gradients, Geiping et al. 2020) and a reproducibility block.

The report never recomputes a metric: every number comes from the records of
`giaudit.results.ResultsStore`, so the report and results.json cannot
disagree. All user-provided text (names, notes, config values) is escaped.
The HTML embeds its images as base64 PNG data URIs and uses inline CSS only:
no network access is needed to view it. The Markdown references PNGs written
to ``figures/`` beside it. Every file is written atomically.
"""
from __future__ import annotations

import platform
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jinja2 import Environment

from giaudit.bounds import bounds_context
from giaudit.io import atomic_write_bytes, atomic_write_text, config_as_text
from giaudit.metrics.registry import Metric, is_rate, parse, summarised
from giaudit.report import figures
from giaudit.report.compare import privacy_utility_png
from giaudit.report.format import (
    MISSING,
    Table,
    fmt_fixed,
    fmt_num,
    kv_line,
    md_escape,
    pair,
    pct,
)
from giaudit.report.summary import Summary, summarise
from giaudit.report.templating import environment
from giaudit.results import AuditRecord, ResultsStore, load_images, load_results
from giaudit.scenario.sections import CAPTURE_DATA_KEYS, CAPTURE_KEYS
from giaudit.stats import finite
from giaudit.types import CAPABILITIES, SOK_CLASSES, UNDECLARED_DEFENSE

# Metric columns with a fixed place in the per-record table (the summarised image metrics, then labels);
# any other metric key is appended.
_IMAGE_COLUMNS = tuple((m, (f"{m.name}_mean", f"{m.name}_worst")) for m in summarised())
_FIXED_METRICS = {k for _, keys in _IMAGE_COLUMNS for k in keys} | {"label_accuracy"}
MAX_GRID_PAIRS = 24


# --------------------------------------------------------------------------- the report's content

@dataclass
class ThreatGroup:
    sok_class: str
    granted: tuple[str, ...]
    oracles: tuple[str, ...]
    record_ids: list[str]
    label_sources: list[str]


@dataclass
class Grid:
    record: AuditRecord
    png: bytes | None
    message: str | None  # why there is no image, when png is None
    filename: str


@dataclass
class ReportData:
    title: str
    run_name: str
    run_dir: str
    created: str | None
    n_records: int
    threats: list[ThreatGroup]
    defense_configs: list[str]
    disclosures: Table
    metrics: Table
    notes: list[tuple[str, list[str]]]  # (note, record ids)
    grids: list[Grid]
    loss_png: bytes | None
    loss_message: str | None
    versions: dict[str, str]
    versions_source: str
    config_text: str | None
    config_lang: str
    seeds: list[int]
    hashes: Table
    command: str | None
    verdict_passed: bool | None
    verdict_rules: Table | None
    summary: Summary = field(default_factory=lambda: Summary([], []))
    strongest: list[Grid] = field(default_factory=list)
    verdict_failed: list[str] = field(default_factory=list)
    utility_png: bytes | None = None
    scenario: str = ""
    verdict_coverage: str | None = None  # which SoK classes the policy judged (the verdict's coverage())
    verdict_classes: str | None = None   # the verdict per kind of server and SoK letter (classes_text())
    verdict_tuning: list[str] = field(default_factory=list)  # rules that passed untuned and fail tuned


# --------------------------------------------------------------------------- collecting the content

def _versions(meta: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    recorded = meta.get("versions")
    if isinstance(recorded, Mapping) and recorded:
        return {str(k): str(v) for k, v in recorded.items()}, "recorded when the audit ran"
    out = {}
    for pkg in ("giaudit", "torch", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    return out, "taken when this report was rendered: the run did not record its own"


def _threat_groups(records: Sequence[AuditRecord]) -> list[ThreatGroup]:
    groups: dict[tuple, ThreatGroup] = {}
    for r in records:
        t = r.threat or {}
        sok = str(t.get("sok_class") or "?")
        # The capabilities the attack used (the SoK letter is taken over them); older records: granted.
        granted = tuple(str(g) for g in (t.get("used") or t.get("granted") or ()))
        oracles = tuple(str(o) for o in (t.get("oracles") or ()))
        key = (sok, granted, oracles)
        g = groups.setdefault(key, ThreatGroup(sok, granted, oracles, [], []))
        g.record_ids.append(r.record_id)
        if r.label_source and r.label_source not in g.label_sources:
            g.label_sources.append(r.label_source)
    return list(groups.values())


def human_metric(key: str) -> str:
    """The report's name for a record key (the registry's label; an unregistered key as written)."""
    found = parse(key)
    return found.label if found is not None else key.replace("_", " ")


def _metric_value(key: str, v: Any) -> str:
    if v is None:
        return MISSING
    return pct(v) if is_rate(key) and finite(v) else fmt_num(v)


def _extra_metric_columns(records: Sequence[AuditRecord]) -> list[tuple[str, tuple[str, ...]]]:
    """Columns for metric keys beyond the fixed ones: x_mean and x_worst share a column."""
    keys: list[str] = []
    for r in records:
        for k in r.metrics:
            if k not in _FIXED_METRICS and k not in keys:
                keys.append(k)
    cols: list[tuple[str, tuple[str, ...]]] = []
    used: set[str] = set()
    for k in sorted(keys, key=lambda k: (k.startswith("reference_"), k)):
        if k in used:
            continue
        if k.endswith("_mean") and k[: -len("_mean")] + "_worst" in keys:
            base = k[: -len("_mean")]
            found = parse(base)
            word = found.metric.worst_word if found is not None else "worst"
            cols.append((f"{human_metric(base)} mean / {word}", (k, base + "_worst")))
            used.update((k, base + "_worst"))
        else:
            cols.append((human_metric(k), (k,)))
            used.add(k)
    return cols


def _unavailable(record: AuditRecord, metric: Metric) -> bool:
    """The record's notes say the optional metric's model was unavailable."""
    return any(metric.label.lower() in n.lower() and "unavailable" in n.lower() for n in record.notes)


def _metric_table(records: Sequence[AuditRecord]) -> Table:
    extras = _extra_metric_columns(records)
    headers = (["record", "seed"] + [f"{m.heading} mean / {m.worst_word}" for m, _ in _IMAGE_COLUMNS]
               + ["labels recovered (source)", "attack time"] + [h for h, _ in extras])
    rows = []
    for r in records:
        m = r.metrics
        images = []
        for metric, keys in _IMAGE_COLUMNS:
            text = pair(m, keys, metric.decimals + 1)  # one decimal more than the summary
            if text == MISSING and metric.optional and _unavailable(r, metric):
                text = "unavailable (see notes)"
            images.append(text)
        acc = m.get("label_accuracy")
        acc_s = pct(acc)
        t = r.timings or {}
        total = t.get("total_s", t.get("attack_s"))
        time_s = f"{float(total):.1f} s" if total is not None and finite(total) else MISSING
        if finite(t.get("iterations")):
            time_s += f", {int(t['iterations'])} it"
        row = [f"{r.defense} · {r.attack}", str(r.seed), *images, f"{acc_s} ({r.label_source})", time_s]
        for _, extra in extras:
            vals = [m.get(k) for k in extra]
            row.append(" / ".join(_metric_value(k, v) for k, v in zip(extra, vals))
                       if any(v is not None for v in vals) else MISSING)
        rows.append(row)
    return Table(headers, rows, numeric={1, *range(2, 2 + len(_IMAGE_COLUMNS)), 3 + len(_IMAGE_COLUMNS),
                                         *range(4 + len(_IMAGE_COLUMNS), len(headers))})


def _notes(records: Sequence[AuditRecord]) -> list[tuple[str, list[str]]]:
    out: dict[str, list[str]] = {}
    for r in records:
        for n in r.notes:
            out.setdefault(str(n), []).append(r.record_id)
    return list(out.items())


def _disclosures(records: Sequence[AuditRecord]) -> Table:
    rows = []
    for r in records:
        if r.disclosed:
            what = kv_line(r.disclosed)
        elif r.undefended:
            what = "nothing (no defense: the raw update was shared)"
        elif r.defense == UNDECLARED_DEFENSE:
            what = "unknown (the deployment's defenses were not declared)"
        else:
            what = "nothing"
        rows.append([r.record_id, r.defense, what])
    return Table(["record", "defense", "disclosed to the server"], rows)


def _defense_configs(config: Mapping[str, Any], by_label: Any = None) -> list[str]:
    """The configured chain, or, for a run that audited several chains under labels (the demo,
    ``meta["defense_tables"]``), one line per label."""
    def chain(tables: Any) -> str:
        parts = []
        for table in tables or ():
            if isinstance(table, Mapping):
                params = {k: v for k, v in table.items() if k != "name"}
                parts.append(f"{table.get('name', '?')}" + (f" ({kv_line(params)})" if params else ""))
        return " → ".join(parts) or "no defense"

    if isinstance(by_label, Mapping) and by_label:
        return [f"{label}: {chain(tables)}" for label, tables in by_label.items()]
    return [line for table in config.get("defenses") or () if (line := chain([table])) != "no defense"]


def _effective(config: Mapping[str, Any], capture: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The configuration the audit really used: for a capture, without [data] and the simulation's scenario
    keys (the capture holds them), with what was taken from the capture in their place."""
    if capture is None:
        return config
    scenario = {k: v for k, v in (config.get("scenario") or {}).items() if k in CAPTURE_KEYS and v is not None}
    data = {k: v for k, v in (config.get("data") or {}).items() if k in CAPTURE_DATA_KEYS and v is not None}
    out = {k: v for k, v in config.items() if k not in ("data", "scenario", "defenses")}
    return {**out, **({"data": data} if data else {}), "scenario": scenario, "capture": dict(capture)}


def _deployment_lines(capture: Mapping[str, Any]) -> list[str]:
    dep = capture.get("deployment_defenses")
    if not isinstance(dep, list):
        return ["deployment: not declared (record the deployment's mods at capture time, or declare them with "
                "scenario.deployment_defenses)"]
    return [f"deployment: {line}" for line in dep] or ["deployment: none (declared)"]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "record"


def _caption(p: Mapping[str, Any], fallback_rank: int) -> str:
    rank = p.get("rank", fallback_rank)
    parts = [f"#{rank}", f"{fmt_fixed(p.get('psnr_db'), 1)} dB", f"SSIM {fmt_fixed(p.get('ssim'), 3)}"]
    text = "  ".join(parts)
    if p.get("label_true") is not None and p.get("label_pred") is not None:
        text += f"\nlabel {p['label_true']} → {p['label_pred']}"
    return text


def _grids(store: ResultsStore, records: Sequence[AuditRecord]) -> list[Grid]:
    grids = []
    for i, r in enumerate(records):
        filename = f"grid_{i:03d}_{_safe_name(r.record_id)}.png"
        try:
            pair = load_images(store.run_dir, r)
        except (OSError, KeyError, ValueError) as exc:
            grids.append(Grid(r, None, f"images file {r.images_file} could not be read ({exc})", filename))
            continue
        if pair is None:
            grids.append(Grid(r, None, "this record saved no images", filename))
            continue
        original, recon = pair
        if original.shape[0] == 0 and recon.shape[0] > 0:
            # No ground truth exists (a server-side capture): the reconstructions alone, nothing measured.
            png = figures.image_grid_png(recon, max_images=MAX_GRID_PAIRS,
                                         title="reconstructions (no ground truth: the server's view)")
            grids.append(Grid(r, png, None, filename))
            continue
        if original.shape[0] == 0:
            grids.append(Grid(r, None, "no image pairs in the images file", filename))
            continue
        # Row i of the images file is matched pair i, in the order of per_image (most leaked first).
        caps = [_caption(p, k + 1) for k, p in enumerate(r.per_image)]
        caps += [""] * max(0, original.shape[0] - len(caps))
        png = figures.pair_grid_png(original, recon, caps, max_pairs=MAX_GRID_PAIRS)
        grids.append(Grid(r, png, None, filename))
    return grids


def _loss_curves(records: Sequence[AuditRecord]) -> tuple[bytes | None, str | None]:
    series = {}
    for r in records:
        losses = (r.trace or {}).get("losses")
        if losses is None:
            continue
        try:
            series[r.record_id] = [float(x) for x in losses]
        except (TypeError, ValueError):
            continue  # a trace that is not a flat list of numbers: nothing we can plot
    if not series:
        return None, "No record has a loss trace."
    try:
        return figures.loss_curves_png(series), None
    except ValueError:
        return None, "The loss traces hold no positive finite values to plot on a log scale."


def _verdict(verdict: Any) -> tuple[bool | None, Table | None]:
    if verdict is None:
        return None, None
    rows = []
    for rule in getattr(verdict, "rules", ()) or ():
        variant = str(getattr(rule, "variant", "") or "")
        rows.append([str(getattr(rule, "metric", "")), _judged(rule),
                     str(getattr(rule, "scope", "")) + (f" · {variant}" if variant else ""),
                     str(getattr(rule, "op", "")), fmt_num(getattr(rule, "threshold", None)),
                     fmt_num(getattr(rule, "measured", None)),
                     # a blocked record is not a pass on measured leakage: the client sent nothing
                     "BLOCKED" if getattr(rule, "status", "") == "BLOCKED" else
                     "PASS" if getattr(rule, "passed", False) else "FAIL"])
    return bool(verdict.passed), Table(["metric", "judged", "scope", "rule", "threshold", "measured", "result"],
                                       rows, numeric={4, 5})


def _judged(rule: Any) -> str:
    """The (defense, attack) a rule result judged, "defense / attack" (empty when it judged no pair)."""
    d, a = getattr(rule, "defense", None), getattr(rule, "attack", None)
    return f"{d} / {a}" if d and a else ""


def _strongest(grids: Sequence[Grid], limit: int = 6) -> list[Grid]:
    """The most leaked record of each (defense, attack), most leaked first (by worst-case PSNR)."""
    best: dict[tuple[str, str], Grid] = {}
    for g in grids:
        if g.png is None:
            continue
        key = (g.record.defense, g.record.attack)
        p = g.record.metrics.get("psnr_db_worst")
        if key not in best or (finite(p) and float(p) > float(best[key].record.metrics.get("psnr_db_worst") or -1e9)):
            best[key] = g
    order = sorted(best.values(), key=lambda g: -float(g.record.metrics.get("psnr_db_worst") or -1e9))
    return order[:limit]


def _utility_png(summary: Summary) -> bytes | None:
    rows = [dict(r.values) for r in summary.rows]
    if not any(finite(r.get("utility_accuracy_mean")) for r in rows):
        return None
    return privacy_utility_png(rows)


def collect(store: ResultsStore, verdict: Any = None,
            utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> ReportData:
    """Everything the report shows, read from the store (no metric is recomputed).

    ``utility`` (a comparison's per-seed utility results per defense label, each with ``accuracy`` and
    ``baseline_accuracy``) adds a utility column and the privacy-utility plot."""
    meta = store.meta or {}
    raw_config = meta.get("config")
    config: Mapping[str, Any] = raw_config if isinstance(raw_config, Mapping) else {}
    records = list(store.records)
    run_name = str(config.get("name") or meta.get("name") or Path(store.run_dir).name)
    versions, vsource = _versions(meta)
    capture = meta.get("capture") if isinstance(meta.get("capture"), Mapping) else None
    if config:
        config_text, lang = config_as_text(_effective(config, capture))
    else:
        config_text, lang = None, "text"
    seeds = sorted({int(r.seed) for r in records} | {int(s) for s in (config.get("seeds") or ())
                                                      if isinstance(s, int)})
    command = meta.get("command")
    if isinstance(command, (list, tuple)):
        command = shlex.join(str(c) for c in command)
    loss_png, loss_msg = _loss_curves(records)
    passed, rules = _verdict(verdict)
    grids = _grids(store, records)
    summary = summarise(records, utility, bounds_context(meta))
    failed = [f"{getattr(r, 'metric', '')} {getattr(r, 'op', '')} {fmt_num(getattr(r, 'threshold', None))} "
              f"({getattr(r, 'scope', '')}{', ' + r.variant if getattr(r, 'variant', '') else ''}): "
              f"measured {fmt_num(getattr(r, 'measured', None))}"
              + (f" on {_judged(r)}" if _judged(r) else "")
              for r in (getattr(verdict, "rules", ()) or ()) if not getattr(r, "passed", False)]
    return ReportData(
        title=f"giaudit report: {run_name}",
        run_name=run_name,
        run_dir=str(store.run_dir),
        created=str(meta["created"]) if meta.get("created") else None,
        n_records=len(records),
        threats=_threat_groups(records),
        defense_configs=(_deployment_lines(capture) if capture is not None
                         else _defense_configs(config, meta.get("defense_tables"))),
        disclosures=_disclosures(records),
        metrics=_metric_table(records),
        notes=_notes(records) + ([(f"results.json held {len(store.duplicates)} repeated record(s) of the same "
                                    "cell: each cell is counted once", sorted(set(store.duplicates)))]
                                  if store.duplicates else []),
        grids=grids,
        loss_png=loss_png,
        loss_message=loss_msg,
        versions=versions,
        versions_source=vsource,
        config_text=config_text,
        config_lang=lang,
        seeds=seeds,
        hashes=Table(["record", "config hash", "attack parameters"],
                     [[r.record_id, r.config_hash, kv_line(r.attack_params or {}) or MISSING]
                      for r in records]),
        command=str(command) if command else None,
        verdict_passed=passed,
        verdict_rules=rules,
        summary=summary,
        strongest=_strongest(grids),
        verdict_failed=failed,
        utility_png=_utility_png(summary),
        scenario=", ".join(dict.fromkeys(r.scenario for r in records)),
        verdict_coverage=verdict.coverage() if hasattr(verdict, "coverage") else None,
        verdict_classes=(verdict.classes_text() or None) if hasattr(verdict, "classes_text") else None,
        verdict_tuning=verdict.flip_lines() if hasattr(verdict, "flip_lines") else [],
    )


def threat_sentences(g: ThreatGroup) -> dict[str, Any]:
    """Plain-text pieces of one threat-model statement (escaped by the writers)."""
    letter = g.sok_class
    name = SOK_CLASSES.get(letter[:1], "unknown class")
    # Oracle capabilities get their own bold line when the record lists its oracles; listing them
    # again under "sees" would only repeat it.
    rows = {c.value: row for c, row in CAPABILITIES.items()}
    hide = {k for k, row in rows.items() if row.oracle} if g.oracles else set()
    granted = [rows[c].text if c in rows else c for c in g.granted if c not in hide]
    sees = ["the global model and the shared update"] + granted
    return {"letter": letter, "name": name, "sees": sees, "oracles": list(g.oracles)}


# --------------------------------------------------------------------------- HTML and Markdown (jinja2)

def _environment() -> Environment:
    env = environment()
    env.globals.update(threat_sentences=threat_sentences)
    return env


ENV = _environment()


def to_html(d: ReportData) -> str:
    return ENV.get_template("report.html").render(d=d)


def to_markdown(d: ReportData, figure_dir: str = "figures", loss_name: str = "loss_curves.png") -> str:
    return ENV.get_template("report.md").render(d=d, figure_dir=figure_dir, loss_name=loss_name)

# --------------------------------------------------------------------------- entry point

_OWN_FIGURE = re.compile(r"^(grid_\d{3}_.*|loss_curves|privacy_utility)\.png$")


def render(store: ResultsStore, out_dir: str | Path | None = None, *, verdict: Any = None,
           utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md (+ figures/) and return their paths.

    `out_dir` defaults to the run folder. `verdict` (from the policy check) is an
    object with `.passed` and `.rules` (each with metric, scope, op, threshold,
    measured, passed); when given, the report opens with a PASS/FAIL banner.
    """
    out = Path(out_dir) if out_dir is not None else Path(store.run_dir)
    data = collect(store, verdict, utility)
    fig_dir = out / "figures"
    written: set[str] = set()
    for g in data.grids:
        if g.png is not None:
            atomic_write_bytes(fig_dir / g.filename, g.png)
            written.add(g.filename)
    if data.loss_png is not None:
        atomic_write_bytes(fig_dir / "loss_curves.png", data.loss_png)
        written.add("loss_curves.png")
    if data.utility_png is not None:
        atomic_write_bytes(fig_dir / "privacy_utility.png", data.utility_png)
        written.add("privacy_utility.png")
    # Figures of an earlier render of this folder (fewer or renamed records) would linger: drop only ours.
    if fig_dir.is_dir():
        for f in fig_dir.iterdir():
            if f.is_file() and _OWN_FIGURE.match(f.name) and f.name not in written:
                f.unlink()
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, to_html(data))
    atomic_write_text(md_path, to_markdown(data))
    return html_path, md_path


def render_path(run_dir: str | Path, out_dir: str | Path | None = None, *, verdict: Any = None,
                utility: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> tuple[Path, Path]:
    """`render` for a run folder on disk (raises DataError when it holds no results.json)."""
    return render(load_results(run_dir), out_dir, verdict=verdict, utility=utility)


__all__ = ["render", "render_path", "collect", "to_html", "to_markdown", "config_as_text", "md_escape"]
