"""Soak: a sweep of tiny cells on the local engine, disturbed, gives the records of an undisturbed run.

200 cells (100 seeds x IG and DLG on 16 px digits, LeNet-ReLU; IG `--iterations`, default 60) run twice
through the real CLI with two workers: once undisturbed, once while a random worker is SIGKILLed every
`--kill-every` seconds and the driver itself is SIGKILLed twice (after a third and two thirds of the records),
each time resumed with the same command. The disturbed run must end with every record once, each with the
metrics of the undisturbed run (the cells are seeded, so exactly equal), and no process left behind.

    python benchmarks/soak.py [--seeds 100] [--kill-every 20] [--workers 2] [--out /tmp/giaudit-soak]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
name = "soak"
seeds = {seeds}
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
iterations = {iterations}
[attacks.dlg]
iterations = 2
[output]
lpips = false
"""


def records(run: Path) -> list[dict]:
    try:
        return json.loads((run / "results.json").read_text())["records"]
    except (OSError, ValueError, KeyError):
        return []


def command(cfg: Path, run: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "giaudit.cli", "audit", str(cfg), "--out", str(run), "--no-progress",
            "--workers", str(workers)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/giaudit-soak"))
    ap.add_argument("--iterations", type=int, default=60, help="IG iterations per cell (the cells' cost)")
    ap.add_argument("--rng", type=int, default=0)
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    cfg = a.out / "soak.toml"
    cfg.write_text(CONFIG.format(seeds=list(range(a.seeds)), iterations=a.iterations))
    total = 2 * a.seeds
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "env": env}

    t0 = time.time()
    ref = subprocess.run(command(cfg, a.out / "undisturbed", a.workers), **quiet)
    undisturbed_s = time.time() - t0
    assert ref.returncode == 0, ref.stderr.decode()

    rng = random.Random(a.rng)
    run = a.out / "disturbed"
    driver_kills, exits, leftovers = 0, [], 0
    current: list[subprocess.Popen] = []
    kills: list[int] = []
    done = threading.Event()

    def killer() -> None:
        """Every `kill_every` seconds of the disturbed run (across its drivers), SIGKILL a random worker."""
        while not done.wait(a.kill_every):
            try:
                kids = psutil.Process(current[-1].pid).children() if current else []
            except psutil.NoSuchProcess:
                continue
            if kids:
                victim = rng.choice(kids)
                victim.kill()
                kills.append(victim.pid)

    thread = threading.Thread(target=killer, daemon=True)
    t0 = time.time()
    thread.start()
    for stop_at in (total // 3, 2 * total // 3, None):
        proc = subprocess.Popen(command(cfg, run, a.workers), **quiet)
        current.append(proc)
        tree: list[psutil.Process] = []
        while proc.poll() is None:
            if stop_at is not None and len(records(run)) >= stop_at:
                tree = psutil.Process(proc.pid).children(recursive=True)
                proc.kill()
                driver_kills += 1
                break
            time.sleep(0.1)
        proc.wait()
        exits.append(proc.returncode)
        _gone, alive = psutil.wait_procs(tree, timeout=10)
        leftovers += len(alive)
        if proc.returncode not in (0, -signal.SIGKILL):
            print(f"driver exit {proc.returncode}: {proc.stderr.read().decode().strip() if proc.stderr else ''}")
    disturbed_s = time.time() - t0
    done.set()
    thread.join()
    worker_kills = len(kills)

    want = {r["record_id"]: r for r in records(a.out / "undisturbed")}
    got = records(run)
    ids = [r["record_id"] for r in got]
    duplicated = len(ids) - len(set(ids))
    differing = sorted(r["record_id"] for r in got if r["record_id"] in want
                       and (r["metrics"] != want[r["record_id"]]["metrics"]
                            or r["config_hash"] != want[r["record_id"]]["config_hash"]))
    missing = sorted(set(want) - set(ids))
    print(f"cells {total}; undisturbed {undisturbed_s:.0f} s; disturbed {disturbed_s:.0f} s with {worker_kills} "
          f"worker(s) and {driver_kills} driver(s) SIGKILLed (exits {exits}), processes left after 10 s: "
          f"{leftovers}")
    print(f"records: {len(got)} ({duplicated} duplicated, {len(missing)} missing, {len(differing)} with other "
          f"metrics than the undisturbed run)")
    ok = len(want) == total and not duplicated and not missing and not differing and not leftovers
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
