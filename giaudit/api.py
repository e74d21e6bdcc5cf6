"""`giaudit.audit()`: the audit as one Python call.

``audit(config)`` takes an `AuditSpec`, the path of a TOML config or a dict
shaped like one (validated by `giaudit.config.parse_config`, errors naming
the key), runs every cell on an engine (default: local processes, one per
core) and returns an `AuditResult`: the records, one table row per record
(the columns of ``results.parquet``) and the policy verdict when the config
sets ``output.policy``.

Files are written only when ``out`` is given: then the run folder is the one
``giaudit audit --out OUT`` writes (``results.json``, ``results.parquet``,
the images, ``report.html`` and ``report.md``), and a folder that already
holds some of the records resumes. Without ``out`` nothing is written
anywhere: the cells run and their records come back in memory.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from giaudit.config import AuditSpec, load_config, parse_config
from giaudit.engine import Engine
from giaudit.errors import ConfigError
from giaudit.orchestration.run import compute_records, policy_of, run_and_render, verdict_of
from giaudit.policy import Verdict
from giaudit.results import AuditRecord, results_frame


@dataclass(frozen=True)
class AuditResult:
    """What an audit found. `frame` has one row per record, the columns of ``results.parquet``; `verdict` is
    the policy's (None without ``output.policy``); `out` is the run folder (None when nothing was written)."""

    records: tuple[AuditRecord, ...]
    frame: pd.DataFrame
    verdict: Verdict | None
    out: Path | None


def _spec(config: AuditSpec | str | os.PathLike[str] | Mapping[str, Any]) -> AuditSpec:
    if isinstance(config, AuditSpec):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(config)
    raise ConfigError(f"audit: expected an AuditSpec, the path of a TOML config or a config dict, got "
                      f"{type(config).__name__}")


def audit(config: AuditSpec | str | os.PathLike[str] | Mapping[str, Any], *, out: str | os.PathLike[str] | None = None,
          engine: Engine | None = None, show_progress: bool = False) -> AuditResult:
    """Run the audit `config` (an AuditSpec, a TOML path or a config dict) and return its `AuditResult`.

    With `out` the run folder of ``giaudit audit`` is written there (records, table, images, report) and the
    result holds every record of that folder; without it nothing is written. `engine` runs the cells
    (default: local processes, one per core)."""
    spec = _spec(config)
    if out is not None:
        run = run_and_render(spec, Path(out), show_progress=show_progress, engine=engine)
        records = tuple(run.store.records)
        return AuditResult(records, results_frame(records), run.verdict, Path(out))
    policy = policy_of(spec)  # a bad policy fails before any cell is computed
    records = tuple(compute_records(spec, show_progress=show_progress, engine=engine))
    return AuditResult(records, results_frame(records), verdict_of(policy, records), None)


__all__ = ["AuditResult", "audit"]
