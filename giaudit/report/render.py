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

import html
import json
import math
import platform
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeGuard

from jinja2 import Environment
from markupsafe import Markup

from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.report import figures
from giaudit.report.compare import privacy_utility_png
from giaudit.report.summary import Summary, summarise
from giaudit.report.templating import environment
from giaudit.results import AuditRecord, ResultsStore, load_images, load_results

# Names of the SoK classes (Carletti et al., Table of attacker capabilities).
SOK_NAMES = {
    "A": "eavesdropper",
    "B": "informed eavesdropper",
    "C": "parameter-aware eavesdropper",
    "D": "data-enhanced eavesdropper",
    "E": "statistics-informed eavesdropper",
    "F": "active manipulator",
    "G": "active manipulator",
    "H": "active manipulator",
}

# What each capability (giaudit.types.Capability value) means for the reader.
CAPABILITY_TEXT = {
    "batch_size": "basic knowledge: architecture, loss and batch size",
    "training_details": "training details: learning rate, local steps, mini-batch size",
    "surrogate_data": "surrogate data from the same distribution (e.g. a trained prior)",
    "bn_statistics": "the client's batch-norm statistics",
    "true_labels": "the true labels of the private batch",
}
ORACLE_CAPABILITIES = {"true_labels", "bn_statistics"}

# Metric columns with a fixed place in the table; any other metric key is appended.
_PSNR, _SSIM, _LPIPS = ("psnr_db_mean", "psnr_db_worst"), ("ssim_mean", "ssim_worst"), ("lpips_mean", "lpips_worst")
_FIXED_METRICS = {*_PSNR, *_SSIM, *_LPIPS, "label_accuracy"}
_MISSING = "—"
MAX_GRID_PAIRS = 24


# --------------------------------------------------------------------------- the report's content

@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # column indices right-aligned


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


# --------------------------------------------------------------------------- formatting helpers

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> TypeGuard[float]:
    return _is_number(v) and math.isfinite(float(v))


def fmt_num(v: Any, digits: int = 4) -> str:
    """Numbers to short text; missing or non-finite values to a dash."""
    if v is None:
        return _MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if _is_number(v):
        f = float(v)
        if math.isnan(f):
            return _MISSING
        if math.isinf(f):
            return "∞" if f > 0 else "−∞"
        return f"{f:.{digits}g}"
    return str(v)


def _fmt_fixed(v: Any, decimals: int) -> str:
    return f"{float(v):.{decimals}f}" if _finite(v) else _MISSING


def fmt_value(v: Any) -> str:
    """Any JSON-like value (disclosed items, parameters) to one line of text."""
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, bool) or _is_number(v):
        return fmt_num(v)
    try:
        return json.dumps(v, sort_keys=True, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(v)


def _pair(m: Mapping[str, Any], keys: tuple[str, str], decimals: int) -> str:
    a, b = (m.get(k) for k in keys)
    if not _finite(a) and not _finite(b):
        return _MISSING
    return f"{_fmt_fixed(a, decimals)} / {_fmt_fixed(b, decimals)}"


def _kv_line(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt_value(v)}" for k, v in mapping.items())


# --------------------------------------------------------------------------- TOML for the config block

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes (\" \\ \n \uXXXX ...) are all valid TOML basic-string escapes.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _toml_table(mapping: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    scalars = [(k, v) for k, v in mapping.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    for k, v in scalars:
        out.append(f"{_toml_key(str(k))} = {_toml_value(v)}")
    for k, v in mapping.items():
        name = f"{prefix}.{_toml_key(str(k))}" if prefix else _toml_key(str(k))
        if isinstance(v, Mapping):
            if out:
                out.append("")
            out.append(f"[{name}]")
            _toml_table(v, name, out)
        elif _is_table_array(v):
            for item in v:
                if out:
                    out.append("")
                out.append(f"[[{name}]]")
                # Nested tables inside an array element are written inline to keep this simple.
                for ik, iv in item.items():
                    out.append(f"{_toml_key(str(ik))} = {_toml_value(iv)}")


def _plain(v: Any) -> Any:
    """Tuples to lists, recursively, so a TOML round trip can be compared with ==."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def config_as_text(config: Mapping[str, Any]) -> tuple[str, str]:
    """(text, language): TOML that parses back to the same config, else JSON."""
    try:
        lines: list[str] = []
        _toml_table(config, "", lines)
        text = "\n".join(lines) + "\n"
        if tomllib.loads(text) == _plain(config):
            return text, "toml"
    except (ValueError, TypeError, tomllib.TOMLDecodeError):
        pass
    # TOML has no null and no heterogeneous nesting we could not express: JSON always works.
    return json.dumps(config, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n", "json"


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
        if r.label_source not in g.label_sources:
            g.label_sources.append(r.label_source)
    return list(groups.values())


# Human names (with units) for metric keys in the per-record table; x_mean / x_worst share a column.
HUMAN = {
    "mse": "MSE mean / lowest",
    "face_detection_rate": "faces detected",
    "face_detection_batch": "batch has a detected face",
    "identity_match_rate": "verified as same person",
    "identity_similarity": "embedding cosine (raw)",
    "reid_rank1": "re-identified rank-1",
    "reid_rank5": "re-identified rank-5",
    "reid_gallery_size": "gallery size N",
    "reid_scored": "reconstructions ranked",
    "gender_accuracy": "gender read correctly",
    "race_accuracy": "race read correctly",
    "age_abs_error": "age error (years)",
    # Fixed columns at sample level; named here for their user_ (every pair) variants.
    "mse_mean": "MSE mean", "psnr_db_mean": "PSNR (dB) mean", "ssim_mean": "SSIM mean", "lpips_mean": "LPIPS mean",
}
_PERCENT_KEYS = re.compile(r"(_rate|_batch|_accuracy|_chance|reid_rank\d)$")


def human_metric(key: str) -> str:
    ref = key.startswith("reference_")
    base = key.removeprefix("reference_")
    if base.startswith("user_"):  # a user-level run scores every (reconstruction, original) pair too
        return f"{human_metric(base.removeprefix('user_'))}, every pair"
    m = re.match(r"^attribute_(.+)_(accuracy|chance)$", base)
    if m:
        name = m.group(1).replace("_", " ") + (" inferred" if m.group(2) == "accuracy" else " chance")
    else:
        name = HUMAN.get(base, base.replace("_", " "))
    return f"{name} (originals)" if ref else name


def _metric_value(key: str, v: Any) -> str:
    if v is None:
        return _MISSING
    if _PERCENT_KEYS.search(key.removeprefix("reference_")) and _finite(v):
        return f"{100 * float(v):.0f} %"
    return fmt_num(v)


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
            name = human_metric(base)
            cols.append((name if " / " in name else f"{name} mean / worst", (k, base + "_worst")))
            used.update((k, base + "_worst"))
        else:
            cols.append((human_metric(k), (k,)))
            used.add(k)
    return cols


def _lpips_note(record: AuditRecord) -> bool:
    return any("lpips" in n.lower() and "unavailable" in n.lower() for n in record.notes)


def _metric_table(records: Sequence[AuditRecord]) -> Table:
    extras = _extra_metric_columns(records)
    headers = ["record", "seed", "PSNR (dB) mean / worst", "SSIM mean / worst",
               "LPIPS mean / best", "labels recovered (source)", "attack time"] + [h for h, _ in extras]
    rows = []
    for r in records:
        m = r.metrics
        lp = _pair(m, _LPIPS, 3)
        if lp == _MISSING and _lpips_note(r):
            lp = "unavailable (see notes)"
        acc = m.get("label_accuracy")
        acc_s = f"{100 * float(acc):.0f} %" if acc is not None and _finite(acc) else _MISSING
        t = r.timings or {}
        total = t.get("total_s", t.get("attack_s"))
        time_s = f"{float(total):.1f} s" if total is not None and _finite(total) else _MISSING
        if _finite(t.get("iterations")):
            time_s += f", {int(t['iterations'])} it"
        row = [f"{r.defense} · {r.attack}", str(r.seed), _pair(m, _PSNR, 2), _pair(m, _SSIM, 3), lp,
               f"{acc_s} ({r.label_source})", time_s]
        for _, keys in extras:
            vals = [m.get(k) for k in keys]
            row.append(" / ".join(_metric_value(k, v) for k, v in zip(keys, vals))
                       if any(v is not None for v in vals) else _MISSING)
        rows.append(row)
    return Table(headers, rows, numeric={1, 2, 3, 4, 6, *range(7, len(headers))})


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
            what = _kv_line(r.disclosed)
        elif r.defense in ("none", ""):
            what = "nothing (no defense: the raw update was shared)"
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
                parts.append(f"{table.get('name', '?')}" + (f" ({_kv_line(params)})" if params else ""))
        return " → ".join(parts) or "no defense"

    if isinstance(by_label, Mapping) and by_label:
        return [f"{label}: {chain(tables)}" for label, tables in by_label.items()]
    return [line for table in config.get("defenses") or () if (line := chain([table])) != "no defense"]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "record"


def _caption(p: Mapping[str, Any], fallback_rank: int) -> str:
    rank = p.get("rank", fallback_rank)
    parts = [f"#{rank}", f"{_fmt_fixed(p.get('psnr_db'), 1)} dB", f"SSIM {_fmt_fixed(p.get('ssim'), 3)}"]
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
        rows.append([str(getattr(rule, "metric", "")), str(getattr(rule, "scope", "")),
                     str(getattr(rule, "op", "")), fmt_num(getattr(rule, "threshold", None)),
                     fmt_num(getattr(rule, "measured", None)),
                     "PASS" if getattr(rule, "passed", False) else "FAIL"])
    return bool(verdict.passed), Table(["metric", "scope", "rule", "threshold", "measured", "result"], rows,
                                       numeric={3, 4})


def _strongest(grids: Sequence[Grid], limit: int = 6) -> list[Grid]:
    """The most leaked record of each (defense, attack), most leaked first (by worst-case PSNR)."""
    best: dict[tuple[str, str], Grid] = {}
    for g in grids:
        if g.png is None:
            continue
        key = (g.record.defense, g.record.attack)
        p = g.record.metrics.get("psnr_db_worst")
        if key not in best or (_finite(p) and float(p) > float(best[key].record.metrics.get("psnr_db_worst") or -1e9)):
            best[key] = g
    order = sorted(best.values(), key=lambda g: -float(g.record.metrics.get("psnr_db_worst") or -1e9))
    return order[:limit]


def _utility_png(summary: Summary) -> bytes | None:
    rows = [dict(r.values) for r in summary.rows]
    if not any(_finite(r.get("utility_accuracy_mean")) for r in rows):
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
    if config:
        config_text, lang = config_as_text(config)
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
    summary = summarise(records, utility)
    failed = [f"{getattr(r, 'metric', '')} {getattr(r, 'op', '')} {fmt_num(getattr(r, 'threshold', None))} "
              f"({getattr(r, 'scope', '')}): measured {fmt_num(getattr(r, 'measured', None))}"
              for r in (getattr(verdict, "rules", ()) or ()) if not getattr(r, "passed", False)]
    return ReportData(
        title=f"giaudit report: {run_name}",
        run_name=run_name,
        run_dir=str(store.run_dir),
        created=str(meta["created"]) if meta.get("created") else None,
        n_records=len(records),
        threats=_threat_groups(records),
        defense_configs=_defense_configs(config, meta.get("defense_tables")),
        disclosures=_disclosures(records),
        metrics=_metric_table(records),
        notes=_notes(records),
        grids=grids,
        loss_png=loss_png,
        loss_message=loss_msg,
        versions=versions,
        versions_source=vsource,
        config_text=config_text,
        config_lang=lang,
        seeds=seeds,
        hashes=Table(["record", "config hash", "attack parameters"],
                     [[r.record_id, r.config_hash, _kv_line(r.attack_params or {}) or _MISSING]
                      for r in records]),
        command=str(command) if command else None,
        verdict_passed=passed,
        verdict_rules=rules,
        summary=summary,
        strongest=_strongest(grids),
        verdict_failed=failed,
        utility_png=_utility_png(summary),
        scenario=", ".join(dict.fromkeys(r.scenario for r in records)),
    )


def threat_sentences(g: ThreatGroup) -> dict[str, Any]:
    """Plain-text pieces of one threat-model statement (escaped by the writers)."""
    letter = g.sok_class
    name = SOK_NAMES.get(letter[:1], "unknown class")
    # Oracle capabilities get their own bold line when the record lists its oracles; listing them
    # again under "sees" would only repeat it.
    hide = ORACLE_CAPABILITIES if g.oracles else set()
    granted = [CAPABILITY_TEXT.get(c, c) for c in g.granted if c not in hide]
    sees = ["the global model and the shared update"] + granted
    return {"letter": letter, "name": name, "sees": sees, "oracles": list(g.oracles)}


# --------------------------------------------------------------------------- HTML and Markdown (jinja2)

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md_escape(text: Any) -> str:
    """Escape Markdown syntax and HTML in one line of user text (for table cells and prose)."""
    s = str(text).replace("\r", " ").replace("\n", " ")
    s = html.escape(s, quote=False)  # inline HTML would otherwise render in most Markdown viewers
    return _MD_SPECIAL.sub(r"\\\1", s)


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in t.headers) + " |",
             "|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.headers))) + "|"]
    for row in t.rows:
        lines.append("| " + " | ".join(md_escape(c) for c in row) + " |")
    return "\n".join(lines)


def _md_code(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _html_table(t: Table, *, cell_class: Mapping[str, str] | None = None) -> Markup:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    body = []
    for row in t.rows:
        cells = []
        for i, c in enumerate(row):
            classes = []
            if i in t.numeric:
                classes.append("num")
            if cell_class and c in cell_class:
                classes.append(cell_class[c])
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return Markup(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                  f'<tbody>{"".join(body)}</tbody></table></div>')


def _environment() -> Environment:
    env = environment()
    env.filters.update(md=md_escape, md_table=_md_table, md_code=_md_code, html_table=_html_table,
                       data_uri=figures.png_data_uri, num=fmt_num)
    env.globals.update(threat_sentences=threat_sentences, MISSING=_MISSING)
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


__all__ = ["render", "render_path", "collect", "to_html", "to_markdown", "config_as_text", "md_escape",
           "SOK_NAMES", "CAPABILITY_TEXT"]
