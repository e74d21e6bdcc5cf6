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
- ``probe.safetensors`` (optional): the deployed model's fingerprint, its
  output (``output``) in eval mode on a fixed, seeded probe input
  (``input``) with the global arrays loaded;
- ``capture.json`` (written last, so a folder with it is complete): format
  and version, view ("client" or "server"), round, node id, the training
  details (``lr``, ``local_epochs``, ``batch_size``, ``num_examples`` and,
  when the client recorded its steps, ``order``: the sample indices of every
  local step), the raw config and metrics, the data's form (``shape``,
  ``num_classes``, ``value_range``) and, when known, the deployment's own
  defenses (``deployment_defenses``: what each is, its parameters, whether it
  acted before the capture point and giaudit's equivalent defense tables).

`CaptureScenario` turns a capture into the same (Observation, GroundTruth)
pair `Scenario.simulate` produces: the global model comes from a user factory
(``module:function`` with ``scenario.model_args``, `giaudit.scenario.factory`)
whose state-dict names and shapes must match the capture (the first
difference is named), with the captured global weights loaded and the data's
normalisation (``data.mean`` / ``data.std``) as its first operation; when the
capture holds a fingerprint, a factory computing a different function from
the deployed model (same shapes, another activation) is refused. The update
is the FedAvg delta (sent - received) of the trainable parameters with the
captured training details (plain SGD over the recorded local steps, or E
local epochs of ordered mini-batches of the captured batch size when the
order was not recorded, which the report says; a class-C attacker knows
them). Defenses were applied by the deployment itself, so none may be
configured on top: the capture records them (or the audit config declares
them, ``scenario.deployment_defenses``), the record is labelled with them
("not declared" when nobody said), and their disclosed parameters (a clip
norm) reach adaptive attacks as in simulation.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from giaudit.defenses import Chain, build_chain
from giaudit.device import CPU, Runtime, to_model
from giaudit.errors import ConfigError, DataError
from giaudit.fl import normalise_inputs
from giaudit.io import atomic_write_bytes, atomic_write_text
from giaudit.scenario.factory import call_factory
from giaudit.scenario.models import seeded_init
from giaudit.threat import observe
from giaudit.types import (
    NO_DEFENSE,
    UNDECLARED_DEFENSE,
    ClientProtocol,
    DataSpec,
    GroundTruth,
    Observation,
    SharedUpdate,
    ThreatModel,
)

FORMAT = "giaudit-capture"
VERSION = 1
# The fingerprint's probe: PROBE_COUNT inputs drawn uniformly in the data's value range from a generator seeded
# with PROBE_SEED (the input itself is stored too), and the largest output difference tolerated, relative to the
# output's scale (float32 rounding of the same function on another machine stays far below it).
PROBE_SEED = 0
PROBE_COUNT = 2
PROBE_TOLERANCE = 1e-4


def _exact(a: Any, dtype: Any = None) -> np.ndarray:
    """A C-contiguous copy keeping the shape: np.ascontiguousarray turns a 0-d array (BatchNorm's
    num_batches_tracked) into shape (1,)."""
    return np.array(a, dtype=dtype, order="C", copy=True)


def write_capture(folder: Path, *, global_arrays: Mapping[str, np.ndarray], update_arrays: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any], batch: tuple[np.ndarray, np.ndarray] | None = None,
                  probe: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write one capture atomically (arrays first, capture.json last); every array keeps its shape and dtype."""
    folder = Path(folder)
    atomic_write_bytes(folder / "global.safetensors", st_save({k: _exact(v) for k, v in global_arrays.items()}))
    atomic_write_bytes(folder / "update.safetensors", st_save({k: _exact(v) for k, v in update_arrays.items()}))
    if batch is not None:
        images, labels = batch
        atomic_write_bytes(folder / "batch.safetensors", st_save({
            "images": _exact(images, np.float32), "labels": _exact(labels, np.int64)}))
    if probe is not None:
        atomic_write_bytes(folder / "probe.safetensors", st_save({
            "input": _exact(probe[0], np.float32), "output": _exact(probe[1], np.float32)}))
    doc = {"format": FORMAT, "version": VERSION, **meta, "global_order": list(global_arrays),
           "update_order": list(update_arrays), "has_batch": batch is not None, "has_probe": probe is not None}
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
    probe: tuple[np.ndarray, np.ndarray] | None = None


def probe_input(shape: Sequence[int], value_range: Sequence[float] = (0.0, 1.0),
                seed: int = PROBE_SEED) -> np.ndarray:
    """The fingerprint's probe: PROBE_COUNT inputs of `shape` (C, H, W), uniform in `value_range`, seeded."""
    lo, hi = float(value_range[0]), float(value_range[1])
    x = torch.rand((PROBE_COUNT, *[int(d) for d in shape]), generator=torch.Generator().manual_seed(seed))
    return (lo + (hi - lo) * x).numpy()


def model_output(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """`model`'s output on `x` in eval mode (BatchNorm on its running statistics), on the model's own device
    and dtype; the model's mode is restored."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(np.array(x)).to(device=device, dtype=dtype))
    finally:
        model.train(was)
    return out.detach().float().cpu().numpy()


def fingerprint(model: nn.Module, shape: Sequence[int],
                value_range: Sequence[float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """(probe input, `model`'s output on it): what `write_capture(probe=...)` stores for the audit to check
    its model factory against."""
    x = probe_input(shape, value_range)
    return x, model_output(model, x)


def check_fingerprint(model: nn.Module, probe: tuple[np.ndarray, np.ndarray], factory: str) -> None:
    """Refuse a model that computes another function from the deployed one on the capture's probe."""
    x, want = probe
    got = model_output(model, x)
    if got.shape != want.shape:
        raise ConfigError(f"scenario.model_factory: the model from {factory} outputs shape {got.shape} on the "
                          f"capture's probe, the deployed model {want.shape}")
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if not diff <= PROBE_TOLERANCE * scale:
        raise ConfigError(f"scenario.model_factory: the model from {factory} computes a different function from "
                          f"the deployed model (its output on the capture's probe differs by {diff:.3g}, tolerance "
                          f"{PROBE_TOLERANCE * scale:.3g}), though its tensor shapes match: build exactly the "
                          "deployed architecture (activations, layer order, normalisation)")


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
        batch = probe = None
        if meta.get("has_batch"):
            b = st_load((folder / "batch.safetensors").read_bytes())
            batch = (b["images"], b["labels"])
        if meta.get("has_probe"):
            p = st_load((folder / "probe.safetensors").read_bytes())
            probe = (p["input"], p["output"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder}: not a readable giaudit capture ({exc})") from None
    order = meta.get("global_order", list(glob))
    uorder = meta.get("update_order", list(upd))
    return Capture(folder, meta, {k: glob[k] for k in order}, {k: upd[k] for k in uorder}, batch, probe)


def read_meta(folder: str | Path) -> Mapping[str, Any]:
    """capture.json alone (what an audit plan needs before any array is read)."""
    try:
        return json.loads((Path(folder) / "capture.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder}: not a readable giaudit capture ({exc})") from None


def summary(folder: str | Path, declared: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """What the report's configuration shows of a capture audit: the capture's own view, training details,
    step order, fingerprint, ground truth and the deployment's defenses (what the audit really used)."""
    meta = read_meta(folder)
    t = meta.get("training") or {}
    order = t.get("order")
    dep = deployment(meta, declared)
    return {"folder": str(folder), "view": meta.get("view"), "round": meta.get("round"), "node": meta.get("node"),
            **{k: t.get(k) for k in ("lr", "local_epochs", "batch_size", "num_examples") if t.get(k) is not None},
            "step_order": f"recorded ({len(order)} steps)" if order is not None else "not recorded",
            "fingerprint": "checked against the model factory" if meta.get("has_probe") else "none in the capture",
            "ground_truth": "the client's batch" if meta.get("has_batch") else "none (the server's view)",
            "deployment_defenses": list(dep.lines) if dep.declared else UNDECLARED_DEFENSE,
            **({"data": meta["data"]} if meta.get("data") else {})}


@dataclass(frozen=True)
class Deployment:
    """The defenses the deployment applied itself: their label for records, giaudit's equivalent chain of
    those that acted before the capture point (disclosed to the attack as in simulation), one line per
    defense for the report, and whether anybody declared them at all."""

    label: str
    chain: Chain
    lines: tuple[str, ...]
    declared: bool


def deployment(meta: Mapping[str, Any], declared: Sequence[Mapping[str, Any]] | None) -> Deployment:
    """The deployment's defenses from the capture (`deployment_defenses`, recorded by the integration) or from
    the audit config (`declared`: giaudit defense tables, ``scenario.deployment_defenses``), never both."""
    recorded = meta.get("deployment_defenses")
    if recorded is not None and declared is not None:
        raise ConfigError("scenario.deployment_defenses: the capture records the deployment's defenses itself ("
                          f"{', '.join(str(d.get('name')) for d in recorded) or 'none'}); remove the key")
    if declared is not None:
        chain = build_chain([dict(t) for t in declared], where="scenario.deployment_defenses")
        return Deployment(chain.name, chain, tuple(f"{d.describe()} (declared in the audit config)"
                                                   for d in chain.defenses), True)
    if recorded is None:
        return Deployment(UNDECLARED_DEFENSE, Chain([]), (), False)
    tables: list[dict[str, Any]] = []
    lines = []
    for d in recorded:
        params = ", ".join(f"{k} {v}" for k, v in (d.get("params") or {}).items())
        where = "before the capture point" if d.get("before_capture", True) else "after the capture point " \
            "(not in the captured update)"
        equiv = d.get("as")
        lines.append(f"{d.get('name')}" + (f" ({params})" if params else "") + f", {where}"
                     + ("" if equiv is not None or not d.get("before_capture", True)
                        else "; giaudit has no equivalent to disclose"))
        if d.get("before_capture", True) and equiv:
            tables.extend(dict(t) for t in equiv)
    chain = build_chain(tables, where="capture.json: deployment_defenses")
    names = [str(d.get("name")) for d in recorded]
    return Deployment("+".join(names) if names else NO_DEFENSE, chain, tuple(lines), True)


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


ORDER_NOTE = ("mini-batch order not recorded: FedAvg unrolling assumes the client took its samples in the "
              "recorded order, {epochs} epoch(s) of consecutive batches of {bs}; a client that shuffles should "
              "hand each step to the capture (record_step) so the unrolling follows it")
PROBE_NOTE = ("model not verified: the capture holds no fingerprint of the deployed model (give the capture "
              "mod model=...), so a factory computing another function with the same tensor shapes would go "
              "unnoticed")
UNDECLARED_NOTE = ("the deployment's own defenses were not declared: the captured update may be defended or not "
                   "(record them at capture time, or declare them with scenario.deployment_defenses)")


@dataclass
class CaptureScenario:
    """A captured client update as a scenario: `simulate` returns the captured Observation and GroundTruth."""

    capture: Capture
    model: nn.Module          # the global model the client received, in the configured BN mode
    data_spec: DataSpec
    threat: ThreatModel
    deployment: Deployment
    # A capture holds one client's update, no pool of other images (to draw a re-identification gallery from).
    pool: ClassVar[None] = None

    @classmethod
    def build(cls, folder: str | Path, factory: str, threat: ThreatModel, *, bn_mode: str = "train",
              base: Path | None = None, factory_args: Mapping[str, Any] | None = None,
              normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
              runtime: Runtime = CPU, declared: Sequence[Mapping[str, Any]] | None = None) -> CaptureScenario:
        """The capture in `folder` with the model `factory` builds (called with `factory_args`; `base`: the
        config's folder, searched last for its module), its inputs normalised by (mean, std) when given, on the
        runtime's device and dtype; `declared`: the deployment's defenses as the config declares them."""
        cap = load_capture(folder)
        model = seeded_init(lambda: call_factory("scenario.model_factory", factory, factory_args, base), None)
        model.load_state_dict(match_state(model, cap.global_arrays, factory, "global"))
        match_state(model, cap.update_arrays, factory, "update")
        if normalisation is not None:
            normalise_inputs(model, *normalisation)
        model = model.to(runtime.device, runtime.dtype)
        if cap.probe is not None:
            check_fingerprint(model, cap.probe, factory)
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
        return cls(cap, model, spec, threat, deployment(cap.meta, declared))

    @property
    def training(self) -> Mapping[str, Any]:
        return self.capture.meta.get("training") or {}

    @property
    def protocol(self) -> ClientProtocol:
        t = self.training
        missing = [k for k in ("lr", "local_epochs", "num_examples") if t.get(k) is None]
        if missing:
            raise DataError(f"{self.capture.folder}: the capture has no training detail {missing[0]!r}; name the "
                            "config key that carries it when capturing")
        n = int(t["num_examples"])
        bs = t.get("batch_size")
        order = t.get("order")
        return ClientProtocol("fedavg", int(t["local_epochs"]), float(t["lr"]),
                              None if bs is None or int(bs) >= n else int(bs),
                              None if order is None else tuple(tuple(int(i) for i in step) for step in order))

    @property
    def notes(self) -> tuple[str, ...]:
        """What the report must say about this capture's audit: what could not be checked or was assumed."""
        out = []
        if self.capture.probe is None:
            out.append(PROBE_NOTE)
        t = self.training
        bs, n = t.get("batch_size"), t.get("num_examples")
        if t.get("order") is None and bs is not None and n is not None and int(bs) < int(n):
            out.append(ORDER_NOTE.format(epochs=t.get("local_epochs"), bs=bs))
        if not self.deployment.declared:
            out.append(UNDECLARED_NOTE)
        return tuple(out)

    def simulate(self, defenses: Any = None,
                 generator: torch.Generator | None = None) -> tuple[Observation, GroundTruth | None]:
        if defenses is not None and getattr(defenses, "defenses", None):
            raise ConfigError("defenses: a capture already holds what the deployment sent; configure no "
                              "[[defenses]] on top of it (declare the deployment's own with "
                              "scenario.deployment_defenses)")
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
        update = SharedUpdate(delta, "delta")
        obs = observe(model=copy.deepcopy(self.model), update=update,
                      data_spec=self.data_spec, threat=self.threat,
                      batch_size=int(self.training["num_examples"]),
                      protocol=protocol, labels=labels, bn_statistics=None,
                      disclosed=self.deployment.chain.disclosures(update))
        return obs, truth
