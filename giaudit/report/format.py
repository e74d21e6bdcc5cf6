"""Formatting shared by the report writers: numbers to short text, tables, and escaping for HTML and Markdown.

Every user-provided string (names, notes, config values) passes through `escape` (HTML) or `md_escape`
(Markdown) before it reaches a file; missing or non-finite numbers become a dash (`MISSING`).
"""
from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from giaudit.stats import finite

MISSING = "—"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # column indices right-aligned


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def pct(v: Any, digits: int = 0) -> str:
    """A share as a percentage ("42 %"); missing or non-finite values to a dash."""
    return f"{100 * v:.{digits}f} %" if finite(v) else MISSING


def fmt_num(v: Any, digits: int = 4) -> str:
    """Numbers to short text; missing or non-finite values to a dash."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if is_number(v):
        f = float(v)
        if math.isnan(f):
            return MISSING
        if math.isinf(f):
            return "∞" if f > 0 else "−∞"
        return f"{f:.{digits}g}"
    return str(v)


def fmt_fixed(v: Any, decimals: int) -> str:
    return f"{float(v):.{decimals}f}" if finite(v) else MISSING


def fmt_value(v: Any) -> str:
    """Any JSON-like value (disclosed items, parameters) to one line of text."""
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, bool) or is_number(v):
        return fmt_num(v)
    try:
        return json.dumps(v, sort_keys=True, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(v)


def pair(m: Mapping[str, Any], keys: tuple[str, str], decimals: int) -> str:
    a, b = (m.get(k) for k in keys)
    if not finite(a) and not finite(b):
        return MISSING
    return f"{fmt_fixed(a, decimals)} / {fmt_fixed(b, decimals)}"


def kv_line(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt_value(v)}" for k, v in mapping.items())




def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md_escape(text: Any) -> str:
    """Escape Markdown syntax and HTML in one line of user text (for table cells and prose)."""
    s = str(text).replace("\r", " ").replace("\n", " ")
    s = html.escape(s, quote=False)  # inline HTML would otherwise render in most Markdown viewers
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_table(t: Table) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in t.headers) + " |",
             "|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.headers))) + "|"]
    for row in t.rows:
        lines.append("| " + " | ".join(md_escape(c) for c in row) + " |")
    return "\n".join(lines)


def md_code(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def html_table(t: Table, *, cell_class: Mapping[str, str] | None = None) -> Markup:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
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
            cells.append(f"<td{cls}>{escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return Markup(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                  f'<tbody>{"".join(body)}</tbody></table></div>')
