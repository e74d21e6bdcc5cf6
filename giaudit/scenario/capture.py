"""Captured updates of a real federated deployment as an audit scenario.

A capture is a folder written by `giaudit.integrations.flower` (or by any
other integration that follows the same format), safetensors + JSON, no
pickles:

- ``global.safetensors``: the global arrays the client received, under their
  names (Flower's legacy NumPy messages name them "0", "1", ... in order);
- ``update.safetensors``: the arrays that left the client (after its DP or
  clipping mods) or, for a server-side capture, that the server received;
- ``batch.safetensors`` (optional): the client's private batch (``images``
  N,C,H,W in [0, 1] and ``labels``), stored only when the data owner captured
  with the evaluation flag: it is the audit's ground truth;
- ``capture.json`` (written last, so a folder with it is complete): format
  and version, view ("client" or "server"), round, node id, the training
  details (``lr``, ``local_epochs``, ``batch_size``, ``num_examples``), the
  raw config and metrics, and the data's form (``shape``, ``num_classes``,
  ``value_range``).

`CaptureScenario` turns a capture into the same (Observation, GroundTruth)
pair `Scenario.simulate` produces: the global model comes from a user factory
(``module:function`` with ``scenario.model_args``, `giaudit.scenario.factory`)
whose state-dict names and shapes must match the capture (the first
difference is named), with the captured global weights loaded and the data's
normalisation (``data.mean`` / ``data.std``) as its first operation; the
update is the FedAvg delta (sent - received) of the trainable parameters
with the captured training details (E local epochs of plain SGD over ordered
mini-batches of the captured batch size; a class-C attacker knows them).
Defenses were applied by the deployment itself, so none may be configured on
top.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from giaudit.device import CPU, Runtime, to_model
from giaudit.errors import ConfigError, DataError
from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.scenario.factory import call_factory
from giaudit.scenario.models import normalise_inputs, seeded_init
from giaudit.threat import observe
from giaudit.types import ClientProtocol, DataSpec, GroundTruth, Observation, SharedUpdate, ThreatModel

FORMAT = "giaudit-capture"
VERSION = 1


def write_capture(folder: Path, *, global_arrays: Mapping[str, np.ndarray], update_arrays: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any], batch: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write one capture atomically (arrays first, capture.json last)."""
    folder = Path(folder)
    atomic_write_bytes(folder / "global.safetensors", st_save({k: np.ascontiguousarray(v)
                                                               for k, v in global_arrays.items()}))
    atomic_write_bytes(folder / "update.safetensors", st_save({k: np.ascontiguousarray(v)
                                                               for k, v in update_arrays.items()}))
    if batch is not None:
        images, labels = batch
        atomic_write_bytes(folder / "batch.safetensors", st_save({
            "images": np.ascontiguousarray(images, dtype=np.float32),
            "labels": np.ascontiguousarray(labels, dtype=np.int64)}))
    doc = {"format": FORMAT, "version": VERSION, **meta, "global_order": list(global_arrays),
           "update_order": list(update_arrays), "has_batch": batch is not None}
    atomic_write_text(folder / "capture.json", json.dumps(doc, indent=1, default=_jsonable))
    return folder


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    return str(o)


@dataclass(frozen=True)
class Capture:
    folder: Path
    meta: Mapping[str, Any]
    global_arrays: dict[str, np.ndarray]
    update_arrays: dict[str, np.ndarray]
    batch: tuple[np.ndarray, np.ndarray] | None


def load_capture(folder: str | Path) -> Capture:
    folder = Path(folder)
    doc_path = folder / "capture.json"
    if not doc_path.is_file():
        raise ConfigError(f"scenario.capture: {folder} has no capture.json; point it at a capture folder "
                          "(round-<r>/<view>-<node>/)")
    try:
        meta = json.loads(doc_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        glob = st_load((folder / "global.safetensors").read_bytes())
        upd = st_load((folder / "update.safetensors").read_bytes())
        batch = None
        if meta.get("has_batch"):
            b = st_load((folder / "batch.safetensors").read_bytes())
            batch = (b["images"], b["labels"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder}: not a readable giaudit capture ({exc})") from None
    order = meta.get("global_order", list(glob))
    uorder = meta.get("update_order", list(upd))
    return Capture(folder, meta, {k: glob[k] for k in order}, {k: upd[k] for k in uorder}, batch)


def match_state(model: nn.Module, arrays: Mapping[str, np.ndarray], factory: str,
                what: str = "global") -> dict[str, torch.Tensor]:
    """The captured arrays under the model's state-dict names; raises naming the first differing tensor.

    Arrays named "0", "1", ... (Flower's NumPy lists) are matched by position, others by name.
    """
    state = model.state_dict()
    names = list(state)
    keys = list(arrays)
    positional = all(k.isdigit() for k in keys)
    if len(keys) != len(names):
        raise DataError(f"capture {what} arrays: {len(keys)} tensors, the model from {factory} has {len(names)} "
                        f"state-dict entries; first differing: "
                        f"{_first_diff(names, keys, arrays, state, positional)}")
    out = {}
    for i, name in enumerate(names):
        key = keys[i] if positional else name
        if key not in arrays:
            raise DataError(f"capture {what} arrays: no tensor {name!r} (model from {factory}); the capture "
                            f"has {keys[i]!r} there")
        arr = arrays[key]
        if tuple(arr.shape) != tuple(state[name].shape):
            raise DataError(f"capture {what} arrays: tensor {key!r} has shape {tuple(arr.shape)}, but {name!r} "
                            f"of the model from {factory} has shape {tuple(state[name].shape)}")
        out[name] = torch.from_numpy(np.array(arr)).to(state[name].dtype)
    return out


def _first_diff(names: list[str], keys: list[str], arrays: Mapping[str, np.ndarray],
                state: Mapping[str, torch.Tensor], positional: bool) -> str:
    for i in range(max(len(names), len(keys))):
        if i >= len(names):
            return f"capture tensor {keys[i]!r} has no counterpart in the model"
        if i >= len(keys):
            return f"model tensor {names[i]!r} is missing from the capture"
        key = keys[i] if positional else names[i]
        if key not in arrays or tuple(arrays[key].shape) != tuple(state[names[i]].shape):
            return f"model tensor {names[i]!r} vs capture tensor {keys[i]!r}"
    return "none"


@dataclass
class CaptureScenario:
    """A captured client update as a scenario: `simulate` returns the captured Observation and GroundTruth."""

    capture: Capture
    model: nn.Module          # the global model the client received, in the configured BN mode
    data_spec: DataSpec
    threat: ThreatModel
    # A capture holds one client's update, no pool of other images (to draw a re-identification gallery from).
    pool: ClassVar[None] = None

    @classmethod
    def build(cls, folder: str | Path, factory: str, threat: ThreatModel, *, bn_mode: str = "train",
              base: Path | None = None, factory_args: Mapping[str, Any] | None = None,
              normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
              runtime: Runtime = CPU) -> CaptureScenario:
        """The capture in `folder` with the model `factory` builds (called with `factory_args`; `base`: the
        config's folder, searched last for its module), its inputs normalised by (mean, std) when given, on the
        runtime's device and dtype."""
        cap = load_capture(folder)
        model = seeded_init(lambda: call_factory("scenario.model_factory", factory, factory_args, base), None)
        model.load_state_dict(match_state(model, cap.global_arrays, factory, "global"))
        match_state(model, cap.update_arrays, factory, "update")
        if normalisation is not None:
            normalise_inputs(model, *normalisation)
        model = model.to(runtime.device, runtime.dtype)
        model.train(bn_mode == "train")
        data = cap.meta.get("data") or {}
        shape = data.get("shape") or (list(cap.batch[0].shape[1:]) if cap.batch is not None else None)
        if not shape or len(shape) != 3:
            raise DataError(f"{cap.folder}: capture.json has no data.shape [C, H, W]; pass input_shape to the "
                            "capture mod")
        classes = data.get("num_classes")
        if not classes:
            raise DataError(f"{cap.folder}: capture.json has no data.num_classes; pass num_classes to the "
                            "capture mod")
        lo, hi = data.get("value_range", (0.0, 1.0))
        spec = DataSpec(int(shape[0]), int(shape[1]), int(shape[2]), int(classes), (float(lo), float(hi)),
                        name="capture")
        return cls(cap, model, spec, threat)

    @property
    def protocol(self) -> ClientProtocol:
        t = self.capture.meta.get("training") or {}
        missing = [k for k in ("lr", "local_epochs", "num_examples") if t.get(k) is None]
        if missing:
            raise DataError(f"{self.capture.folder}: the capture has no training detail {missing[0]!r}; name the "
                            "config key that carries it when capturing")
        n = int(t["num_examples"])
        bs = t.get("batch_size")
        return ClientProtocol("fedavg", int(t["local_epochs"]), float(t["lr"]),
                              None if bs is None or int(bs) >= n else int(bs))

    def simulate(self, defenses: Any = None,
                 generator: torch.Generator | None = None) -> tuple[Observation, GroundTruth | None]:
        if defenses is not None and getattr(defenses, "defenses", None):
            raise ConfigError("defenses: a capture already holds what the deployment sent; configure no "
                              "[[defenses]] on top of it")
        protocol = self.protocol
        sent = match_state(self.model, self.capture.update_arrays, "the factory", "update")
        names = [n for n, _ in self.model.named_parameters()]
        before = dict(self.model.named_parameters())
        delta = tuple(to_model(sent[n], self.model) - before[n].detach() for n in names)
        if not all(math.isfinite(float(d.abs().sum())) for d in delta):
            raise DataError(f"{self.capture.folder}: the captured update has non-finite values")
        labels = None
        truth = None
        if self.capture.batch is not None:
            images, lab = self.capture.batch
            labels = to_model(torch.from_numpy(np.array(lab)).long(), self.model)
            truth = GroundTruth(torch.from_numpy(np.array(images)).float(), labels.cpu().clone())
        obs = observe(model=copy.deepcopy(self.model), update=SharedUpdate(delta, "delta"),
                      data_spec=self.data_spec, threat=self.threat,
                      batch_size=int((self.capture.meta.get("training") or {})["num_examples"]),
                      protocol=protocol, labels=labels, bn_statistics=None)
        return obs, truth
