"""Engines: the same records on local processes and on Ray, retries of a killed worker, resume after an
interrupted driver, and concurrent writers of one run folder."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from giaudit.config import load_config
from giaudit.engine import KILL_ONCE_ENV, LocalEngine, RayEngine, Shared
from giaudit.orchestration import run_audit
from giaudit.results import AuditRecord, ResultsStore, load_results
from giaudit.training import TrainingSettings
from giaudit.utility import UtilityCache, measure

REPO = Path(__file__).resolve().parents[1]

BASE = """
name = "eng"
seeds = [0, 1]
[data]
source = "digits"
size = 16
[scenario]
model = "lenet_relu"
protocol = "fedsgd"
batch_size = 1
[threat]
batch_size = true
[attacks.ig]
iterations = 20
[attacks.dlg]
iterations = 2
[output]
lpips = false
"""
DEFENSES = {"none": "", "noise": '\n[[defenses]]\nname = "noise"\nsigma = 0.01\n'}


def _spec(tmp_path: Path, defense: str, seeds: str = "[0, 1]"):
    p = tmp_path / f"{defense}.toml"
    p.write_text(BASE.replace("seeds = [0, 1]", f"seeds = {seeds}") + DEFENSES[defense])
    return load_config(p)


def _same(a: list[AuditRecord], b: list[AuditRecord]) -> None:
    assert [r.record_id for r in a] == [r.record_id for r in b]
    for ra, rb in zip(a, b):
        assert ra.config_hash == rb.config_hash and ra.label_source == rb.label_source
        assert set(ra.metrics) == set(rb.metrics)
        for k, v in ra.metrics.items():
            assert rb.metrics[k] == pytest.approx(v, abs=1e-6, nan_ok=True), (ra.record_id, k)


# -- local engine and the results store ------------------------------------------------------------------

def _writer(run_dir: str, worker: int, n: int) -> None:
    store = ResultsStore.open(run_dir)
    for i in range(n):
        store.add(AuditRecord(record_id=f"w{worker}-{i}", config_hash="h", scenario="s", defense="d", attack="a",
                              seed=i, threat={}, attack_params={}, label_source="idlg",
                              metrics={"psnr_db_mean": float(i)}, per_image=(), timings={}, trace={}))


def test_concurrent_writers_never_drop_each_others_records(tmp_path):
    """Four processes add records to one run folder at once: the folder ends up with all of them, and results.json
    too once it is rewritten."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = {r.record_id for r in load_results(tmp_path).records}
    assert ids == {f"w{w}-{i}" for w in range(4) for i in range(6)}
    ResultsStore.open(tmp_path).flush()  # folds every process's record files into results.json
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())
    assert {r["record_id"] for r in json.loads((tmp_path / "results.json").read_text())["records"]} == ids


def _square(x: int) -> int:
    return x * x


def _shared_sum(handle) -> float:
    return float(handle.get()["state"].sum())


def test_local_engine_resubmits_the_tasks_of_a_killed_worker(tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ONCE_ENV, str(tmp_path))
    out = dict(LocalEngine(2).map(_square, list(range(6)), show_progress=False))
    assert out == {i: i * i for i in range(6)}
    assert (tmp_path / "killed").is_file()  # a worker really died, and its task ran again


def test_local_processes_give_the_records_of_the_serial_run(tmp_path):
    spec = _spec(tmp_path, "noise", seeds="[0]")
    serial = run_audit(spec, tmp_path / "serial", show_progress=False, engine=LocalEngine(1))
    local = run_audit(spec, tmp_path / "local", show_progress=False, engine=LocalEngine(2))
    _same(serial.records, local.records)
    assert local.meta["last_run"]["engine"] == "local"


def _records(out: Path) -> dict[str, AuditRecord]:
    try:
        return {r.record_id: r for r in load_results(out).records}
    except Exception:  # noqa: BLE001 - no file yet
        return {}


def test_a_signalled_or_killed_driver_leaves_no_process_and_resume_computes_only_the_rest(tmp_path):
    """A 2-worker `giaudit audit` in a subprocess, stopped three times: SIGTERM to its process group (as a job
    scheduler sends), SIGINT to the driver alone (`kill -INT PID`), SIGKILL to the driver alone. After each no
    process of its tree is alive 10 s later; after SIGTERM / SIGINT it exits 143 / 130 naming the resume
    command, with the records of the cells that were running kept; resuming computes only the rest."""
    psutil = pytest.importorskip("psutil")
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(BASE.replace("seeds = [0, 1]", f"seeds = {list(range(8))}"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "giaudit.cli", "audit", str(cfg), "--out", str(out), "--no-progress",
           "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for sig, group, code in ((signal.SIGTERM, True, 143), (signal.SIGINT, False, 130), (signal.SIGKILL, False, -9)):
        before = len(_records(out))
        # A process started with SIGINT ignored (a background job of a non-interactive shell, as CI may be) keeps
        # it ignored: give the driver the default disposition, as an interactive shell does.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(_records(out)) <= before:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be stopped"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2
        seen = len(_records(out))
        (os.killpg if group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{sig.name}: {alive} outlived the driver"
        assert proc.returncode == code, err
        if sig != signal.SIGKILL:
            line = err.decode().strip().splitlines()[-1]
            assert line.startswith(f"giaudit: stopped by {sig.name}") and f"resume with: giaudit audit {cfg}" in line
            assert len(_records(out)) > seen  # a cell that was running when the signal came is kept
            assert f"{len(_records(out))} finished record(s)" in line
    first = _records(out)
    assert 3 <= len(first) < 16
    again = run_audit(load_config(cfg), out, show_progress=False, engine=LocalEngine(1))
    assert set(again.meta["last_run"]["computed"]) == {r.record_id for r in again.records} - set(first)
    assert len(again.records) == len({r.record_id for r in again.records}) == 16
    for rid, rec in first.items():  # untouched: same timings, so not recomputed
        assert next(r for r in again.records if r.record_id == rid).timings == rec.timings


def test_checkpoint_and_multi_client_cells_give_the_serial_records(tmp_path):
    """scenario.checkpoints and clients_per_seed: one cell per (seed, round, attack) holding every client; the
    seed's training is a task of its own; two processes give the serial run's records."""
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text(BASE.replace("seeds = [0, 1]", "seeds = [0]").replace(
        'batch_size = 1\n[threat]', 'batch_size = 1\nclients_per_seed = 2\ncheckpoints = [0, 3]\n[threat]'))
    spec = load_config(cfg)
    small = TrainingSettings(max_rounds=3, clients=2, eval_every=3, target_accuracy=None, eval_limit=50)
    serial = run_audit(spec, tmp_path / "serial", show_progress=False, training=small, engine=LocalEngine(1))
    local = run_audit(spec, tmp_path / "local", show_progress=False, training=small, engine=LocalEngine(2))
    _same(serial.records, local.records)
    assert [r.record_id for r in local.records] == [f"eng__none__{a}__s0__r{r}" for r in (0, 3) for a in ("ig", "dlg")]
    assert all(r.trace["clients"] == 2 and {p["client"] for p in r.per_image} == {0, 1} for r in local.records)
    assert {r.training["round"] for r in local.records} == {0, 3}
    assert all(r.training["held_out_accuracy"] is not None for r in local.records)


def test_utility_trainings_are_engine_tasks_and_only_the_driver_writes_the_cache(tmp_path):
    """The baseline's first seed fixes R, then the other trainings run on the engine together: the same numbers
    as in one process, cached once by the driver, and read back on the next call."""
    spec = _spec(tmp_path, "none")
    small = TrainingSettings(max_rounds=4, clients=2, eval_every=2, target_accuracy=None, eval_limit=50)
    defenses = [("none", []), ("noise", [{"name": "noise", "sigma": 0.5}])]
    serial = measure(spec, [0, 1], defenses, small, UtilityCache(tmp_path / "a", use_user_cache=False),
                     LocalEngine(1))
    cache = UtilityCache(tmp_path / "b", use_user_cache=False)
    local = measure(spec, [0, 1], defenses, small, cache, LocalEngine(2))
    assert serial[0] == local[0] == 4
    for label, _tables in defenses:
        assert [u["accuracy"] for u in serial[2][label]] == [u["accuracy"] for u in local[2][label]]
    assert len(list((tmp_path / "b" / "_utility").glob("*.json"))) == 4  # 2 baseline + 2 noise runs
    again = measure(spec, [0, 1], defenses, small, cache, LocalEngine(2))
    assert all(u["cached"] for us in again[2].values() for u in us)


# -- Ray -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    """A two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), one CPU each: a sweep's tasks must
    reach both nodes."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'giaudit[ray]'")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default; no GPU here either way
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    try:
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
        # The cluster wrote its address where a later plain ray.init() looks first (and would wait on a dead one).
        if address_file.is_file() and address_file.read_text().strip() == cluster.address:
            address_file.unlink()


@pytest.mark.xdist_group("ray")  # one worker runs every test that starts Ray (it takes both cores)
def test_ray_sweep_gives_the_records_of_the_local_engine(tmp_path, ray_local):
    """2 defenses x 2 attacks x 2 seeds on a two-node cluster: identical ids, metrics to 1e-6, and both nodes ran
    cells; then a killed worker is retried. The local side runs serially in this process (two local processes
    give the serial records: tested above)."""
    engine = RayEngine()
    for defense in DEFENSES:
        spec = _spec(tmp_path, defense)
        local = run_audit(spec, tmp_path / f"local-{defense}", show_progress=False, engine=LocalEngine(1))
        on_ray = run_audit(spec, tmp_path / f"ray-{defense}", show_progress=False, engine=engine)
        assert on_ray.meta["last_run"]["engine"] == "ray" and len(on_ray.meta["last_run"]["computed"]) == 4
        _same(local.records, on_ray.records)
        assert json.loads((tmp_path / f"ray-{defense}" / "results.json").read_text())["records"]
        assert all((tmp_path / f"ray-{defense}" / r.images_file).is_file() for r in on_ray.records if r.images_file)
    assert len(engine.nodes) == 2 and sum(engine.nodes.values()) == 8, engine.nodes

    # An object many tasks read goes into the object store once; every task (on either node) reads it.
    handle = engine.share({"state": torch.arange(6.0)})
    assert handle.ref is not None
    read = dict(engine.map(Shared.get, [handle] * 4, show_progress=False))  # a giaudit function: Ray imports it
    assert sorted(read) == [0, 1, 2, 3] and all(torch.equal(v["state"], torch.arange(6.0)) for v in read.values())

    # A task whose worker process dies on its first attempt is retried; nothing is lost.
    marker = tmp_path / "kill"
    marker.mkdir()
    spec = _spec(tmp_path, "noise")
    killed = run_audit(spec, tmp_path / "ray-killed", show_progress=False,
                       engine=RayEngine(runtime_env={"env_vars": {KILL_ONCE_ENV: str(marker)}}))
    assert (marker / "killed").is_file()
    _same(load_results(tmp_path / "local-noise").records, killed.records)


def test_records_added_between_rewrites_survive_a_stopped_driver(tmp_path):
    """A record is on disk as soon as it is added, though results.json is rewritten only now and then: a driver
    stopped between two rewrites loses none, and the next open (a resume, a report) reads them all."""
    _writer(str(tmp_path), 0, 5)  # the first add rewrites results.json, the next four are record files only
    on_disk = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["record_id"] for r in on_disk] == ["w0-0"]
    again = ResultsStore.open(tmp_path)
    assert [r.record_id for r in again.records] == [f"w0-{i}" for i in range(5)] and again.unfolded()
    again.add(AuditRecord(record_id="w0-2", config_hash="h2", scenario="s", defense="d", attack="a", seed=2,
                          threat={}, attack_params={}, label_source="idlg", metrics={}, per_image=(), timings={},
                          trace={}))  # a cell computed again replaces its record
    again.flush()
    final = load_results(tmp_path)
    assert [r.record_id for r in final.records] == ["w0-0", "w0-1", "w0-3", "w0-4", "w0-2"]
    assert final.records[-1].config_hash == "h2" and not final.unfolded()


def test_local_engine_shares_an_object_with_its_forked_workers():
    engine = LocalEngine(2)
    with engine:
        handle = engine.share({"state": torch.arange(6.0)})
        assert dict(engine.map(_shared_sum, [handle] * 3, show_progress=False)) == {i: 15.0 for i in range(3)}
    with pytest.raises(KeyError):  # released with the engine's with block
        handle.get()
