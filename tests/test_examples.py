"""Every file in examples/ runs from a fresh clone as written (tiny budgets here), and points nowhere outside it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from giaudit.config import load_config
from giaudit.demo import policy_path
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


def test_demo_policy_is_the_example_policy() -> None:
    assert policy_path().read_text() == (REPO / "examples" / "policy.toml").read_text()
    load_policy(REPO / "examples" / "policy.toml")


@pytest.mark.parametrize("example", [f for f in EXAMPLES if f.suffix == ".toml" and f.name != "policy.toml"],
                         ids=lambda f: f.name)
def test_example_runs_with_a_tiny_budget(example: Path, tmp_path: Path) -> None:
    spec = load_config(example)
    tiny = {name: {**attack.table, "iterations": 3, "restarts": 1} for name, attack in spec.attacks.items()}
    spec = spec.replace(seeds=list(spec.seeds)[:1], attacks=tiny)
    store = run_audit(spec, tmp_path / "run", show_progress=False)
    assert len(store.records) == len(tiny)
    verdict = check(store.records, load_policy(spec.output.policy)) if spec.output.policy else None
    html, md = render(store, tmp_path / "run", verdict=verdict)
    assert "What the server could learn" in html.read_text()
    if spec.output.semantic:
        assert any(re.match(r"^(reid_rank1|identity_match_rate)$", k) for k in store.records[0].metrics) or any(
            "semantic metrics unavailable" in n for n in store.records[0].notes)
