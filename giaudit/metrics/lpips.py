"""LPIPS perceptual distance, offline, through the `lpips` package's own model.

Zhang, Isola, Efros, Shechtman & Wang, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", CVPR 2018 (LPIPS v0.1, AlexNet trunk). Used
only by the evaluator (`giaudit.metrics.evaluate`), which holds the ground
truth; it plays no part in any attack or threat model.

What is offline and what is not:
- The `lpips` package ships its calibrated linear layers
  (``lpips/weights/v0.1/alex.pth``); those are loaded by lpips itself.
- Its AlexNet trunk is torchvision's ImageNet AlexNet, which torchvision would
  download. We never download. The user places torchvision's file
  ``alexnet-owt-7be5be79.pth`` in ``$TORCH_HOME/hub/checkpoints/`` (TORCH_HOME
  defaults to ``$XDG_CACHE_HOME/torch``, i.e. ``~/.cache/torch``, as in
  torch.hub), e.g. with ``giaudit weights fetch lpips-alexnet`` (see
  `giaudit.weights`; audits never call it). Without it `load_lpips` returns an
  unavailable metric whose `reason` names that command and the folder; it
  never raises for a missing file.
  A file that is present but unreadable or not an AlexNet checkpoint raises
  DataError naming it: the user asked for LPIPS and should hear why it failed.

The torchvision shim: ``lpips/pretrained_networks.py`` runs
``from torchvision import models as tv`` at import and later calls
``tv.alexnet(pretrained=...).features``. torchvision cannot be installed beside
this project's CPU torch, so when real torchvision is not importable we put a
two-module stand-in (`torchvision`, `torchvision.models`) into ``sys.modules``
for the duration of ``import lpips`` only, then remove it. The stand-in's
``alexnet(pretrained=False)`` builds AlexNet's ``features`` with torchvision's
exact layer indices (so lpips' slices keep torchvision's parameter names), and
refuses ``pretrained=True`` (which would mean a download). Every other model
name raises ConfigError: only 'alex' is supported offline. lpips is built with
``pnet_rand=True`` (trunk not fetched) and we then load the trunk from the
checkpoint ourselves, mapping ``features.<i>.<w>`` to lpips'
``net.slice<k>.<i>.<w>``. With real torchvision present the same path is used
(``tv.alexnet(pretrained=False)`` downloads nothing).

Inputs are N,C,H,W in [0, 1]. LPIPS wants 3 channels in [-1, 1]: grey images
(C = 1) are repeated to 3 channels, and values are mapped by 2x - 1. AlexNet's
stride-4 stem and two max-pools need at least 31 pixels per side; images whose
shorter side is under 32 pixels are bilinearly upsampled so that side becomes
32 (e.g. MNIST 28x28 -> 32x32). `LPIPSMetric.input_note` says when that happens.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from giaudit.errors import ConfigError, DataError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
MIN_SIDE = 32       # AlexNet features need >= 31 px; 32 is the nearest round size
_CHUNK = 64         # images per forward pass, to bound memory on large batches

_IMPORT_LOCK = threading.Lock()
_CACHE: dict[tuple[str, int, int], LPIPSMetric] = {}


def checkpoints_dir(torch_home: str | os.PathLike | None = None) -> Path:
    """``<TORCH_HOME>/hub/checkpoints``, resolving TORCH_HOME as torch.hub does."""
    if torch_home is None:
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


# --------------------------------------------------------------------------- shim
def _alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional part with torchvision's module indices 0..12."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),   # 0
        nn.ReLU(inplace=True),                                   # 1
        nn.MaxPool2d(kernel_size=3, stride=2),                   # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2),            # 3
        nn.ReLU(inplace=True),                                   # 4
        nn.MaxPool2d(kernel_size=3, stride=2),                   # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1),           # 6
        nn.ReLU(inplace=True),                                   # 7
        nn.Conv2d(384, 256, kernel_size=3, padding=1),           # 8
        nn.ReLU(inplace=True),                                   # 9
        nn.Conv2d(256, 256, kernel_size=3, padding=1),           # 10
        nn.ReLU(inplace=True),                                   # 11
        nn.MaxPool2d(kernel_size=3, stride=2),                   # 12
    )


class _AlexNetTrunk(nn.Module):
    """Stands in for torchvision's AlexNet; lpips reads only `.features`, so the
    classifier (58M parameters) is not built."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _alexnet_features()


def _shim_alexnet(pretrained: bool = False, weights=None, **_kwargs) -> _AlexNetTrunk:
    if pretrained or weights is not None:
        raise RuntimeError(
            "giaudit's torchvision stand-in never downloads weights; build lpips with pnet_rand=True "
            "and load the trunk through giaudit.metrics.lpips.load_lpips")
    return _AlexNetTrunk()


def _shim_unsupported(name: str):
    def build(*_args, **_kwargs):
        raise ConfigError(f"LPIPS trunk '{name}' is not supported offline: only net = 'alex' is")
    return build


def _make_shim() -> tuple[types.ModuleType, types.ModuleType]:
    tv = types.ModuleType("torchvision", "giaudit stand-in for torchvision, present only while importing lpips")
    models = types.ModuleType("torchvision.models", "giaudit stand-in: alexnet(pretrained=False) only")
    models.__dict__["alexnet"] = _shim_alexnet
    for name in ("vgg16", "squeezenet1_1", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        setattr(models, name, _shim_unsupported(name))
    tv.__dict__.update(models=models, __giaudit_shim__=True)
    return tv, models


def _real_torchvision_importable() -> bool:
    mod = sys.modules.get("torchvision")
    if mod is not None:
        return not getattr(mod, "__giaudit_shim__", False)
    if importlib.util.find_spec("torchvision") is None:
        return False
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision")
        return True
    except (ImportError, RuntimeError, OSError, AttributeError):
        # An installed torchvision built for another torch fails at import
        # (missing C++ operators); drop what the failed attempt left behind.
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        return False


def _import_lpips():
    """Import the lpips package, with the torchvision stand-in only if needed."""
    with _IMPORT_LOCK:
        mod = sys.modules.get("lpips")
        if mod is not None and hasattr(mod, "LPIPS"):
            return mod
        if _real_torchvision_importable():
            return importlib.import_module("lpips")
        tv, models = _make_shim()
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.models"] = models
        try:
            return importlib.import_module("lpips")
        finally:
            # lpips keeps its own reference (pretrained_networks.tv); nothing
            # else in the process should ever see the stand-in.
            for name, shim in (("torchvision", tv), ("torchvision.models", models)):
                if sys.modules.get(name) is shim:
                    del sys.modules[name]


# --------------------------------------------------------------------------- metric
class LPIPSMetric:
    """Per-image LPIPS distance, or an unavailable placeholder with a reason."""

    def __init__(self, model: nn.Module | None, reason: str | None = None, *,
                 net: str = "alex", weights: Path | None = None) -> None:
        if model is None and not reason:
            raise ValueError("an unavailable LPIPSMetric needs a reason")
        self._model = model
        self.reason = None if model is not None else reason
        self.net = net
        self.weights = weights

    @property
    def available(self) -> bool:
        return self._model is not None

    @staticmethod
    def input_note(height: int, width: int) -> str | None:
        """What `__call__` does to images of this size beyond scaling to [-1, 1], if anything."""
        if min(height, width) >= MIN_SIDE:
            return None
        h, w = _upsampled_size(height, width)
        return (f"LPIPS computed on images bilinearly upsampled from {height}x{width} to {h}x{w} "
                f"(AlexNet needs at least 31 px per side)")

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.detach().to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB by repetition
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIDE:
            x = F.interpolate(x, size=_upsampled_size(h, w), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if self._model is None:
            raise DataError(self.reason or "LPIPS unavailable")
        if a.dim() != 4 or a.shape != b.shape:
            raise DataError(f"LPIPS takes two N,C,H,W batches of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[1] not in (1, 3):
            raise DataError(f"LPIPS takes grey (1) or RGB (3) channel images; got {a.shape[1]} channels")
        out = []
        with torch.no_grad():
            for i in range(0, a.shape[0], _CHUNK):
                x, y = self._prepare(a[i:i + _CHUNK]), self._prepare(b[i:i + _CHUNK])
                out.append(self._model(x, y).reshape(-1))
        if not out:
            return torch.zeros(0, dtype=torch.float64, device="cpu")
        return torch.cat(out).to(torch.float64)


def _upsampled_size(height: int, width: int) -> tuple[int, int]:
    scale = MIN_SIDE / min(height, width)
    return max(MIN_SIDE, round(height * scale)), max(MIN_SIDE, round(width * scale))


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    """Copy torchvision's ``features.<i>.*`` tensors into lpips' ``slice<k>.<i>.*``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file; all mean the same to the user
        raise DataError(f"{path}: cannot read it as a torch checkpoint ({exc.__class__.__name__}: {exc}); "
                        f"replace it with torchvision's {ALEXNET_FILE}") from exc
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected torchvision's AlexNet state dict, found a {type(state).__name__}")
    wanted = {}
    for name, param in trunk.state_dict().items():
        key = "features." + name.split(".", 1)[1]   # slice2.3.weight -> features.3.weight
        tensor = state.get(key)
        if tensor is None:
            raise DataError(f"{path}: missing '{key}'; this is not torchvision's AlexNet checkpoint ({ALEXNET_FILE})")
        if tuple(tensor.shape) != tuple(param.shape):
            raise DataError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, AlexNet needs {tuple(param.shape)}")
        wanted[name] = tensor
    trunk.load_state_dict(wanted, strict=True)


def import_lpips() -> types.ModuleType:
    """The lpips package (imported with the torchvision stand-in when needed); raises ImportError."""
    return _import_lpips()


def package_missing_reason(exc: ImportError) -> str:
    return (f"LPIPS unavailable: the lpips package cannot be imported ({exc}); "
            "install it with `pip install --no-deps lpips`")


def missing_checkpoint_reason(ckpt_dir: Path) -> str:
    return (f"LPIPS unavailable: {ALEXNET_FILE} is not in {ckpt_dir}; run `giaudit weights fetch lpips-alexnet` "
            "(or place torchvision's file there)")


def load_lpips(net: str = "alex", torch_home: str | os.PathLike | None = None) -> LPIPSMetric:
    """LPIPS v0.1 with the AlexNet trunk from ``<torch_home>/hub/checkpoints/``.

    Returns an unavailable metric (``available`` False, ``reason`` set) when the
    AlexNet checkpoint or the lpips package is missing. Results are cached per
    checkpoint file (path, size, modification time).
    """
    if net != "alex":
        raise ConfigError(f"LPIPS net '{net}' is not supported offline: only 'alex' is "
                          "(its trunk is the one checkpoint giaudit knows how to load without torchvision)")
    ckpt_dir = checkpoints_dir(torch_home)
    path = ckpt_dir / ALEXNET_FILE
    if not path.is_file():
        return LPIPSMetric(None, missing_checkpoint_reason(ckpt_dir), net=net)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        lpips_pkg = _import_lpips()
    except ImportError as exc:
        return LPIPSMetric(None, package_missing_reason(exc), net=net)
    model = lpips_pkg.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    _load_trunk(model.net, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metric = LPIPSMetric(model, net=net, weights=path)
    _CACHE[key] = metric
    return metric
