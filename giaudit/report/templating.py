"""The jinja2 environment shared by the audit report and the comparison report (one base template), with the
formatting filters of `giaudit.report.format`."""
from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from giaudit.report.figures import png_data_uri
from giaudit.report.format import MISSING, fmt_num, html_table, md_code, md_escape, md_table

TEMPLATES = Path(__file__).resolve().parent / "templates"


def environment() -> Environment:
    """HTML templates autoescape; Markdown templates escape through the `md` filter."""
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(md=md_escape, md_table=md_table, md_code=md_code, html_table=html_table,
                       data_uri=png_data_uri, num=fmt_num)
    env.globals.update(MISSING=MISSING)
    return env
