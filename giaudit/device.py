"""Where an audit computes: the ``[run]`` section's ``device`` and ``dtype``.

``device``: ``"auto"`` (CUDA when this machine has it, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
``"mps"``; ``dtype``: ``"float32"`` (default) or ``"float64"``. The audit's global model, the client's step
(its defenses, Opacus included), the attacks and their priors, and the utility trainings run there; data stay
on the CPU and random draws come from CPU generators (so a seed draws the same batch, the same noise and the
same attack start on every device), moved to the device after they are drawn. Metrics score CPU float32
copies of the images.

`resolve` checks that the device exists on this machine: asking for CUDA where there is none is one line
naming ``run.device``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from giaudit.errors import ConfigError, ParamError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_DTYPE = "float32"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(value: str) -> None:
    """Raise `ParamError` on ``device`` unless it has one of the forms of `DEVICES` (availability aside)."""
    if not _DEVICE.match(value):
        raise ParamError("device", f"unknown device {value!r}; known: {', '.join(DEVICES)}")


def check_dtype_name(value: str) -> None:
    if value not in DTYPES:
        raise ParamError("dtype", f"unknown dtype {value!r}; known: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Runtime:
    """The resolved device and dtype of a run."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def record(self) -> dict[str, Any]:
        """What records carry: the device, the dtype and the torch version that computed them."""
        return {"device": str(self.device), "dtype": self.dtype_name, "torch": torch.__version__}


CPU = Runtime(torch.device("cpu"), torch.float32)


def resolve(device: str | None = None, dtype: str | None = None, key: str = "run.device") -> Runtime:
    """The `Runtime` of ``run.device`` / ``run.dtype`` (None: the CPU, float32); raises naming the key when the
    device does not exist on this machine."""
    name = device or "cpu"
    check_device_name(name)
    check_dtype_name(dtype or DEFAULT_DTYPE)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ConfigError(f"{key}: {device!r} but this machine has no CUDA device (torch {torch.__version__}, "
                              f"{built}); use \"cpu\" or \"auto\"")
        # Not torch.cuda.current_device(): that would initialise CUDA in the driver, which forked workers inherit.
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        name = f"cuda:{index}"  # one name for the device (records, placement checks)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}: 'mps' but this machine has no Apple GPU available to torch; use \"cpu\" or "
                          "\"auto\"")
    return Runtime(torch.device(name), DTYPES[dtype or DEFAULT_DTYPE])


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of `model`'s parameters (the CPU in float32 for a model without any)."""
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def to_model(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """`x` on `model`'s device, floating tensors in its dtype (labels keep theirs); a no-op where they match."""
    device, dtype = placement(model)
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where `generator` draws (the CPU when there is none: torch's global CPU generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def moved(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype`, moved in place only when it is not there already (diffusers' UNet warns
    on every cast, even one to its own dtype)."""
    if placement(module) != (device, dtype):
        module.to(device, dtype)
    return module
