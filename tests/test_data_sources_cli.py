"""Every data source end to end through the CLI with a tiny budget, and every module importable alone.

The folder source runs with both label parsers on images the test writes itself (issue 8: a
folder audit from a config used to crash).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from giaudit.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = """
name = "src"
seeds = [0]
[data]
{data}
size = 16
[scenario]
model = "lenet_relu"
[attacks.ig]
iterations = 3
[output]
lpips = false
"""


def _write_images(folder: Path, names: list[str], rng: np.random.Generator) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def _subfolder_data(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    _write_images(tmp_path / "people", [f"s{p}/{i}.png" for p in (1, 2, 10) for i in range(6)], rng)
    return 'source = "folder"\npath = "people"\nlabel_parser = "subfolder"\npool_every = 1'


def _utkface_data(tmp_path: Path) -> str:
    rng = np.random.default_rng(1)
    names = [f"{20 + i}_{i % 2}_{i % 5}_2017010{i % 9}.jpg.chip.jpg" for i in range(12)]
    _write_images(tmp_path / "utk", names, rng)
    return 'source = "folder"\npath = "utk"\nlabel_parser = "utkface"\nlabel_field = "race"\npool_every = 1'


SOURCES = {
    "mnist5k": lambda _: 'source = "mnist5k"',
    "digits": lambda _: 'source = "digits"',
    "lfw_subset": lambda _: 'source = "lfw_subset"',
    "folder_subfolder": _subfolder_data,
    "folder_utkface": _utkface_data,
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_data_source_audits_from_a_config(name, tmp_path, capsys):
    cfg = tmp_path / "audit.toml"
    cfg.write_text(TINY.format(data=SOURCES[name](tmp_path)))
    out = tmp_path / "run"
    assert main(["audit", str(cfg), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    payload = json.loads((out / "results.json").read_text())
    (record,) = payload["records"]
    assert record["attack"] == "ig" and np.isfinite(record["metrics"]["psnr_db_mean"])
    assert (out / "report.html").is_file()


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO / "giaudit").rglob("*.py"))


# One child per module, forked from an interpreter that has loaded torch and nothing of giaudit: each module
# is imported with no other giaudit module loaded before it, so an import cycle hidden by import order shows up,
# without paying torch's start-up once per module (86 fresh interpreters took 6 minutes of the suite).
_FORK_IMPORTS = r"""
import importlib, json, os, sys
# Third-party packages giaudit imports at module level, loaded once here: giaudit's own modules are what is tested.
import jinja2, markupsafe, numpy, pandas, safetensors.torch, scipy.optimize, scipy.stats, torch, tqdm.auto  # noqa: E401,F401
import concurrent.futures.process, multiprocessing.connection, html, shlex, tomllib  # noqa: E401,F401
assert not [m for m in sys.modules if m.split(".")[0] == "giaudit"], "giaudit loaded before the fork"
failures, running = {}, {}
width = max(1, len(os.sched_getaffinity(0)))  # one child per core at a time


def reap():
    pid, status = os.wait()
    mod, r = running.pop(pid)
    with os.fdopen(r) as f:
        msg = f.read()
    if status:
        failures[mod] = msg or f"exit status {status}"


for mod in sys.argv[1:]:
    while len(running) >= width:
        reap()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code, msg = 0, ""
        try:
            importlib.import_module(mod)
        except BaseException as e:
            code, msg = 1, f"{type(e).__name__}: {e}"[:2000]
        os.write(w, msg.encode())
        os._exit(code)
    os.close(w)
    running[pid] = (mod, r)
while running:
    reap()
print(json.dumps(failures))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, *_modules()], capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, failures
