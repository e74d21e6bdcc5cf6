"""Policy checks: gate a pipeline on leakage thresholds.

A policy (TOML, see examples/policy.toml) sets bounds on the metrics that
`giaudit audit` records, for every record or only for some attacks or
defenses; `check` measures every saved record against every rule that
applies to it and returns a `Verdict`. Threat model: whatever the audited
records ran under; the policy only reads their saved metrics (it never reruns
an attack and never reads the report).

Format::

    [rules]                      # every record
    psnr_db.max = 15             # metric.max / metric.min (inclusive bounds)
    identity_match_rate.max = 0.05
    lpips.min = 0.3
    [attack.ig.rules]            # records whose attack is "ig" (overrides [rules])
    ssim.max = 0.3
    [defense.noise.rules]        # records whose defense is "noise" (overrides [rules])
    psnr_db = { max = 18, missing = "skip" }

Metric names: a rule's metric is looked up in the record's aggregates as
written (``psnr_db_mean``, ``label_accuracy``, ``identity_match_rate``); when
absent there, ``<metric>_worst`` is used, the most-leaked image of the record
(max PSNR/SSIM, min MSE/LPIPS), so ``psnr_db.max = 15`` bounds the best
reconstruction an attacker got. Write ``psnr_db_mean`` to bound the average.

Scopes: for each record and each (metric, bound), the most specific rule
wins: attack scope over defense scope over [rules], so a scope can relax as
well as tighten a global bound.

Missing metrics fail closed: a rule whose metric a record lacks FAILS for that
record (a gate must not pass what was not measured), unless the rule says
``missing = "skip"``; a rule whose metric no record has FAILS with a message
listing the metrics the results do have (typically a typo, or semantic
metrics not enabled), or is SKIPped with that message under
``missing = "skip"``. NaN measurements fail.

`check_main` exits 0 when every rule passes, 1 when one fails, 2 on bad input
(unreadable policy or results; the message names the file and key).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from giaudit.errors import ConfigError, GiauditError
from giaudit.io import read_toml
from giaudit.metrics import METRIC_NAMES, is_metric
from giaudit.results import load_results

OPS = ("max", "min")
MISSING = ("fail", "skip")
SCOPE_KINDS = ("attack", "defense")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str              # "max": measured <= threshold; "min": measured >= threshold
    threshold: float
    scope: str = "all"   # "all" | "attack:<name>" | "defense:<name>"
    missing: str = "fail"

    def describe(self) -> str:
        where = "" if self.scope == "all" else f" [{self.scope}]"
        return f"{self.metric}.{self.op} = {self.threshold:g}{where}"


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str = "<policy>"


@dataclass(frozen=True)
class RuleResult:
    metric: str
    scope: str
    op: str
    threshold: float
    measured: float | None
    passed: bool
    record_id: str | None
    key: str | None = None       # the aggregate actually read (e.g. psnr_db_worst)
    message: str = ""

    def line(self) -> str:
        status = "SKIP" if self.message.startswith("skipped") else ("PASS" if self.passed else "FAIL")
        where = "" if self.scope == "all" else f" [{self.scope}]"
        rule = f"{self.metric}.{self.op} = {self.threshold:g}{where}"
        rec = self.record_id or "(all records)"
        meas = f"{self.key} = {self.measured:.4g}" if self.measured is not None else self.message
        return f"{status}  {rule:<40} {rec}: {meas}"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rules: list[RuleResult] = field(default_factory=list)
    policy_source: str = ""

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "policy": self.policy_source, "rules": [asdict(r) for r in self.rules]}

    def format(self) -> str:
        lines = [r.line() for r in self.rules]
        n_fail = len(self.failures)
        lines.append(f"verdict: {'PASS' if self.passed else 'FAIL'} "
                     f"({n_fail} of {len(self.rules)} rule checks failed; policy {self.policy_source})")
        return "\n".join(lines)


# ---- loading ---------------------------------------------------------------------------

def _parse_rules(table: Any, where: str, scope: str, source: str) -> list[Rule]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {where} must be a table of metric = {{ max = ..., min = ... }}")
    rules: list[Rule] = []
    for metric, spec in table.items():
        key = f"{where}.{metric}"
        if not is_metric(metric):
            raise ConfigError(f"{source}: {key}: unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)} "
                              "(each also with _mean / _worst, or reference_ before it)")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{source}: {key} must be a table such as {metric}.max = 0.5, got {spec!r}")
        unknown = sorted(set(spec) - {*OPS, "missing"})
        if unknown:
            raise ConfigError(f"{source}: {key}.{unknown[0]} is not a rule key; use max, min or missing")
        if not any(op in spec for op in OPS):
            raise ConfigError(f"{source}: {key} needs max and/or min")
        missing = spec.get("missing", "fail")
        if missing not in MISSING:
            raise ConfigError(f"{source}: {key}.missing = {missing!r}; use 'fail' or 'skip'")
        bounds = {}
        for op in OPS:
            if op in spec:
                v = spec[op]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"{source}: {key}.{op} must be a finite number, got {v!r}")
                bounds[op] = float(v)
                rules.append(Rule(metric, op, float(v), scope, missing))
        if "max" in bounds and "min" in bounds and bounds["min"] > bounds["max"]:
            raise ConfigError(f"{source}: {key}: min {bounds['min']:g} > max {bounds['max']:g}")
    return rules


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    rules: list[Rule] = []
    for top, value in data.items():
        if top == "rules":
            rules += _parse_rules(value, "rules", "all", source)
        elif top in SCOPE_KINDS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {top} must hold tables such as [{top}.NAME.rules]")
            for name, sub in value.items():
                if not isinstance(sub, Mapping) or set(sub) != {"rules"}:
                    extra = sorted(set(sub) - {"rules"}) if isinstance(sub, Mapping) else []
                    bad = f"{top}.{name}.{extra[0]}" if extra else f"{top}.{name}"
                    raise ConfigError(f"{source}: {bad}: expected only a [{top}.{name}.rules] table")
                rules += _parse_rules(sub["rules"], f"{top}.{name}.rules", f"{top}:{name}", source)
        else:
            raise ConfigError(f"{source}: unknown key {top!r}; a policy has [rules], [attack.NAME.rules] "
                              "and [defense.NAME.rules]")
    if not rules:
        raise ConfigError(f"{source}: the policy has no rules; add e.g. [rules] psnr_db.max = 15")
    return Policy(tuple(rules), source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    data = read_toml(path, "policy file", "pass a TOML policy (see examples/policy.toml)")
    return parse_policy(data, str(path))


# ---- checking --------------------------------------------------------------------------

def resolve_metric(metrics: Mapping[str, Any], metric: str) -> str | None:
    """The aggregate key a rule on ``metric`` reads: exact name, else ``<metric>_worst``."""
    if metric in metrics:
        return metric
    if f"{metric}_worst" in metrics:
        return f"{metric}_worst"
    return None


def _specificity(scope: str) -> int:
    return {"all": 0, "defense": 1, "attack": 2}[scope.split(":")[0]]


def _applies(rule: Rule, record: Any) -> bool:
    if rule.scope == "all":
        return True
    kind, name = rule.scope.split(":", 1)
    return str(getattr(record, kind)) == name


def check(records: Sequence[Any], policy: Policy) -> Verdict:
    """Check every record (giaudit.results.AuditRecord) against the rules that apply to it."""
    results: list[RuleResult] = []
    records = list(records)
    available = sorted({k for r in records for k in r.metrics})
    seen: set[Rule] = set()
    for record in records:
        chosen: dict[tuple[str, str], Rule] = {}
        for rule in policy.rules:
            if not _applies(rule, record):
                continue
            k = (rule.metric, rule.op)
            if k not in chosen or _specificity(rule.scope) >= _specificity(chosen[k].scope):
                chosen[k] = rule
        for rule in chosen.values():
            seen.add(rule)
            key = resolve_metric(record.metrics, rule.metric)
            base = dict(metric=rule.metric, scope=rule.scope, op=rule.op, threshold=rule.threshold,
                        record_id=record.record_id, key=key)
            if key is None:
                if not any(resolve_metric(r.metrics, rule.metric) for r in records):
                    continue  # reported once below
                skip = rule.missing == "skip"
                results.append(RuleResult(**base, measured=None, passed=skip,
                                          message=("skipped: " if skip else "") + f"{rule.metric} not measured"))
                continue
            try:
                value = float(record.metrics[key])
            except (TypeError, ValueError):
                value = math.nan
            ok = math.isfinite(value) and (value <= rule.threshold if rule.op == "max" else value >= rule.threshold)
            results.append(RuleResult(**base, measured=value, passed=ok,
                                      message="" if math.isfinite(value) else "measured value is not finite"))
    for rule in policy.rules:
        if not any(resolve_metric(r.metrics, rule.metric) for r in records):
            skip = rule.missing == "skip"
            results.append(RuleResult(
                rule.metric, rule.scope, rule.op, rule.threshold, None, skip, None, None,
                ("skipped: " if skip else "") + f"no record has metric {rule.metric!r} (nor {rule.metric}_worst); "
                f"recorded metrics: {', '.join(available) or 'none'}"))
        elif rule not in seen:
            # Not a failure: the scope matched no record (e.g. an attack not run), or a more
            # specific scope replaced this rule for every record it matched.
            why = ("overridden by a more specific scope" if any(_applies(rule, r) for r in records)
                   else "no record in this scope")
            results.append(RuleResult(rule.metric, rule.scope, rule.op, rule.threshold, None, True, None, None,
                                      f"skipped: {why}"))
    if not records:
        results.append(RuleResult("*", "all", "max", math.nan, None, False, None, None, "the results hold no record"))
    return Verdict(all(r.passed for r in results), results, policy.source)


def check_main(results_path: str | os.PathLike[str], policy_path: str | os.PathLike[str]) -> int:
    """`giaudit check RESULTS --policy POLICY`: print each rule and PASS/FAIL; exit 0 / 1 / 2."""
    try:
        policy = load_policy(policy_path)
        store = load_results(results_path)
    except GiauditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = check(store.records, policy)
    print(f"policy {policy.source} on {results_path} ({len(store.records)} records)")
    print(verdict.format())
    return 0 if verdict.passed else 1


__all__ = ["Policy", "Rule", "RuleResult", "Verdict", "check", "check_main", "load_policy", "parse_policy",
           "resolve_metric"]
