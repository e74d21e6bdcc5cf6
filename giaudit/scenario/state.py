"""The global model's trained state from a file: ``scenario.weights``.

The state the audit attacks is the deployment's global model at the round
that matters, saved as a ``.safetensors`` file (read with safetensors, no
code runs) or as a PyTorch state dict (``torch.save(model.state_dict())``,
read with ``torch.load(weights_only=True)``: a pickle holding anything but
tensors and plain containers is refused, never unpickled). A checkpoint that
nests the state dict under ``state_dict`` or ``model`` is read from there.

`fit_state` checks the file against the model key by key: every missing key,
every unexpected key and every shape mismatch is named in one line, and
nothing is loaded unless all of them match. `sha256` is the file's digest,
which the audit's records carry.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from giaudit.errors import ConfigError

KEY = "scenario.weights"
# Where a training checkpoint commonly nests its state dict.
_NESTED = ("state_dict", "model")
# How many names of each kind the one-line error lists before it says how many more there are.
_LISTED = 8


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(path: str | Path, key: str = KEY) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a torch state dict (weights_only), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        try:
            return dict(st_load(data))
        except (SafetensorError, ValueError, OSError) as exc:
            raise ConfigError(f"{key}: {path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{key}: {path} holds objects other than tensors, which are never unpickled "
                          f"(torch.load weights_only=True refused {_refused(exc)}); save model.state_dict() or a "
                          ".safetensors file") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} is neither a .safetensors file nor a torch state dict ({exc})") from None
    for nest in _NESTED:
        if isinstance(obj, Mapping) and isinstance(obj.get(nest), Mapping):
            obj = obj[nest]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ConfigError(f"{key}: {path} holds a {type(obj).__name__}, not a state dict of named tensors; save "
                          "model.state_dict()")
    return dict(obj)


def _refused(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. "GLOBAL builtins.print"), from its long message."""
    for line in str(exc).splitlines():
        if "Unsupported global:" in line:
            return line.split("Unsupported global:", 1)[1].split(" was not")[0].strip()
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().rstrip(".")
    return "it"


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def fit_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` checked against the model's state dict and cast to its dtypes; raises naming every key that
    is missing, unexpected or of another shape (`where`: e.g. "scenario.weights: global.safetensors")."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_names(shapes)}")
    if problems:
        raise ConfigError(f"{where} does not fit the model: {'; '.join(problems)}")
    return {k: state[k].to(own[k].dtype) for k in own}


def load_weights(model: nn.Module, path: str | Path, key: str = KEY) -> str:
    """Load the file's state into `model` (checked key by key); return the file's SHA-256."""
    state = fit_state(model, load_state(path, key), f"{key}: {path}")
    model.load_state_dict(state)
    return sha256(path)
