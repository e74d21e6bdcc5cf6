"""`giaudit weights fetch` and `giaudit doctor`, against a local HTTP server on 127.0.0.1 (no outside network).

The served "AlexNet" is a checkpoint the test makes (AlexNet's feature shapes, random values); its hash
is pinned through `--sha256`, the override a private mirror would use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import torch

from giaudit import doctor, weights
from giaudit.cli import main
from giaudit.config import OutputSection
from giaudit.errors import ConfigError
from giaudit.metrics.faces.deepface_backend import FETCH_NAMES, fetch_hint
from giaudit.metrics.lpips import ALEXNET_FILE, _alexnet_features, checkpoints_dir, load_lpips
from giaudit.weights import FetchError, WeightFile

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def alexnet_bytes() -> bytes:
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """Serves ``files`` (name -> bytes). ``cut`` names are cut midway on their first ``cut_times`` requests;
    ``ranges`` False makes the server ignore Range headers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # http.server calls it by this name
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and server.ranges:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut.get(name, 0) > 0:
                    server.cut[name] -= 1
                    self.wfile.write(body[: len(body) // 2])   # then close: the client sees a short body
                    self.wfile.flush()
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with _Server() as srv:
        yield srv


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Fresh TORCH_HOME and DEEPFACE_HOME under tmp_path; never the real home."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "deepface"))
    return tmp_path


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- fetch
def test_fetch_lands_where_lpips_reads_and_lpips_then_works(homes, server, alexnet_bytes, capsys):
    server.files[ALEXNET_FILE] = alexnet_bytes
    before = load_lpips()
    assert not before.available and "giaudit weights fetch lpips-alexnet" in before.reason

    rc = main(["weights", "fetch", "lpips-alexnet", "--from", server.url, "--sha256", _sha(alexnet_bytes)])
    assert rc == 0
    assert "sha256 verified" in capsys.readouterr().out
    folder = checkpoints_dir()
    assert folder == homes / "torch" / "hub" / "checkpoints"
    assert _files(folder) == [ALEXNET_FILE]            # no .part left behind
    assert (folder / ALEXNET_FILE).read_bytes() == alexnet_bytes

    metric = load_lpips()
    assert metric.available
    a, b = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).unbind(0)
    d = metric(a[None], b[None])
    assert d.shape == (1,) and float(d[0]) > 0 and float(metric(a[None], a[None].clone())[0]) < 1e-6

    # Fetching again finds the verified file and leaves it alone (no request).
    n = len(server.requests)
    assert main(["weights", "fetch", "lpips-alexnet", "--from", server.url, "--sha256", _sha(alexnet_bytes)]) == 0
    assert "already present" in capsys.readouterr().out and len(server.requests) == n


def test_corrupted_file_is_rejected_naming_both_hashes_and_leaves_nothing(homes, server, alexnet_bytes, capsys):
    bad = bytearray(alexnet_bytes)
    bad[1000] ^= 0xFF
    server.files[ALEXNET_FILE] = bytes(bad)
    want = _sha(alexnet_bytes)
    rc = main(["weights", "fetch", "lpips-alexnet", "--from", server.url, "--sha256", want])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("giaudit: error: ")
    assert f"expected {want}" in err[-1] and f"got {_sha(bytes(bad))}" in err[-1]
    assert _files(checkpoints_dir()) == []
    assert not load_lpips().available


def test_pinned_registry_hash_rejects_a_file_that_is_not_torchvisions(homes, tmp_path, alexnet_bytes):
    src = tmp_path / "src"
    src.mkdir()
    (src / ALEXNET_FILE).write_bytes(alexnet_bytes)
    with pytest.raises(FetchError, match=f"expected {weights.LPIPS_ALEXNET.sha256}, got {_sha(alexnet_bytes)}"):
        weights.fetch(weights.LPIPS_ALEXNET, source=src)
    assert _files(checkpoints_dir()) == []


def test_interrupted_transfer_resumes_with_range(homes, server, alexnet_bytes):
    server.files[ALEXNET_FILE] = alexnet_bytes
    server.cut[ALEXNET_FILE] = 1
    log: list[str] = []
    res = weights.fetch(weights.LPIPS_ALEXNET, source=server.url, sha256=_sha(alexnet_bytes), log=log.append)
    assert res.action == "fetched" and res.path.read_bytes() == alexnet_bytes
    half = len(alexnet_bytes) // 2
    assert server.requests == [(ALEXNET_FILE, None), (ALEXNET_FILE, f"bytes={half}-")]
    assert any("interrupted" in m for m in log) and any(f"resuming {ALEXNET_FILE}.part at {half}" in m for m in log)
    assert _files(checkpoints_dir()) == [ALEXNET_FILE]


def test_partial_file_survives_a_failed_run_and_the_next_run_resumes(homes, server, alexnet_bytes, monkeypatch):
    monkeypatch.setattr(weights, "RETRIES", 2)
    server.files[ALEXNET_FILE] = alexnet_bytes
    server.cut[ALEXNET_FILE] = 2                      # both attempts of the first run are cut
    want = _sha(alexnet_bytes)
    with pytest.raises(FetchError, match="run the same command again to resume"):
        weights.fetch(weights.LPIPS_ALEXNET, source=server.url, sha256=want)
    part = checkpoints_dir() / f"{ALEXNET_FILE}.part"
    assert _files(checkpoints_dir()) == [part.name]    # never under the final name
    have = part.stat().st_size
    assert 0 < have < len(alexnet_bytes)
    assert not load_lpips().available

    res = weights.fetch(weights.LPIPS_ALEXNET, source=server.url, sha256=want)
    assert res.path.read_bytes() == alexnet_bytes
    assert server.requests[-1] == (ALEXNET_FILE, f"bytes={have}-")
    assert _files(checkpoints_dir()) == [ALEXNET_FILE]


def test_server_ignoring_range_restarts_cleanly(homes, server, alexnet_bytes):
    server.files[ALEXNET_FILE] = alexnet_bytes
    server.ranges = False
    part = checkpoints_dir() / f"{ALEXNET_FILE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(alexnet_bytes[:1234])
    res = weights.fetch(weights.LPIPS_ALEXNET, source=server.url, sha256=_sha(alexnet_bytes))
    assert res.path.read_bytes() == alexnet_bytes and not part.exists()


def test_missing_on_server_is_one_line_error(homes, server, capsys):
    rc = main(["weights", "fetch", "lpips-alexnet", "--from", server.url, "--sha256", "0" * 64])
    err = capsys.readouterr().err.strip().splitlines()[-1]    # progress lines come before it
    assert rc == 2 and err.startswith("giaudit: error: ") and "HTTP 404" in err
    assert _files(checkpoints_dir()) == []


def test_from_dir_works_with_no_network(homes, tmp_path, alexnet_bytes, monkeypatch, capsys):
    def no_network(self, address):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"network used: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    src = tmp_path / "usb"
    src.mkdir()
    (src / ALEXNET_FILE).write_bytes(alexnet_bytes)
    assert main(["weights", "fetch", "lpips-alexnet", "--from", str(src), "--sha256", _sha(alexnet_bytes)]) == 0
    assert (checkpoints_dir() / ALEXNET_FILE).read_bytes() == alexnet_bytes
    assert load_lpips().available

    # --dest gathers files in one folder (to carry to an air-gapped machine).
    assert main(["weights", "fetch", "lpips-alexnet", "--from", str(src), "--sha256", _sha(alexnet_bytes),
                 "--dest", str(tmp_path / "carry")]) == 0
    assert _files(tmp_path / "carry") == [ALEXNET_FILE]
    capsys.readouterr()
    assert main(["weights", "fetch", "lpips-alexnet", "--from", str(tmp_path / "nowhere")]) == 2
    assert "--from" in capsys.readouterr().err


def test_complete_part_file_is_finished_on_416(homes, server, alexnet_bytes):
    server.files[ALEXNET_FILE] = alexnet_bytes
    part = checkpoints_dir() / f"{ALEXNET_FILE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(alexnet_bytes)
    res = weights.fetch(weights.LPIPS_ALEXNET, source=server.url, sha256=_sha(alexnet_bytes))
    assert res.path.read_bytes() == alexnet_bytes and _files(part.parent) == [ALEXNET_FILE]
    assert server.requests == [(ALEXNET_FILE, f"bytes={len(alexnet_bytes)}-")]


def test_all_fetches_what_it_can_verify_and_names_what_it_skipped(homes, tmp_path, alexnet_bytes, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(weights, "LPIPS_ALEXNET", dataclasses.replace(weights.LPIPS_ALEXNET,
                                                                      sha256=_sha(alexnet_bytes)))
    src = tmp_path / "src"
    src.mkdir()
    (src / ALEXNET_FILE).write_bytes(alexnet_bytes)
    assert main(["weights", "fetch", "all", "--engine", "pytorch", "--from", str(src)]) == 0
    out = capsys.readouterr().out
    assert "lpips-alexnet: fetched" in out and "skipped deepface-age, deepface-gender" in out
    assert "--allow-unpinned" in out and load_lpips().available


def test_report_notes_name_the_fix():
    from giaudit.metrics.faces import FaceAnalysis, FaceAnalyzer, semantic_metrics

    class Detector(FaceAnalyzer):
        name = "stub"
        provides = frozenset({"detection"})

        def _analyze_frames(self, frames, want):  # type: ignore[no-untyped-def]
            return [FaceAnalysis(detected=True) for _ in frames]

    images = torch.rand(2, 1, 8, 8).numpy()
    notes = semantic_metrics(images, images, analyzer=Detector()).notes
    assert any(n.startswith("race: unavailable") and "giaudit weights fetch deepface-race" in n for n in notes)


def test_user_errors_exit_2_with_one_line(homes, capsys):
    for argv, needle in [(["weights", "fetch", "alexnet"], "unknown name 'alexnet'"),
                         (["weights", "fetch", "deepface-race", "--engine", "pytorch"], "--allow-unpinned"),
                         (["weights", "fetch", "deepface-race", "--engine", "caffe"], "--engine"),
                         (["weights", "fetch", "all", "--engine", "tf", "--sha256", "0" * 64], "exactly one"),
                         (["weights", "fetch", "lpips-alexnet", "--sha256", "xyz"], "64 hex"),
                         (["weights", "list", "--engine", "caffe"], "--engine")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, (argv, err)


def test_deepface_files_land_in_deepface_home(homes, tmp_path):
    # Unpinned (.pth) files need --allow-unpinned; the hash is reported, not checked.
    src = tmp_path / "src"
    src.mkdir()
    entry = weights.deepface_file("deepface-race", "pytorch")
    assert entry.sha256 is None and "none published" in entry.hash_source
    (src / entry.file).write_bytes(b"race weights")
    with pytest.raises(ConfigError, match="no pinned SHA-256"):
        weights.fetch(entry, source=src)
    res = weights.fetch(entry, source=src, allow_unpinned=True)
    assert res.path == homes / "deepface" / ".deepface" / "weights" / "race_model_single_batch.pth"
    assert not res.verified and res.sha256 == _sha(b"race weights")
    # tensorflow files are pinned: a wrong .h5 is refused.
    h5 = weights.deepface_file("deepface-race", "tf")
    (src / h5.file).write_bytes(b"not the release file")
    with pytest.raises(FetchError, match=f"expected {h5.sha256}"):
        weights.fetch(h5, source=src)
    assert not (res.path.parent / h5.file).exists() and not (res.path.parent / (h5.file + ".part")).exists()


def test_registry_names_agree_with_the_loaders():
    assert weights.names()[0] == "lpips-alexnet" and set(weights.names()[1:]) == set(FETCH_NAMES.values())
    for engine in ("tensorflow", "pytorch", "onnx"):
        for name in FETCH_NAMES.values():
            e = weights.deepface_file(name, engine)
            assert FETCH_NAMES[Path(e.file).stem] == name and all(u.endswith("/" + e.file) for u in e.urls)
            assert fetch_hint(e.file) == f"`giaudit weights fetch {name}`"
            assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
    a = weights.LPIPS_ALEXNET
    assert a.sha256.startswith(ALEXNET_FILE.split("-")[-1].split(".")[0])   # torchvision's name embeds the prefix
    assert isinstance(a, WeightFile) and a.urls[0].startswith("https://download.pytorch.org/")


def test_only_cli_and_doctor_reach_the_downloader():
    pattern = re.compile(r"^\s*(from giaudit\.weights|import giaudit\.weights|from giaudit import .*\bweights\b)",
                         re.MULTILINE)
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "giaudit").rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["giaudit/cli.py", "giaudit/doctor.py"]


# --------------------------------------------------------------------------- doctor
def _row(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if re.match(rf"^\*?\s+{re.escape(key)}\s", line))


def test_doctor_lists_lpips_missing_then_ready(homes, alexnet_bytes, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    row = _row(out, "lpips-alexnet")
    assert " missing " in row and "giaudit weights fetch lpips-alexnet" in row and str(checkpoints_dir()) in row
    for key in ("faces-offline", "deepface", "deepface-race", "prior:mnist32", "ray", "flower", "chromium"):
        assert re.search(r"\s(ready|missing|broken)\s", _row(out, key)), key
    assert " ready " in _row(out, "prior:mnist32")

    folder = checkpoints_dir()
    folder.mkdir(parents=True)
    (folder / ALEXNET_FILE).write_bytes(alexnet_bytes)
    assert main(["doctor", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["capabilities"]}
    assert rows["lpips-alexnet"]["status"] == "ready" and rows["lpips-alexnet"]["enable"] == ""

    (folder / ALEXNET_FILE).write_bytes(b"truncated")
    check = doctor.check_lpips()
    assert check.status == "broken" and ALEXNET_FILE in check.detail and "weights fetch" in check.enable


CONFIG = """
name = "doc"
[data]
source = "digits"
size = 8
[attacks.ig]
iterations = 1
[output]
lpips = {lpips}
"""


def test_doctor_config_exit_codes_follow_the_configs_needs(homes, tmp_path, alexnet_bytes, capsys):
    no_lpips, with_lpips = tmp_path / "no.toml", tmp_path / "yes.toml"
    no_lpips.write_text(CONFIG.format(lpips="false"))
    with_lpips.write_text(CONFIG.format(lpips="true"))
    assert main(["doctor", "--config", str(no_lpips)]) == 0
    assert "ready (needs no optional capability)" in capsys.readouterr().out
    assert main(["doctor", "--config", str(with_lpips)]) == 1
    out = capsys.readouterr().out
    assert _row(out, "lpips-alexnet").startswith("*")
    assert "NOT READY: lpips-alexnet missing (run: giaudit weights fetch lpips-alexnet)" in out

    folder = checkpoints_dir()
    folder.mkdir(parents=True)
    (folder / ALEXNET_FILE).write_bytes(alexnet_bytes)
    assert main(["doctor", "--config", str(with_lpips)]) == 0
    capsys.readouterr()

    gias = tmp_path / "gias.toml"
    gias.write_text(CONFIG.format(lpips="false").replace("[attacks.ig]", "[attacks.gias]"))
    assert main(["doctor", "--config", str(gias)]) == 0
    assert _row(capsys.readouterr().out, "prior:mnist32").startswith("*")
    assert main(["doctor", "--config", str(tmp_path / "absent.toml")]) == 2


def test_needs_follow_the_output_table():
    assert doctor.needs(OutputSection(lpips=False, semantic=False)) == []
    assert doctor.needs(OutputSection()) == ["lpips-alexnet"]
    assert doctor.needs(OutputSection(lpips=False, semantic="offline"), ["mnist32"]) == ["faces-offline",
                                                                                         "prior:mnist32"]
    deep = doctor.needs(OutputSection(lpips=False, semantic="deepface"))
    assert deep[0] == "deepface"
    assert {"deepface-race", "deepface-age", "deepface-gender", "deepface-vggface"} <= set(deep)


def test_doctor_deepface_rows_follow_deepface_home(homes, tmp_path):
    pytest.importorskip("deepface")
    rows = {r.key: r for r in doctor.check_deepface()}
    race = rows["deepface-race"]
    assert race.status == "missing" and race.enable.startswith("giaudit weights fetch deepface-race")
    assert race.where == str(homes / "deepface" / ".deepface" / "weights")
    entry = weights.deepface_file("deepface-race")
    Path(race.where).mkdir(parents=True)
    (Path(race.where) / entry.file).write_bytes(b"x")
    assert {r.key: r for r in doctor.check_deepface()}["deepface-race"].status == "ready"
