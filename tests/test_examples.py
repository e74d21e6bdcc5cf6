"""Every file in examples/ runs from a fresh clone as written (tiny budgets here), points nowhere outside it,
and says at its top what it should show and with which figure (benchmarks/examples.py measures it)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from giaudit.config import load_config
from giaudit.demo import policy_path
from giaudit.metrics.faces import backend_status
from giaudit.orchestration import run_audit
from giaudit.policy import check, load_policy
from giaudit.report import render

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(f for f in (REPO / "examples").iterdir() if f.is_file())


def test_examples_point_nowhere_outside_the_repo() -> None:
    # Subfolders too (examples/flower/: an app whose audit needs its capture, so it is not run below).
    for f in sorted(p for p in (REPO / "examples").rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        text = f.read_text()
        assert "../" not in text and "shared/data" not in text, f"{f.name} points outside the repository"


def _benchmark():
    """benchmarks/examples.py, the script that runs each example at its real budget and prints its figure."""
    spec = importlib.util.spec_from_file_location("examples_benchmark", REPO / "benchmarks" / "examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = [f for f in sorted((REPO / "examples").rglob("*.toml")) if f.name != "policy.toml"]


@pytest.mark.parametrize("example", CONFIGS, ids=lambda f: f.name)
def test_example_states_what_it_shows_and_the_benchmark_runs_it(example: Path) -> None:
    head = "\n".join(re.match(r"(?:#[^\n]*\n)*", example.read_text()).group(0).splitlines())  # the top comment
    assert re.search(r"^# Shows: \S", head, re.M), f"{example.name}: the top comment has no 'Shows:' line"
    assert "benchmarks/examples.py" in head, f"{example.name}: the top comment does not say where the figure comes from"
    stem = example.stem if example.parent.name == "examples" else {"audit": "flower", "audit_bn": "flower_bn"}[
        example.stem]
    assert stem in _benchmark().names()


def test_demo_policy_is_the_example_policy() -> None:
    assert policy_path().read_text() == (REPO / "examples" / "policy.toml").read_text()
    load_policy(REPO / "examples" / "policy.toml")


TINY = 3  # iterations per attack: the budget must bound every phase of every attack
SCREEN = 2  # GIDM's screened latent starts (each one DDIM sample), at most this many


@pytest.mark.parametrize("example", [f for f in EXAMPLES if f.suffix == ".toml" and f.name != "policy.toml"],
                         ids=lambda f: f.name)
def test_example_runs_with_a_tiny_budget(example: Path, tmp_path: Path) -> None:
    spec = load_config(example)
    tiny = {name: {**attack.table, "iterations": TINY, "restarts": 1,
                   **({"screen": min(SCREEN, attack.table["screen"])} if "screen" in attack.table else {})}
            for name, attack in spec.attacks.items()}
    spec = spec.replace(seeds=list(spec.seeds)[:1], attacks=tiny)
    store = run_audit(spec, tmp_path / "run", show_progress=False)
    assert sorted(r.attack for r in store.records) == sorted(tiny)  # one record per attack
    for r in store.records:
        assert 1 <= r.timings["iterations"] <= TINY and len(r.trace["losses"]) <= TINY, (r.attack, r.timings)
        assert r.metrics["psnr_db_mean"] == r.metrics["psnr_db_mean"], r.attack  # scored: not NaN
    # The benchmark's headline figure, one line per (defense, attack), from the same records.
    lines = _benchmark().headline(list(store.records))
    assert len(lines) == len({(r.defense, r.attack) for r in store.records}) and all("PSNR mean" in x for x in lines)
    verdict = check(store.records, load_policy(spec.output.policy)) if spec.output.policy else None
    html, md = render(store, tmp_path / "run", verdict=verdict)
    assert "What the server could learn" in html.read_text()
    if spec.output.semantic:
        missing = backend_status(spec.output.semantic)
        for r in store.records:
            notes = [n for n in r.notes if "semantic metrics unavailable" in n]
            if missing is None:  # the backend is installed: the semantic metrics are there, no excuse
                assert {"identity_match_rate", "reid_rank1"} & set(r.metrics), sorted(r.metrics)
                assert not notes
            else:  # not installed: the record says why, and the image metrics still ran
                assert notes and missing in notes[0] and "psnr_db_mean" in r.metrics
