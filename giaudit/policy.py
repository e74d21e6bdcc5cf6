"""Policy checks: gate a pipeline on leakage thresholds.

A policy (TOML, see examples/policy.toml) sets bounds on the metrics that
`giaudit audit` records, for every record or only for some attacks or
defenses; `check` measures every saved record against every rule that
applies to it and returns a `Verdict`. Threat model: whatever the audited
records ran under; the policy only reads their saved metrics (it never reruns
an attack and never reads the report).

Format::

    confidence = 0.95            # optional: judge means and rates at their interval's bound
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

What a rule judges: records are grouped by (defense, attack), all seeds,
clients and checkpoints together. A worst-case rule (one that resolves to
``<metric>_worst``, e.g. ``psnr_db.max``) holds per image: the most leaked
image of the group decides. A rule on a mean or a rate (``psnr_db_mean``,
``identity_match_rate``, ``label_accuracy``) is judged on the aggregate over
all the group's images (per-image values where records keep them, else the
records' values weighted by their image counts), so ``identity_match_rate.max
= 0.05`` over 40 images with one match passes (0.025) instead of failing on
the one record that matched. With a top-level ``confidence = 0.95`` the
aggregate is replaced by its interval's bound on the rule's side: the Wilson
bound for rates, the bootstrap bound for means (one match in 40 then fails:
its Wilson upper bound is 0.13). Each result says which basis it used and on
how many samples. A defense's verdict is the worst over all attacks run
(`Verdict.by_defense` names the attack).

Threat classes: ``threat_classes = "A-E"`` (the default) says which SoK classes
of Carletti et al. the policy covers; records of an attack outside them are not
judged, and every verdict says so. "A-E" is an honest-but-curious server;
"A-H" covers a malicious one too (an active attack such as Robbing the Fed's
imprint, which breaks secure aggregation). A record whose client refused the
server's model (model_validation) is BLOCKED: nothing was sent, so nothing
leaked, and its rules hold; it is listed apart from a rule that passed on
measured leakage.

Scopes: for each (defense, attack) and each (metric, bound), the most
specific rule wins: attack scope over defense scope over [rules], so a scope
can relax as well as tighten a global bound.

Derived metrics (the registry's, computed per (defense, attack) by
`giaudit.aggregate.rero`, never stored in a record): ``rero_bound`` is the
largest DP bound on any attacker's success over the success criteria the
group has a baseline for (re-identification among N, an attribute
classifier's majority class, a reconstruction within τ dB PSNR of the
client pool's best fixed guess when the run's metadata is given), so
``rero_bound.max = 0.2`` asks that no attacker can succeed on more than 20 %
of targets; a defense without a DP guarantee has bound 1. ``empirical_mu`` is
the largest empirical μ = Φ⁻¹(p) - Φ⁻¹(κ) over those criteria, with p the
measured success, or, with ``confidence`` set, its Clopper-Pearson lower
bound at that confidence.

Tuned attacks (``attacks.NAME.tune``): a tuned record also holds the same
attack at its defaults on the same audited clients
(`giaudit.aggregate.untuned_view`), and both are judged, the untuned as its
own group (each result's `variant` says "tuned" or "untuned"): the
defense's verdict is the worse of the two, and `Verdict.tuning_flips` lists
every rule that passed untuned and fails tuned (the false PASS an untuned
audit would have given), with the tuned options.

Missing metrics fail closed: a rule whose metric a record lacks FAILS for that
record (a gate must not pass what was not measured), unless the rule says
``missing = "skip"``; a rule whose metric no record has FAILS with a message
listing the metrics the results do have (typically a typo, or semantic
metrics not enabled), or is SKIPped with that message under
``missing = "skip"``. NaN measurements fail.

`giaudit check RUN --policy POLICY` prints every result and exits 0 when every
rule passes, 1 when one fails, 2 on bad input (unreadable policy or results;
the message names the file and key).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from giaudit.aggregate import UNTUNED, image_count, pooled, rero, tuned_options, untuned_views
from giaudit.attacks import ATTACKS
from giaudit.bounds import CONFIDENCE, BoundsContext, bounds_context
from giaudit.errors import ConfigError
from giaudit.io import read_toml
from giaudit.metrics.registry import is_metric, is_rate, names, parse, policy_key
from giaudit.results import AuditRecord
from giaudit.types import ACTIVE_CLASSES, SOK_CLASSES, a_server, class_span, server_kind

OPS = ("max", "min")
MISSING = ("fail", "skip")
SCOPE_KINDS = ("attack", "defense")
DEFAULT_THREAT_CLASSES = class_span(False)   # "A-E", an honest-but-curious server: the passive attacks


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
    confidence: float | None = None  # judge means and rates at this interval's bound (e.g. 0.95)
    threat_classes: str = DEFAULT_THREAT_CLASSES  # the SoK classes whose records it judges ("A-H": all)

    @property
    def covered(self) -> frozenset[str]:
        return class_range(self.threat_classes, self.source)


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
    defense: str | None = None   # the (defense, attack) judged
    attack: str | None = None
    basis: str = ""              # "worst image", "mean over images", "Wilson upper 95% bound over images ..."
    samples: int | None = None   # images (or records) the judgement rests on
    active: bool = False         # the (defense, attack) is a malicious server's (it changed the model)
    sok_class: str = ""          # the SoK letter of the (defense, attack) judged
    variant: str = ""            # a tuned attack: "tuned", or "untuned" (the same attack at its defaults)
    tuned_options: str = ""      # a tuned attack's options (both variants)

    @property
    def status(self) -> str:
        if self.message.startswith("skipped"):
            return "SKIP"
        if self.message.startswith(BLOCKED):
            return "BLOCKED"
        return "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        where = "" if self.scope == "all" else f" [{self.scope}]"
        rule = f"{self.metric}.{self.op} = {self.threshold:g}{where}"
        group = (f"{self.defense} / {self.attack}" + (f" ({self.variant})" if self.variant else "")
                 if self.defense is not None else "(all records)")
        rec = f"{group} {self.record_id}" if self.record_id and self.defense is not None else (
            self.record_id or group)
        meas = f"{self.key} = {self.measured:.4g}" if self.measured is not None else self.message
        how = f" [{self.basis}, n = {self.samples}]" if self.basis else ""
        return f"{self.status}  {rule:<40} {rec}: {meas}{how}"


BLOCKED = "blocked"  # a RuleResult message that starts so: the client refused the server's model


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rules: list[RuleResult] = field(default_factory=list)
    policy_source: str = ""
    threat_classes: str = DEFAULT_THREAT_CLASSES
    uncovered: tuple[str, ...] = ()   # "defense / attack (class G)" groups outside the policy's classes
    unjudged: tuple[str, ...] = ()    # the SoK letters of those groups

    def by_class(self) -> dict[str, dict[str, Any]]:
        """The verdict per SoK letter attacked, in letter order: `passed` (None: outside the policy's classes, not
        judged), the kind of `server` and the (defense, attack) pairs that `failed` or were `blocked`."""
        out: dict[str, dict[str, Any]] = {}

        def entry(letter: str) -> dict[str, Any]:
            return out.setdefault(letter, {"passed": True, "server": server_kind(letter in ACTIVE_CLASSES),
                                           "failed": [], "blocked": []})

        for r in self.rules:
            if r.defense is None or r.status == "SKIP" or not r.sok_class:
                continue
            d, pair = entry(r.sok_class), f"{r.defense} / {r.attack}"
            if not r.passed:
                d["passed"] = False
                d["failed"] += [pair] if pair not in d["failed"] else []
            elif r.status == "BLOCKED":
                d["blocked"] += [pair] if pair not in d["blocked"] else []
        for letter in self.unjudged:
            if letter not in out:
                entry(letter)["passed"] = None
        return dict(sorted(out.items()))

    def classes_text(self) -> str:
        """The verdict per kind of server and per SoK letter attacked, in words: "an honest-but-curious server
        (SoK classes A-E): PASS (class B: PASS); a malicious server (SoK classes F-H): FAIL (class G: FAIL:
        secure_agg / imprint)"."""
        by = self.by_class()

        def status(d: Mapping[str, Any]) -> str:
            if d["passed"] is None:
                return "not judged"
            if not d["passed"]:
                return "FAIL: " + ", ".join(d["failed"])
            return "PASS" + (f" (blocked: {', '.join(d['blocked'])})" if d["blocked"] else "")

        parts = []
        for active in (False, True):
            letters = [c for c in by if (c in ACTIVE_CLASSES) == active]
            if not letters:
                continue
            judged = [by[c]["passed"] for c in letters if by[c]["passed"] is not None]
            overall = "not judged" if not judged else "PASS" if all(judged) else "FAIL"
            each = "; ".join(f"class {c}: {status(by[c])}" for c in letters)
            parts.append(f"{a_server(active)} (SoK classes {class_span(active)}): {overall} ({each})")
        return "; ".join(parts)

    def coverage(self) -> str:
        """What the verdict covers, in words (said with every verdict)."""
        covered = class_range(self.threat_classes)
        servers = " or ".join(dict.fromkeys(a_server(c in ACTIVE_CLASSES) for c in sorted(covered)))
        text = f"the policy covers SoK classes {self.threat_classes} ({servers})"
        if self.uncovered:
            every = f"{min(SOK_CLASSES)}-{max(SOK_CLASSES)}"
            text += (f"; not judged, outside them: {', '.join(self.uncovered)} (set threat_classes = \"{every}\" "
                     "to judge a malicious server)")
        return text

    def tuning_flips(self) -> list[tuple[RuleResult, RuleResult]]:
        """(untuned, tuned) results of every rule that passed with the attack at its defaults and fails with it
        tuned on the server's own data, on the same (defense, attack)."""
        untuned = {(r.defense, r.attack, r.metric, r.op, r.scope): r for r in self.rules
                   if r.variant == UNTUNED and r.status == "PASS"}
        return [(untuned[k], r) for r in self.rules
                if r.variant == "tuned" and r.status == "FAIL"
                and (k := (r.defense, r.attack, r.metric, r.op, r.scope)) in untuned]

    def flip_lines(self) -> list[str]:
        """`tuning_flips` in words: "passed untuned, fails tuned: psnr_db.max = 15 on none / ig (untuned
        12.1, tuned 18.3; tuned options: lr = 0.05, ...)"."""
        out = []
        for u, t in self.tuning_flips():
            meas = ", ".join(f"{name} {r.measured:.4g}" if r.measured is not None else f"{name} {r.message}"
                             for name, r in ((UNTUNED, u), ("tuned", t)))
            key = f"{t.key} " if t.key else ""
            out.append(f"passed untuned, fails tuned: {t.metric}.{t.op} = {t.threshold:g} on {t.defense} / {t.attack}"
                       f" ({key}{meas}; tuned options: {t.tuned_options or 'none recorded'})")
        return out

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "policy": self.policy_source, "rules": [asdict(r) for r in self.rules],
                "defenses": self.by_defense(), "threat_classes": self.threat_classes,
                "uncovered": list(self.uncovered), "coverage": self.coverage(), "classes": self.by_class(),
                "per_class": self.classes_text(), "tuning_flips": self.flip_lines()}

    def by_defense(self) -> dict[str, dict[str, Any]]:
        """The default verdict of each defense: the worst over every attack run, naming that attack.

        A defense fails when any attack breaks a rule; its worst attack is the first failing one, else the one
        closest to its threshold. When a malicious server's attack was judged, `servers` holds the verdict
        against each kind of server (honest-but-curious, malicious) apart."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.rules:
            if r.defense is None or r.status == "SKIP":
                continue
            d = out.setdefault(r.defense, {"passed": True, "worst_attack": None, "worst_rule": None,
                                           "servers": {}, "classes": {}, "_margin": math.inf})
            kind = server_kind(r.active)
            d["servers"][kind] = d["servers"].get(kind, True) and r.passed
            if r.sok_class:
                d["classes"][r.sok_class] = d["classes"].get(r.sok_class, True) and r.passed
            margin = (-math.inf if not r.passed else
                      abs(r.threshold - r.measured) / max(abs(r.threshold), 1e-12) if r.measured is not None
                      else math.inf)
            if not r.passed:
                d["passed"] = False
            if margin < d["_margin"]:
                d.update(_margin=margin, worst_attack=r.attack, worst_rule=r.line())
        for d in out.values():
            d.pop("_margin")
            d["classes"] = dict(sorted(d["classes"].items()))
            if server_kind(True) not in d["servers"]:
                # judged against an honest-but-curious server only: nothing to tell apart
                d.pop("servers")
                d.pop("classes")
        return out

    def format(self) -> str:
        lines = [r.line() for r in self.rules]
        for defense, d in self.by_defense().items():
            against = "; ".join([f"{k} server: {'PASS' if ok else 'FAIL'}" for k, ok in d.get("servers", {}).items()]
                                + [f"class {c}: {'PASS' if ok else 'FAIL'}" for c, ok in d.get("classes", {}).items()])
            lines.append(f"defense {defense}: {'PASS' if d['passed'] else 'FAIL'} "
                         f"(worst attack: {d['worst_attack']}{'; ' + against if against else ''})")
        n_fail = len(self.failures)
        per_class = self.classes_text()
        if per_class:
            lines.append(f"per threat class: {per_class}")
        lines += self.flip_lines()
        lines.append(f"verdict: {'PASS' if self.passed else 'FAIL'} "
                     f"({n_fail} of {len(self.rules)} rule checks failed; policy {self.policy_source}; "
                     f"{self.coverage()})")
        return "\n".join(lines)


# ---- loading ---------------------------------------------------------------------------

def class_range(text: str, source: str = "<policy>") -> frozenset[str]:
    """The SoK letters of ``"A-E"`` (a range) or ``"D"`` (one letter); raises naming ``threat_classes``."""
    letters = sorted(SOK_CLASSES)
    parts = text.split("-") if isinstance(text, str) else []
    if len(parts) == 1 and parts[0] in SOK_CLASSES:
        return frozenset(parts)
    if len(parts) == 2 and all(p in SOK_CLASSES for p in parts) and parts[0] <= parts[1]:
        return frozenset(c for c in letters if parts[0] <= c <= parts[1])
    raise ConfigError(f"{source}: threat_classes = {text!r}; expected a range of SoK classes such as "
                      f"\"{DEFAULT_THREAT_CLASSES}\" (an honest-but-curious server, the default) or "
                      f"\"{letters[0]}-{letters[-1]}\" (a malicious one too)")


def _parse_rules(table: Any, where: str, scope: str, source: str) -> list[Rule]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {where} must be a table of metric = {{ max = ..., min = ... }}")
    rules: list[Rule] = []
    for metric, spec in table.items():
        key = f"{where}.{metric}"
        if not is_metric(metric):
            raise ConfigError(f"{source}: {key}: unknown metric {metric!r}; known: {', '.join(names())} "
                              "(each also with _mean / _worst, or reference_ or user_ before it)")
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
    confidence = data.get("confidence")
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                   or not 0.5 <= confidence < 1.0):
        raise ConfigError(f"{source}: confidence must be a number in [0.5, 1), e.g. 0.95; got {confidence!r}")
    classes = data.get("threat_classes", DEFAULT_THREAT_CLASSES)
    class_range(classes, source)
    for top, value in data.items():
        if top in ("confidence", "threat_classes"):
            continue
        if top == "rules":
            rules += _parse_rules(value, "rules", "all", source)
        elif top in SCOPE_KINDS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {top} must hold tables such as [{top}.NAME.rules]")
            for name, sub in value.items():
                if top == "attack" and name not in ATTACKS:  # defense scopes are labels: any name may be one
                    raise ConfigError(f"{source}: attack.{name}: unknown attack {name!r}; known: "
                                      f"{', '.join(ATTACKS.names())}")
                if not isinstance(sub, Mapping) or set(sub) != {"rules"}:
                    extra = sorted(set(sub) - {"rules"}) if isinstance(sub, Mapping) else []
                    bad = f"{top}.{name}.{extra[0]}" if extra else f"{top}.{name}"
                    raise ConfigError(f"{source}: {bad}: expected only a [{top}.{name}.rules] table")
                rules += _parse_rules(sub["rules"], f"{top}.{name}.rules", f"{top}:{name}", source)
        else:
            raise ConfigError(f"{source}: unknown key {top!r}; a policy has confidence, threat_classes, [rules], "
                              "[attack.NAME.rules] and [defense.NAME.rules]")
    if not rules:
        raise ConfigError(f"{source}: the policy has no rules; add e.g. [rules] psnr_db.max = 15")
    return Policy(tuple(rules), source, None if confidence is None else float(confidence), classes)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    data = read_toml(path, "policy file", "pass a TOML policy (see examples/policy.toml)")
    return parse_policy(data, str(path))


# ---- checking --------------------------------------------------------------------------

def resolve_metric(metrics: Mapping[str, Any], metric: str) -> str | None:
    """The aggregate key a rule on ``metric`` reads: exact name, else ``<metric>_worst``."""
    return policy_key(metrics, metric)


def _specificity(scope: str) -> int:
    return {"all": 0, "defense": 1, "attack": 2}[scope.split(":")[0]]


def _applies(rule: Rule, record: Any) -> bool:
    if rule.scope == "all":
        return True
    kind, name = rule.scope.split(":", 1)
    return str(getattr(record, kind)) == name


def _value(record: Any, key: str) -> float:
    try:
        return float(record.metrics[key])
    except (TypeError, ValueError):
        return math.nan


def _passes(value: float, rule: Rule) -> bool:
    return math.isfinite(value) and (value <= rule.threshold if rule.op == "max" else value >= rule.threshold)


def _judge_worst(group: list[Any], rule: Rule, key: str, base: dict[str, Any]) -> RuleResult:
    """A worst-case rule holds for every image: the most leaked image over the group decides."""
    vals = [(_value(r, key), r) for r in group]
    bad = [(v, r) for v, r in vals if not math.isfinite(v)]
    if bad:
        return RuleResult(**base, measured=bad[0][0], passed=False, record_id=bad[0][1].record_id,
                          basis="worst image", samples=sum(image_count(r) for r in group),
                          message="measured value is not finite")
    pick = max if (rule.op == "max") else min
    value, rec = pick(vals, key=lambda vr: vr[0])
    return RuleResult(**base, measured=value, passed=_passes(value, rule), record_id=rec.record_id,
                      basis="worst image", samples=sum(image_count(r) for r in group))


def _judge_aggregate(group: list[Any], rule: Rule, key: str, base: dict[str, Any],
                     confidence: float | None) -> RuleResult:
    """A rule on a mean or a rate is judged on all images of the (defense, attack), at the interval's bound
    when the policy asks for confidence."""
    p = pooled(group, key)
    n, mean, unit = p.n, p.mean, p.unit
    if not math.isfinite(mean):
        return RuleResult(**base, measured=mean, passed=False, record_id=None, basis="aggregate", samples=n,
                          message="measured value is not finite")
    if confidence is None:
        return RuleResult(**base, measured=mean, passed=_passes(mean, rule), record_id=None,
                          basis=f"mean over {unit}", samples=n)
    lo, hi = p.interval(rate=is_rate(key), confidence=confidence)
    how = "Wilson" if is_rate(key) else "bootstrap"
    bound = hi if rule.op == "max" else lo
    side = "upper" if rule.op == "max" else "lower"
    return RuleResult(**base, measured=bound, passed=_passes(bound, rule), record_id=None,
                      basis=f"{how} {side} {confidence:.0%} bound over {unit} (mean {mean:.4g})", samples=n)


def is_derived(metric: str) -> bool:
    """A rule's metric is computed per group (`giaudit.aggregate.rero`), not read from the records."""
    found = parse(metric)
    return found is not None and found.metric.derived


def _judge_derived(group: list[Any], rule: Rule, base: dict[str, Any], confidence: float | None,
                   context: BoundsContext) -> RuleResult:
    """`rero_bound`: the largest DP bound over the group's criteria; `empirical_mu`: the largest empirical μ, at
    the measured share or, with `confidence`, at its Clopper-Pearson lower bound."""
    row = rero(group, (), context, confidence=confidence or CONFIDENCE)
    keys = [k for k in str(row.get("rero_criteria") or "").split(",") if k]
    samples = sum(image_count(r) for r in group)
    if not keys:
        return RuleResult(**base, measured=None, passed=rule.missing == "skip", record_id=None, key=None,
                          samples=samples, message=("skipped: " if rule.missing == "skip" else "")
                          + f"{rule.metric}: no success criterion has a baseline here (re-identification, an "
                          "attribute classifier, or the client pool's PSNR baseline from the run's metadata)")
    if rule.metric == "rero_bound":
        crit = row["rero_bound_criterion"]
        value = float(row["rero_bound"])
        basis = (f"DP bound on {row[f'rero_{crit}_label']}, κ = {row[f'rero_{crit}_kappa']:.3g}, "
                 f"{row['rero_adjacency']}" if row.get("rero_release") else "no DP guarantee: bound 1")
    else:
        stat = "mu" if confidence is not None else "mu_point"
        value, crit = max((float(row[f"rero_{k}_{stat}"]), k) for k in keys)
        basis = (f"empirical μ on {row[f'rero_{crit}_label']} at the Clopper-Pearson lower {confidence:.0%} bound"
                 if confidence is not None else f"empirical μ on {row[f'rero_{crit}_label']} at the measured share")
    n = int(row[f"rero_{crit}_n"])
    if math.isnan(value):
        return RuleResult(**base, measured=value, passed=False, record_id=None, key=rule.metric, samples=n,
                          basis=basis, message="measured value is not finite")
    ok = value <= rule.threshold if rule.op == "max" else value >= rule.threshold
    return RuleResult(**base, measured=value, passed=ok, record_id=None, key=rule.metric, basis=basis, samples=n)


def check(records: Sequence[Any], policy: Policy, meta: Mapping[str, Any] | None = None) -> Verdict:
    """Judge every (defense, attack) of the records (giaudit.results.AuditRecord) against the rules that apply.

    Worst-case rules (a metric that resolves to ``<metric>_worst``, e.g. ``psnr_db.max``) hold per image: the
    most leaked image of all the group's records decides. Rules on means and rates (``psnr_db_mean``,
    ``identity_match_rate``, ``label_accuracy``) are judged on the aggregate over all the group's images,
    or on its interval's bound when the policy sets ``confidence``. Derived metrics (``rero_bound``,
    ``empirical_mu``) are computed per group; `meta` (the run folder's metadata) adds the reconstruction
    criterion, whose baseline comes from the client pool.
    """
    results: list[RuleResult] = []
    covered = policy.covered
    every = list(records)
    uncovered = list(dict.fromkeys(f"{r.defense} / {r.attack} (class {_letter(r)}, {a_server(_active(r))})"
                                   for r in every if _letter(r) not in covered))
    in_scope = [r for r in every if _letter(r) in covered]
    blocked = [r for r in in_scope if getattr(r, "blocked", None)]
    records = [r for r in in_scope if not getattr(r, "blocked", None)]
    available = sorted({k for r in records for k in r.metrics})
    seen: set[Rule] = set()
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for record in records:
        groups.setdefault((str(record.defense), str(record.attack), "tuned" if getattr(record, "tuning", None)
                           else ""), []).append(record)
    # A tuned attack is judged at its defaults too, on the same audited clients (its records' companion).
    for view in untuned_views(r for r in records if isinstance(r, AuditRecord)):
        if _letter(view) in covered:
            groups.setdefault((str(view.defense), str(view.attack), UNTUNED), []).append(view)
    stopped: dict[tuple[str, str], list[Any]] = {}
    for record in blocked:
        pair = (str(record.defense), str(record.attack))
        if pair not in groups:
            stopped.setdefault(pair, []).append(record)
    for (defense, attack), group in stopped.items():  # every record blocked: nothing was sent
        results.append(RuleResult("*", "all", "max", math.nan, None, True, group[0].record_id, None,
                                  f"{BLOCKED}: {group[0].blocked} (nothing was sent in {len(group)} record"
                                  f"{'s' if len(group) != 1 else ''})", defense, attack, samples=len(group),
                                  active=True, sok_class=_letter(group[0])))
    tuned: dict[tuple[str, str], list[Any]] = {}
    for (defense, attack, variant), group in groups.items():
        if variant == "tuned":
            tuned[(defense, attack)] = group
    context: BoundsContext | None = None
    for (defense, attack, variant), group in groups.items():
        options = tuned_options(tuned[(defense, attack)]) if variant else ""
        chosen: dict[tuple[str, str], Rule] = {}
        for rule in policy.rules:
            if not _applies(rule, group[0]):
                continue
            k = (rule.metric, rule.op)
            if k not in chosen or _specificity(rule.scope) >= _specificity(chosen[k].scope):
                chosen[k] = rule
        for rule in chosen.values():
            seen.add(rule)
            base: dict[str, Any] = dict(metric=rule.metric, scope=rule.scope, op=rule.op, threshold=rule.threshold,
                                        defense=defense, attack=attack, active=_active(group[0]),
                                        sok_class=_letter(group[0]), variant=variant,
                                        tuned_options=options)
            if is_derived(rule.metric):
                if context is None:  # rebuilt once, only when a rule needs it (it may load the client pool)
                    context = bounds_context(meta) if meta is not None else BoundsContext()
                results.append(_judge_derived(group, rule, base, policy.confidence, context))
                continue
            keys = [resolve_metric(r.metrics, rule.metric) for r in group]
            if not any(resolve_metric(r.metrics, rule.metric) for r in records):
                continue  # reported once below
            missing = [r for r, key in zip(group, keys) if key is None]
            if missing:
                skip = rule.missing == "skip"
                results.append(RuleResult(**base, measured=None, passed=skip, record_id=missing[0].record_id,
                                          key=None, samples=len(missing),
                                          message=("skipped: " if skip else "") + f"{rule.metric} not measured"
                                          + (f" in {len(missing)} of {len(group)} records" if len(group) > 1
                                             else "")))
                continue
            key = next(k for k in keys if k is not None)
            if key.endswith("_worst"):
                results.append(_judge_worst(group, rule, key, {**base, "key": key}))
            else:
                results.append(_judge_aggregate(group, rule, key, {**base, "key": key}, policy.confidence))
    for rule in policy.rules:
        if is_derived(rule.metric):
            if rule not in seen:
                results.append(RuleResult(rule.metric, rule.scope, rule.op, rule.threshold, None, True, None, None,
                                          "skipped: no record in this scope"))
        elif not any(resolve_metric(r.metrics, rule.metric) for r in records):
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
    if not every:
        results.append(RuleResult("*", "all", "max", math.nan, None, False, None, None, "the results hold no record"))
    elif not in_scope:
        results.append(RuleResult("*", "all", "max", math.nan, None, False, None, None,
                                  f"no record of the classes the policy covers ({policy.threat_classes})"))
    unjudged = tuple(sorted({_letter(r) for r in every if _letter(r) not in covered}))
    return Verdict(all(r.passed for r in results), results, policy.source, policy.threat_classes, tuple(uncovered),
                   unjudged)


def _letter(record: Any) -> str:
    """The SoK letter of a record's attack (records without one: class A, the least the server knows)."""
    return str((record.threat or {}).get("sok_class") or "A")[:1]


def _active(record: Any) -> bool:
    return bool((record.threat or {}).get("active"))


__all__ = ["Policy", "Rule", "RuleResult", "Verdict", "check", "is_derived", "is_rate", "load_policy", "parse_policy",
           "resolve_metric"]
