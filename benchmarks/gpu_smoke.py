"""GPU smoke check: every attack, defense and metric runs a few iterations on CUDA, where it should.

CI has no GPU; this is the check to run on a machine that has one (``python benchmarks/gpu_smoke.py``). With
``[run] device = "cuda"`` it runs, each through the audit's own cell (`giaudit.orchestration.cell.run_cell`):

- every registered attack, a few iterations, on the smallest scenario it accepts (a BatchNorm ConvNet at
  32 px for the classifier attacks, an untrained DDPM UNet at 16 px for the diffusion ones);
- every registered defense on the client's step (Opacus's DP-SGD on the GPU included), with IG;
- the metrics: PSNR / SSIM / label accuracy, LPIPS when its weights are installed (``giaudit doctor``);
- a checkpoint cell, whose federated training (the utility's training loop) runs on the GPU;
- the same IG cell on the CPU, to compare.

For each cell it checks that the observation's model, the shared update and the reconstruction are on the
CUDA device, that the client's batch reached the GPU (the update is not the CPU's), that every loss and
metric is finite and that the record says ``device = cuda:N``. It prints one line per cell and exits 1 on
the first failure, 2 when this machine has no CUDA device, 0 when everything passed.

    python benchmarks/gpu_smoke.py [--device cuda:1] [--dtype float64]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch

from giaudit.attacks import ATTACKS
from giaudit.config import parse_config
from giaudit.defenses import DEFENSES
from giaudit.device import resolve
from giaudit.orchestration import cell as cell_module
from giaudit.orchestration.cell import build_defense, run_cell
from giaudit.orchestration.plan import plan_cells
from giaudit.orchestration.record import CellOutcome
from giaudit.training import TrainingSettings

CLASSIFIER: dict[str, Any] = {
    "data": {"source": "mnist5k", "size": 32},
    "scenario": {"model": "convnet", "width": 8, "batch_size": 2},
    "threat": {"surrogate_data": True},
    "output": {"lpips": True},
}
DIFFUSION: dict[str, Any] = {
    "data": {"source": "digits", "size": 16},
    "scenario": {"model": "ddpm_unet", "width": 32},
    "threat": {"diffusion_noise": True},
    "output": {"lpips": True},
}
ATTACK_TABLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ig": (CLASSIFIER, {"iterations": 5}),
    "dlg": (CLASSIFIER, {"iterations": 3, "max_eval": 3}),
    "gias": (CLASSIFIER, {"iterations": 6}),
    "gias_z": (CLASSIFIER, {"iterations": 5}),
    "giml": (CLASSIFIER, {"iterations": 4, "meta_observations": 2, "meta_steps": 1, "tasks_per_step": 2,
                          "inner_z_steps": 2, "inner_theta_steps": 1}),
    "ggl": (CLASSIFIER, {"iterations": 3, "population": 4}),
    "diffula": (CLASSIFIER, {"iterations": 3, "denoise_steps": 2}),
    "gidm": (DIFFUSION, {"iterations": 4, "sampler_steps": 2}),
    "gidm_plus": (DIFFUSION, {"iterations": 4, "sampler_steps": 2, "t_grid": 2}),
    # A malicious server (SoK classes F-H): the server step and the second round run on the device too.
    "imprint": ({**CLASSIFIER, "threat": {"surrogate_data": True, "modifies_model": True}}, {"bins": 16}),
    "trap_weights": ({**CLASSIFIER, "threat": {"modifies_model": True}}, {"neurons": 32}),
    "fishing": ({**CLASSIFIER, "threat": {"modifies_model": True}}, {"iterations": 3}),
    "differencing": ({**CLASSIFIER, "threat": {"selects_clients": True},
                      "defenses": [{"name": "secure_agg", "clients": 2}]}, {"iterations": 3}),
}
DEFENSE_TABLES: dict[str, dict[str, Any]] = {
    "noise": {"name": "noise", "sigma": 0.01},
    "clip": {"name": "clip", "max_norm": 1.0},
    "dpsgd": {"name": "dpsgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0, "convert_batchnorm": True},
    "sparsify": {"name": "sparsify", "sparsity": 0.5},
    "quantize": {"name": "quantize", "bits": 4, "stochastic": True},
    "label_disguise": {"name": "label_disguise", "mix": 0.5},
    "large_batch": {"name": "large_batch", "batch_size": 4},
    "secure_agg": {"name": "secure_agg", "clients": 4},
    "model_validation": {"name": "model_validation"},
}


class SmokeFailure(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SmokeFailure(what)


ORIGINAL = cell_module.cell_record


def _inspect(device: torch.device, seen: dict[str, Any]) -> Any:
    """A stand-in for the cell's `cell_record` that checks where the cell's tensors are, then scores it."""
    original = ORIGINAL

    def spy(outcome: CellOutcome) -> Any:
        for obs in outcome.observations:
            _check(next(obs.model.parameters()).device == device, f"observation model on "
                   f"{next(obs.model.parameters()).device}")
            _check(all(t.device == device for t in obs.update.tensors), "shared update not on the device")
            _check(all(bool(torch.isfinite(t).all()) for t in obs.update.tensors), "shared update not finite")
        for rec in outcome.reconstructions:
            _check(rec.images.device == device, f"reconstruction on {rec.images.device}")
            _check(bool(torch.isfinite(rec.images).all()), "reconstruction not finite")
        seen["update"] = [t.detach().cpu() for t in outcome.observations[0].update.tensors]
        return original(outcome)

    return spy


def run_one(label: str, config: dict[str, Any], device: torch.device, dtype: str) -> dict[str, Any]:
    spec = parse_config({"name": "gpu-smoke", "seeds": [0], **config, "run": {"device": str(device), "dtype": dtype}})
    training = TrainingSettings(clients=2, eval_every=1, eval_limit=64)
    cell = plan_cells(spec, build_defense(spec)[0], training)[0]
    seen: dict[str, Any] = {}
    cell_module.cell_record = _inspect(device, seen)
    try:
        t0 = time.perf_counter()
        record = run_cell(cell).record
        wall = time.perf_counter() - t0
    finally:
        cell_module.cell_record = ORIGINAL
    _check(record.runtime.get("device") == str(device), f"record says device {record.runtime.get('device')}")
    _check(all(math.isfinite(v) for v in record.trace["losses"]), "a loss is not finite")
    numbers = {k: v for k, v in record.metrics.items() if isinstance(v, float)}
    _check(all(math.isfinite(v) for v in numbers.values()), f"a metric is not finite: {numbers}")
    lpips = "lpips_mean" in record.metrics
    print(f"ok  {label:<24} {wall:6.1f} s  psnr {record.metrics.get('psnr_db_mean', float('nan')):6.2f} dB  "
          f"lpips {format(record.metrics['lpips_mean'], '.3f') if lpips else 'not installed'}", flush=True)
    return {"record": record, "update": seen.get("update")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu: a dry run of this script itself)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"gpu_smoke: this machine has no CUDA device (torch {torch.__version__}, "
              f"{'built without CUDA' if torch.version.cuda is None else 'CUDA ' + str(torch.version.cuda)}); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    device = resolve(args.device).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (dry run)"
    print(f"gpu_smoke on {name} ({device}), torch {torch.__version__}, {args.dtype}")
    missing = sorted(set(ATTACKS.names()) - set(ATTACK_TABLES)) + sorted(set(DEFENSES.names()) - set(DEFENSE_TABLES))
    if missing:
        print(f"gpu_smoke: no case for {', '.join(missing)}: add one", file=sys.stderr)
        return 1
    try:
        for name, (base, table) in ATTACK_TABLES.items():
            run_one(f"attack {name}", {**base, "attacks": {name: table}}, device, args.dtype)
        for name, table in DEFENSE_TABLES.items():
            run_one(f"defense {name}", {**CLASSIFIER, "defenses": [table], "attacks": {"ig": {"iterations": 3}}},
                    device, args.dtype)
        run_one("checkpoints (training)", {**CLASSIFIER, "scenario": {**CLASSIFIER["scenario"], "checkpoints": [2]},
                                           "attacks": {"ig": {"iterations": 3}}}, device, args.dtype)
        # The same cell on the CPU: the client's batch really reached the GPU (the updates agree, not bit for bit).
        ig = {**CLASSIFIER, "attacks": {"ig": {"iterations": 3}}}
        gpu = run_one(f"ig on {device} (compare)", ig, device, "float32")["update"]
        cpu = run_one("ig on cpu (compare)", ig, torch.device("cpu"), "float32")["update"]
        close = all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(gpu, cpu))
        _check(close, "the CUDA update differs from the CPU one beyond float32 tolerance")
        print("ok  the CUDA client update matches the CPU one (rtol 1e-3)")
    except SmokeFailure as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    print("gpu_smoke: every attack, defense and metric ran on", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
