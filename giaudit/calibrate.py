"""`giaudit calibrate`: the weakest setting of one defense parameter that passes a policy, by bisection.

Given a defense preset, one of its parameters whose privacy is monotone in its value (`MONOTONE`: DP-SGD's
``noise_multiplier`` or target ``epsilon``, additive noise ``sigma``, top-k ``sparsity``), a policy and an
audit config (default: the embedded demo), within the bracket [``--low``, ``--high``] (defaults per
parameter):

1. Bounds first, no attack run: the DP bound on any attacker (`giaudit.bounds`) of the audited update at a
   candidate comes from the defense's disclosure of one simulated client step and the client pool's PSNR
   baseline κ. When the policy bounds ``rero_bound``, the settings whose bound already breaks the rule are
   cut from the bracket (bisection on the bound; the full check later also counts the criteria that need
   records, so the bound can only grow: the cut is safe).
2. Then attacks at candidates: each candidate is audited (`giaudit.orchestration.run_audit`, resumable, into
   ``OUT/cells``) and judged by the policy (`giaudit.policy.check`). The most private end must pass (else
   nothing in the bracket does: exit 1); the least private end is tried next; then ``--steps`` bisections
   (geometric for scale parameters) keep a passing end and a failing end. The chosen setting is the weakest
   passing one found; the next weaker point evaluated failed.
3. Utility (``--utility-rounds R``, 0 to skip): held-out accuracy after an R-round federated training with
   the candidate on every client (`giaudit.utility`, cached), so the weakest passing setting is shown at
   its utility.

Written atomically to ``OUT``: ``calibrate.json`` (every evaluation, in order), ``calibrate.png`` (the
frontier: measured leakage, the DP bound and utility against the parameter) and ``<label>-calibrated.toml``
(the chosen setting as a defense preset). Monotonicity is assumed, not proved: attack success at one
setting is a measurement, and the JSON says so when a stronger setting failed where a weaker one passed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from giaudit.aggregate import summarise
from giaudit.bounds import bounds_context, release_guarantee
from giaudit.config import AuditSpec, demo_config_path, load_config
from giaudit.defenses import DEFENSES, build_chain, load_defense_file
from giaudit.engine import Engine, LocalEngine
from giaudit.errors import ConfigError
from giaudit.io import atomic_write_bytes, atomic_write_text, config_as_text
from giaudit.orchestration import run_audit
from giaudit.policy import Policy, check, load_policy
from giaudit.results import load_results
from giaudit.scenario.build import build_scenario
from giaudit.types import disclosed_values
from giaudit.utility import UtilityCache, UtilitySettings, run_utility, with_dp_rounds


@dataclasses.dataclass(frozen=True)
class Monotone:
    """A defense parameter whose privacy grows in one direction: ``up`` (more noise), ``down`` (a smaller
    target ε). `drops`: keys the parameter replaces (DP-SGD takes a noise multiplier or an ε, not both)."""

    direction: Literal["up", "down"]
    low: float
    high: float
    scale: Literal["log", "linear"] = "log"
    drops: tuple[str, ...] = ()


MONOTONE: dict[tuple[str, str], Monotone] = {
    ("dpsgd", "noise_multiplier"): Monotone("up", 0.05, 5.0, drops=("epsilon",)),
    ("dpsgd", "epsilon"): Monotone("down", 0.5, 64.0, drops=("noise_multiplier",)),
    ("noise", "sigma"): Monotone("up", 1e-4, 1.0),
    ("sparsify", "sparsity"): Monotone("up", 0.5, 0.999, scale="linear", drops=("k",)),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Which table of the preset the parameter belongs to, and how to set it."""

    label: str
    tables: tuple[Mapping[str, Any], ...]
    index: int
    param: str
    rule: Monotone

    def at(self, value: float) -> list[dict[str, Any]]:
        """The preset's tables with the parameter set to `value`."""
        out = [dict(t) for t in self.tables]
        table = {k: v for k, v in out[self.index].items() if k not in self.rule.drops}
        table[self.param] = float(value)
        out[self.index] = table
        return out

    def stronger(self, a: float, b: float) -> bool:
        """`a` is at least as private as `b`."""
        return a >= b if self.rule.direction == "up" else a <= b


def target(defense_file: str | Path, param: str, low: float | None = None, high: float | None = None) -> Target:
    """The preset's table that takes `param`, validated (one line naming the file, key or flag)."""
    label, tables = load_defense_file(defense_file)
    hits = [i for i, t in enumerate(tables) if param in DEFENSES.options(str(t["name"]))]
    if not hits:
        names = ", ".join(str(t["name"]) for t in tables) or "none"
        raise ConfigError(f"--param: no defense of {defense_file} ({names}) takes {param!r}")
    index = hits[0]
    name = str(tables[index]["name"])
    rule = MONOTONE.get((name, param))
    if rule is None:
        known = ", ".join(f"{d}.{p}" for d, p in MONOTONE)
        raise ConfigError(f"--param: {name}.{param} is not a parameter calibrate can bisect (monotone ones: {known})")
    lo, hi = rule.low if low is None else float(low), rule.high if high is None else float(high)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (rule.scale == "log" and lo <= 0):
        raise ConfigError(f"--low/--high: need 0 < low < high (got {lo:g}, {hi:g})")
    out = Target(label, tuple(tables), index, param, dataclasses.replace(rule, low=lo, high=hi))
    for v in (lo, hi):  # both ends must be valid settings of the defense
        build_chain(out.at(v), where=f"{defense_file}: defenses (with {param} = {v:g})")
    return out


def midpoint(a: float, b: float, scale: str) -> float:
    return math.sqrt(a * b) if scale == "log" else (a + b) / 2.0


def bisect(evaluate: Callable[[float], bool], strong: float, weak: float, steps: int,
           scale: str) -> tuple[float | None, float | None, list[float]]:
    """(weakest passing, strongest failing next to it, every point evaluated) for a monotone pass/fail
    between `strong` (most private) and `weak`. (None, strong, ...) when even `strong` fails."""
    seen: list[float] = []

    def ev(x: float) -> bool:
        seen.append(x)
        return evaluate(x)

    if not ev(strong):
        return None, strong, seen
    if ev(weak):
        return weak, None, seen
    ok, bad = strong, weak
    for _ in range(steps):
        mid = midpoint(ok, bad, scale)
        if ev(mid):
            ok = mid
        else:
            bad = mid
    return ok, bad, seen


@dataclasses.dataclass
class Evaluation:
    value: float
    phase: str                        # "bound" or "audit"
    passed: bool
    rero_bound: float | None = None
    leakage: float | None = None      # the headline metric's worst image over the attacks (PSNR dB)
    utility: float | None = None
    failed: list[str] = dataclasses.field(default_factory=list)


def _bound_at(spec: AuditSpec, tables: Sequence[Mapping[str, Any]], kappa: float, adjacency: str) -> float:
    """The DP bound of one simulated client update under `tables` at baseline κ (1 without a guarantee)."""
    scen, _held = build_scenario(spec.data, spec.scenario, spec.threat.model(), spec.seeds[0])
    obs, _truth = scen.simulate(build_chain(list(tables)), generator=torch.Generator().manual_seed(spec.seeds[0]))
    g = release_guarantee(disclosed_values(obs.disclosed))
    return 1.0 if g is None else g.gamma(kappa, "replace" if adjacency == "replace" else "add_remove")


def _bound_rules(policy: Policy, label: str) -> list[float]:
    return [r.threshold for r in policy.rules if r.metric == "rero_bound" and r.op == "max"
            and r.scope in ("all", f"defense:{label}")]


def calibrate(defense_file: str | Path, param: str, policy_file: str | Path, *, config: str | Path | None = None,
              out: str | Path = "reports/calibrate", low: float | None = None, high: float | None = None,
              steps: int = 4, utility_rounds: int = 0, engine: Engine | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Find the weakest passing setting (see the module docstring); return the summary written to
    ``calibrate.json``."""
    if steps < 0:
        raise ConfigError("--steps: must be >= 0")
    if utility_rounds < 0:
        raise ConfigError("--utility-rounds: must be >= 0 (0 skips utility)")
    t = target(defense_file, param, low, high)
    policy = load_policy(policy_file)
    spec = load_config(config or demo_config_path())
    out_dir = Path(out)
    strong, weak = (t.rule.high, t.rule.low) if t.rule.direction == "up" else (t.rule.low, t.rule.high)
    evaluations: list[Evaluation] = []

    # 1. Bounds first.
    limits = _bound_rules(policy, t.label)
    bound_failed: float | None = None
    context = bounds_context({"config": spec.raw})
    if limits and context.psnr_kappa is not None:
        kappa, limit = context.psnr_kappa.value, min(limits)

        def bound_ok(x: float) -> bool:
            b = _bound_at(spec, t.at(x), kappa, context.adjacency)
            evaluations.append(Evaluation(x, "bound", b <= limit, rero_bound=b))
            log(f"bound  {param} = {x:.4g}: any attacker <= {b:.1%} (rule {limit:g})")
            return b <= limit

        ok, bound_failed, _seen = bisect(bound_ok, strong, weak, steps, t.rule.scale)
        if ok is None:
            return _finish(t, out_dir, evaluations, None, None, "even the most private end's DP bound breaks "
                           "rero_bound", log)
        weak = ok  # anything weaker cannot pass

    # 2. Attacks at the candidates (and 3. utility).
    engine = engine or LocalEngine()

    def audit_ok(x: float) -> bool:
        tables = t.at(x)
        label = f"{t.label}@{param}={x:.6g}"
        run_audit(spec.replace(defenses=tables), out_dir / "cells", defense_label=label, show_progress=False,
                  engine=engine)
        store = load_results(out_dir / "cells")
        records = [r for r in store.records if r.defense == label]
        verdict = check(records, policy, {**store.meta, "config": spec.raw})
        rows = summarise(records, context=context)
        leak = max((float(r["psnr_db_worst"]) for r in rows if math.isfinite(r.get("psnr_db_worst", math.nan))),
                   default=math.nan)
        acc = None
        if utility_rounds:
            settings = UtilitySettings(max_rounds=utility_rounds, target_accuracy=None)
            acc = float(run_utility(spec, with_dp_rounds(tables, utility_rounds), spec.seeds[0], settings,
                                    rounds=utility_rounds,
                                    cache=UtilityCache(out_dir))["accuracy"])
        evaluations.append(Evaluation(x, "audit", verdict.passed, rero_bound=max(
            (float(r["rero_bound"]) for r in rows if math.isfinite(r.get("rero_bound", math.nan))), default=None),
            leakage=leak, utility=acc, failed=[f.line() for f in verdict.failures]))
        log(f"audit  {param} = {x:.4g}: {'PASS' if verdict.passed else 'FAIL'}")
        return verdict.passed

    ok, bad, _seen = bisect(audit_ok, strong, weak, steps, t.rule.scale)
    if ok is not None and bad is None:  # the weakest end the bounds left passed: the bounds' failing point is next
        bad = bound_failed
    reason = None if ok is not None else f"the most private end ({param} = {strong:g}) fails the policy"
    return _finish(t, out_dir, evaluations, ok, bad, reason, log)


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _frontier_png(t: Target, evaluations: Sequence[Evaluation], chosen: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audits = sorted((e for e in evaluations if e.phase == "audit"), key=lambda e: e.value)
    bounds = sorted((e for e in evaluations if e.rero_bound is not None), key=lambda e: e.value)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    if audits:
        ax.plot([e.value for e in audits], [_num(e.leakage) for e in audits], "o-", label="measured: worst PSNR (dB)")
        for e in audits:
            ax.annotate("pass" if e.passed else "fail", (e.value, e.leakage or 0.0), fontsize=7)
    ax.set_xlabel(t.param)
    ax.set_ylabel("worst PSNR (dB)")
    if t.rule.scale == "log":
        ax.set_xscale("log")
    right = ax.twinx()
    if bounds:
        right.plot([e.value for e in bounds], [_num(e.rero_bound) for e in bounds], "s--", color="tab:red",
                   label="DP bound on any attacker")
    util = [e for e in audits if e.utility is not None]
    if util:
        right.plot([e.value for e in util], [_num(e.utility) for e in util], "^:", color="tab:green", label="utility")
    right.set_ylabel("share (bound, accuracy)")
    right.set_ylim(0, 1.05)
    if chosen is not None:
        ax.axvline(chosen, color="grey", lw=0.8)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], fontsize=7, loc="best")
    ax.set_title(f"calibrating {t.label}: {t.param}", fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _finish(t: Target, out_dir: Path, evaluations: list[Evaluation], chosen: float | None, failing: float | None,
            reason: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    audits = sorted((e for e in evaluations if e.phase == "audit"), key=lambda e: e.value)
    breaks = [(a.value, b.value) for a in audits for b in audits
              if t.stronger(a.value, b.value) and a.value != b.value and not a.passed and b.passed]
    summary: dict[str, Any] = {
        "defense": t.label, "param": t.param, "direction": t.rule.direction, "bracket": [t.rule.low, t.rule.high],
        "chosen": chosen, "next_weaker_failed": failing, "reason": reason,
        "evaluations": [dataclasses.asdict(e) for e in evaluations],
        "monotone_violations": breaks,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "calibrate.png", _frontier_png(t, evaluations, chosen))
    if chosen is not None:
        preset = {"label": f"{t.label}-calibrated",
                  "description": f"{t.label} with {t.param} = {chosen:.6g}: the weakest setting found to pass",
                  "defenses": t.at(chosen)}
        text, _lang = config_as_text(preset)
        path = out_dir / f"{t.label}-calibrated.toml"
        atomic_write_text(path, text)
        summary["preset"] = str(path)
        log(f"chosen: {t.param} = {chosen:.6g} -> {path}")
    else:
        log(f"no setting passes: {reason}")
    atomic_write_text(out_dir / "calibrate.json", json.dumps(summary, indent=1, default=str))
    return summary


__all__ = ["MONOTONE", "Evaluation", "Monotone", "Target", "bisect", "calibrate", "midpoint", "target"]
