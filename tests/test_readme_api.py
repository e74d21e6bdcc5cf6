"""The README's Python API snippets run as a user pastes them, from an empty folder, and write nothing there."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_section_has_both_calls():
    code = "\n".join(_snippets())
    assert len(_snippets()) == 2 and "giaudit.audit(" in code and "attack_update(" in code


@pytest.mark.parametrize("index", range(2))
def test_readme_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippets()[index], f"README.md Python API snippet {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert out.strip(), "the snippet prints what it found"
    assert list(tmp_path.iterdir()) == [], "without out= nothing is written"
