"""Bad inputs and faults through the real CLI: each case is one line ``giaudit: error: ...`` naming the flag,
key or file, exit 2, and nothing changed outside the case's own folder. The cases that compute nothing run in
one subprocess (the console's `main`, case after case) to keep CLI start-ups few."""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
name = "t"
seeds = [0]
[data]
{data}
size = 16
[scenario]
model = "lenet"
[output]
lpips = false
[attacks.ig]
iterations = 2
"""

RUNNER = """
import contextlib, io, json, sys
from giaudit.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def _png_bomb(path: Path, side: int = 30_000) -> None:
    """A valid PNG header announcing side x side grey pixels (over PIL's bomb limit), with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _cases(tmp: Path) -> list[tuple[str, list[str], str, Path | None]]:
    """(name, argv, what the error line names, the one folder the case may touch)."""
    (tmp / "afile").write_text("not a folder")
    folder = CONFIG.format(data='source = "digits"')
    (tmp / "c.toml").write_text(folder)
    utk = tmp / "utk"
    utk.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(utk / "25_0_1_a.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(utk / "-3_0_1_b.jpg")
    (tmp / "utk.toml").write_text(CONFIG.format(data=f'source = "folder"\npath = "{utk}"\nlabel_parser = "utkface"'))
    bomb = tmp / "bomb" / "a"
    bomb.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bomb / "ok.png")
    _png_bomb(bomb / "huge.png")
    (tmp / "bomb.toml").write_text(CONFIG.format(data=f'source = "folder"\npath = "{bomb.parent}"'))
    seeds = [("2^70", "[1180591620717411303424]", "seeds: every seed"), ("zero", '["zero"]', "seeds: expected")]
    for tag, value, _ in seeds:
        (tmp / f"s{tag}.toml").write_text(folder.replace("seeds = [0]", f"seeds = {value}"))
    run = tmp / "run"
    return [
        ("--out is a file", ["audit", str(tmp / "c.toml"), "--out", str(tmp / "afile")], "afile: is a file", None),
        ("--out under a file", ["audit", str(tmp / "c.toml"), "--out", str(tmp / "afile" / "x")], "afile is a file",
         None),
        ("prior --out a file", ["prior", "train", "--data", "digits", "--out", str(tmp / "afile")],
         "--out " + str(tmp / "afile"), None),
        ("weights --dest a file", ["weights", "fetch", "lpips-alexnet", "--dest", str(tmp / "afile"),
                                   "--from", str(tmp)], "--dest " + str(tmp / "afile"), None),
        ("attribute --size 0", ["attribute", "train", "--data", "digits", "--label", "label", "--out",
                                str(tmp / "attr"), "--size", "0"], "--size: must be >= 4", None),
        ("negative UTKFace age", ["audit", str(tmp / "utk.toml"), "--out", str(run)], "-3_0_1_b.jpg: UTKFace age -3",
         None),
        ("decompression bomb", ["audit", str(tmp / "bomb.toml"), "--out", str(run)], "huge.png: refused as a "
         "decompression bomb", None),
        *[(f"seed {tag}", ["audit", str(tmp / f"s{tag}.toml"), "--out", str(run)], named, None)
          for tag, _, named in seeds],
        ("check of a missing run", ["check", str(tmp / "nowhere"), "--policy", str(REPO / "examples" / "policy.toml")],
         "nowhere: no results.json", None),
    ]


def test_bad_inputs_fail_in_one_line_and_change_nothing(tmp_path):
    cases = _cases(tmp_path)
    before = _tree(tmp_path)
    argvs = [[*argv, "--no-progress"] if argv[0] == "audit" else argv for _, argv, _, _ in cases]
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (name, _argv, named, _where), (code, err) in zip(cases, results):
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("giaudit: error:"), (name, err)
        assert named in lines[0], (name, lines[0])
    assert _tree(tmp_path) == before  # no run folder, no report, no prior, no weights: nothing written


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    from giaudit.data import _read_image

    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = _read_image(tmp_path / "g16.png")
    assert img.shape == (1, 16, 16)
    assert img.min() == 0.0 and img.max() == 1.0
    assert float((img >= 1.0).float().mean()) == pytest.approx(1 / 256)  # only the brightest pixel is white
    np.testing.assert_allclose(img[0].numpy(), ramp / 65535.0, atol=1e-6)


def test_unparsed_utkface_names_are_counted_and_listed(tmp_path):
    from giaudit.data import DataWarning, load_folder

    for name in ("25_0_1_a.jpg", "31_1_2_b.jpg", "holiday.jpg", "7_x_1_c.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    with pytest.warns(DataWarning, match=r"2 file name\(s\) .* 7_x_1_c.jpg, holiday.jpg; skipped"):
        data = load_folder(tmp_path, size=8, label_parser="utkface")
    assert len(data) == 2 and data.skipped == ("7_x_1_c.jpg", "holiday.jpg")


def test_files_are_created_with_the_umask(tmp_path):
    from giaudit.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_disk_full_keeps_the_records_and_readers_count_a_repeated_cell_once(tmp_path, monkeypatch, capsys):
    """ENOSPC on the second cell's images: one line naming the file, the first record kept, resume computes only
    the rest."""
    import giaudit.orchestration.run as run
    from giaudit.cli import main
    from giaudit.results import load_results

    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(data='source = "digits"').replace("seeds = [0]", "seeds = [0, 1]"))
    out = tmp_path / "run"
    real, calls = run.atomic_write_bytes, []

    def full(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(run, "atomic_write_bytes", full)
    assert main(["audit", str(config), "--out", str(out), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "images" / "t__none__ig__s1.npz") in err, err
    assert "No space left on device" in err and "1 record(s)" in err and "run the same command again" in err
    assert [r.record_id for r in load_results(out).records] == ["t__none__ig__s0"]
    monkeypatch.setattr(run, "atomic_write_bytes", real)
    assert main(["audit", str(config), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert load_results(out).meta["last_run"]["computed"] == ["t__none__ig__s1"]

    # The same cell twice in results.json (a file edited by hand): every reader counts it once and says so.
    payload = json.loads((out / "results.json").read_text())
    payload["records"].append(payload["records"][0])
    (out / "results.json").write_text(json.dumps(payload))
    store = load_results(out)
    assert len(store.records) == 2 and store.duplicates == ("t__none__ig__s0",)
    capsys.readouterr()
    policy = tmp_path / "p.toml"
    policy.write_text("[rules]\npsnr_db.max = 1000\n")
    assert main(["check", str(out), "--policy", str(policy)]) == 0
    printed = capsys.readouterr().out
    assert "(2 records)" in printed and "1 repeated record(s) counted once: t__none__ig__s0" in printed
    from giaudit.report.render import collect

    assert any("repeated record" in note for note, _ids in collect(store).notes)
