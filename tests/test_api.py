"""`giaudit.audit()`: the audit as one Python call, writing files only when asked to."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest

import giaudit
from giaudit.api import AuditResult, audit
from giaudit.config import parse_config
from giaudit.engine import LocalEngine
from giaudit.errors import ConfigError
from giaudit.policy import Verdict

REPO = Path(__file__).resolve().parents[1]

# Two cells of a few iterations each on 16-pixel digits: a second or two on one core.
TINY = {
    "name": "api-tiny",
    "seeds": [0],
    "data": {"source": "mnist5k", "size": 16},
    "scenario": {"model": "lenet_relu", "batch_size": 1},
    "attacks": {"ig": {"iterations": 3}, "dlg": {"iterations": 3}},
    "output": {"lpips": False},
}


def _numbers(records: tuple) -> list[tuple]:
    return [(r.record_id, r.config_hash, dict(r.metrics), r.per_image, r.label_source) for r in records]


def test_audit_from_a_dict_returns_records_and_a_frame_and_writes_nothing(tmp_path, monkeypatch):
    # torch itself creates $TMPDIR/torchinductor_<user> when torch._dynamo is first imported (the first
    # optimizer a process builds imports it): import it before TMPDIR moves, so what is checked is giaudit's.
    import torch._dynamo  # noqa: F401

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert tempfile.gettempdir() == str(tmp)
    result = audit(TINY)  # the default engine: local processes
    assert isinstance(result, AuditResult)
    assert [r.attack for r in result.records] == ["ig", "dlg"]
    assert all(r.metrics["psnr_db_mean"] > 0 for r in result.records)
    assert len(result.frame) == 2 and list(result.frame.record_id) == [r.record_id for r in result.records]
    assert {"psnr_db_mean", "sok_class", "time_attack_s"} <= set(result.frame.columns)
    assert result.verdict is None and result.out is None
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert not (REPO / "reports" / "api-tiny").exists()


def test_audit_with_out_writes_the_run_folder_and_gives_the_same_records(tmp_path):
    in_memory = audit(TINY, engine=LocalEngine(1))
    out = tmp_path / "run"
    written = audit(TINY, out=out, engine=LocalEngine(1))
    assert written.out == out
    for name in ("results.json", "results.parquet", "report.html", "report.md"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(r.images_file).name for r in written.records if r.images_file)
    assert _numbers(written.records) == _numbers(in_memory.records)
    on_disk = pd.read_parquet(out / "results.parquet")
    assert list(on_disk.columns) == list(written.frame.columns)
    pd.testing.assert_frame_equal(on_disk, written.frame)
    assert list(in_memory.frame.columns) == list(written.frame.columns)


def test_audit_takes_a_path_or_a_spec_and_judges_the_policy(tmp_path):
    policy = REPO / "examples" / "policy.toml"
    config = tmp_path / "tiny.toml"
    config.write_text(f'name = "api-path"\n[data]\nsize = 16\n[attacks.dlg]\niterations = 2\n'
                      f'[output]\nlpips = false\npolicy = "{policy}"\n')
    from_path = audit(config, engine=LocalEngine(1))
    from_str = audit(str(config), engine=LocalEngine(1))
    assert isinstance(from_path.verdict, Verdict) and from_path.verdict.rules
    assert _numbers(from_path.records) == _numbers(from_str.records)
    from_spec = audit(parse_config(TINY), engine=LocalEngine(1))
    assert _numbers(from_spec.records) == _numbers(audit(TINY, engine=LocalEngine(1)).records)


def test_audit_rejects_what_is_not_a_config():
    with pytest.raises(ConfigError, match="audit: expected an AuditSpec"):
        audit(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="attacks.ig.iterations"):
        audit({**TINY, "attacks": {"ig": {"iterations": 0}}})


def test_the_package_exports_the_api_lazily():
    assert giaudit.audit is audit and giaudit.AuditResult is AuditResult
    assert {"audit", "AuditResult", "attack_update", "__version__"} == set(giaudit.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        giaudit.nothing  # noqa: B018
