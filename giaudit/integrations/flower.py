"""Capture what a real Flower deployment sends, for `giaudit audit` (``pip install "giaudit[flower]"``).

Two capture points, both writing `giaudit.scenario.capture` folders
(safetensors + JSON, no pickles, atomically) under
``OUT/round-<r>/<view>-<id>/`` (the partition id from the node config when
there is one, else the node id; both are in capture.json):

- `CaptureMod`, a client-side Flower mod. Put it **first** in the
  ``ClientApp``'s mod list: Flower runs mods outside-in, so the first mod sees
  the server's message before any other mod and the reply after every other
  mod, i.e. exactly what leaves the client after DP or clipping mods
  (``mods=[CaptureMod(...), LocalDpMod(...)]``). It records the incoming
  global arrays, the outgoing arrays, the training config (learning rate,
  local epochs, batch size, number of examples, found under the config keys
  you name) and the node id, for the rounds and clients you choose. With
  ``store_batch=True`` (the data owner auditing their own client) it also
  stores the batch the client trained on, which the client hands over with
  `record_batch`, or step by step with `record_step` when it shuffles or
  takes mini-batches (then the audit's FedAvg unrolling follows the real
  order); that batch is the audit's ground truth. With ``model=`` (the
  deployment's own model factory) it stores a fingerprint of the deployed
  model, which the audit checks its model factory against. With
  ``followed_by=[...]`` (the mods after it, used as ``mods=capture.mods``) it
  records the deployment's own defenses (`LocalDpMod`, `fixedclipping_mod`)
  and their parameters, which the report names and adaptive attacks use.
- `CaptureStrategy`, a server-side wrapper around a Flower (legacy API)
  strategy, recording what an honest-but-curious server receives from each
  client: the global parameters it sent, each client's returned parameters,
  config and number of examples, and the DP wrappers it wraps
  (``DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping``), saying
  which acted before this view and which after it. Under secure aggregation
  the server only receives the aggregate, and that is all this view can hold.

Both the legacy message layout (``NumPyClient``; the form Flower's own
``LocalDpMod`` works on) and the Message API layout (``arrays`` /
``config`` / ``metrics`` records) are understood.

Then ``giaudit audit`` with ``[scenario] capture = "OUT/round-1/client-<node>"``
and ``model_factory = "module:function"`` audits the captured update (see
examples/flower/).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from giaudit.scenario.capture import fingerprint, match_state, write_capture

BATCH_KEY = "giaudit.batch"
STEPS_KEY = "giaudit.steps"
CLIPPING_NORM_KEY = "clipping_norm"  # where Flower's client-side-clipping DP wrapper sends the clip norm
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning-rate", "learning_rate"),
    "local_epochs": ("local-epochs", "local_epochs", "epochs"),
    "batch_size": ("batch-size", "batch_size"),
}


def record_batch(context: Any, images: Any, labels: Any) -> None:
    """Hand the batch the client trains on to `CaptureMod` (stored only when it was made with store_batch=True).

    Call it from the ClientApp's train function; `images` N,C,H,W in [0, 1], `labels` N (tensors or arrays).
    """
    from flwr.app import Array, ArrayRecord

    context.state[BATCH_KEY] = ArrayRecord({"images": Array(_np(images).astype(np.float32)),
                                            "labels": Array(_np(labels).astype(np.int64))})


def record_step(context: Any, images: Any, labels: Any) -> None:
    """Hand one local SGD step's mini-batch to `CaptureMod`, in the order the client takes them (call it in the
    training loop, every step of every epoch). The capture stores each distinct sample once (identified by its
    content) and the sample indices of every step, so the audit's FedAvg unrolling follows the real order of
    a shuffling data loader. Stored only when the mod was made with store_batch=True."""
    from flwr.app import Array, ArrayRecord

    rec = context.state[STEPS_KEY] if STEPS_KEY in context.state.array_records else ArrayRecord()
    i = len(rec) // 2
    rec[f"{i}.images"] = Array(_np(images).astype(np.float32))
    rec[f"{i}.labels"] = Array(_np(labels).astype(np.int64))
    context.state[STEPS_KEY] = rec


def _steps_batch(rec: Any) -> tuple[tuple[np.ndarray, np.ndarray], list[list[int]]]:
    """The distinct samples of the recorded steps (first appearance order) and each step's indices into them."""
    seen: dict[bytes, int] = {}
    images: list[np.ndarray] = []
    labels: list[int] = []
    order = []
    for i in range(len(rec) // 2):
        x, y = rec[f"{i}.images"].numpy(), rec[f"{i}.labels"].numpy()
        step = []
        for xi, yi in zip(x, y):
            key = xi.tobytes() + np.int64(yi).tobytes()
            if key not in seen:
                seen[key] = len(images)
                images.append(xi)
                labels.append(int(yi))
            step.append(seen[key])
        order.append(step)
    return (np.stack(images), np.asarray(labels, np.int64)), order


def describe_mod(mod: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a Flower mod after the capture point does to the update, with giaudit's equivalent defense tables
    (``as``; None when giaudit has none): `LocalDpMod` clips the update (all arrays) to `clipping_norm`, then adds
    Gaussian noise of standard deviation sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon; `fixedclipping_mod`
    and `adaptiveclipping_mod` clip to the norm the server sends in the train config."""
    name = getattr(mod, "__name__", None) or type(mod).__name__
    if name == "LocalDpMod":
        c, sens, eps, delta = (float(getattr(mod, k)) for k in ("clipping_norm", "sensitivity", "epsilon", "delta"))
        sigma = sens * math.sqrt(2.0 * math.log(1.25 / delta)) / eps
        return {"name": name, "params": {"clipping_norm": c, "sensitivity": sens, "epsilon": eps, "delta": delta},
                "before_capture": True,
                "as": [{"name": "clip", "max_norm": c}, {"name": "noise", "sigma": sigma}]}
    if name in ("fixedclipping_mod", "adaptiveclipping_mod"):
        norm = config.get(CLIPPING_NORM_KEY)
        return {"name": name, "params": {"clipping_norm": norm}, "before_capture": True,
                "as": [{"name": "clip", "max_norm": float(norm)}] if isinstance(norm, (int, float)) else None}
    params = {k: v for k, v in getattr(mod, "__dict__", {}).items()
              if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
    return {"name": name, "params": params, "before_capture": True, "as": None}


def describe_strategy(strategy: Any) -> list[dict[str, Any]]:
    """The Flower DP strategy wrappers inside `strategy` (outermost first), seen from a capture that wraps it:
    client-side clipping acts on the clients, before the server receives; server-side clipping and every
    wrapper's noise act at aggregation, after what the server received from each client."""
    out = []
    s = strategy
    while s is not None:
        name = type(s).__name__
        if name.startswith("DifferentialPrivacy"):
            params = {k: getattr(s, k) for k in ("noise_multiplier", "clipping_norm", "num_sampled_clients",
                                                 "initial_clipping_norm", "target_clipped_quantile")
                      if isinstance(getattr(s, k, None), (int, float))}
            if "ClientSide" in name and "Fixed" in name and "clipping_norm" in params:
                out.append({"name": f"{name} (clients clip)", "params": {"clipping_norm": params["clipping_norm"]},
                            "before_capture": True, "as": [{"name": "clip", "max_norm": params["clipping_norm"]}]})
            elif "ClientSide" in name:
                out.append({"name": f"{name} (clients clip)", "params": params, "before_capture": True,
                            "as": None})
            out.append({"name": f"{name} (noise at aggregation)", "params": params, "before_capture": False,
                        "as": None})
        s = getattr(s, "strategy", None)
    return out


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _training(config: Mapping[str, Any], keys: Mapping[str, Sequence[str]], num_examples: int | None,
              fixed: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, names in keys.items():
        out[field] = next((config[n] for n in names if n in config), None)
    out.update({k: v for k, v in fixed.items() if v is not None})
    out["num_examples"] = num_examples
    return out


def _scalars(record: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (record or {}).items() if isinstance(v, (int, float, str, bool))}


class _Capturer:
    def __init__(self, out_dir: str | Path, *, rounds: Iterable[int] | None, clients: Iterable[int | str] | None,
                 input_shape: Sequence[int] | None, num_classes: int | None,
                 value_range: tuple[float, float], config_keys: Mapping[str, Sequence[str] | str] | None,
                 training: Mapping[str, Any] | None, model: Callable[[], Any] | None = None) -> None:
        if model is not None and not input_shape:
            raise ValueError("model: the fingerprint needs input_shape (C, H, W)")
        self.model = model
        self.out_dir = Path(out_dir)
        self.rounds = set(rounds) if rounds is not None else None
        self.clients = {str(c) for c in clients} if clients is not None else None
        self.shape = tuple(int(d) for d in input_shape) if input_shape else None
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.data = {"shape": list(input_shape) if input_shape else None, "num_classes": num_classes,
                     "value_range": list(value_range)}
        keys = dict(DEFAULT_KEYS)
        for k, v in (config_keys or {}).items():
            keys[k] = (v,) if isinstance(v, str) else tuple(v)
        self.keys = keys
        self.fixed = dict(training or {})

    def wanted(self, server_round: int, ids: Iterable[Any]) -> bool:
        if self.rounds is not None and server_round not in self.rounds:
            return False
        return self.clients is None or any(str(i) in self.clients for i in ids if i is not None)

    def write(self, view: str, server_round: int, node: Any, global_arrays: Mapping[str, np.ndarray],
              update_arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], num_examples: int | None,
              extra: Mapping[str, Any], batch: tuple[np.ndarray, np.ndarray] | None = None,
              order: list[list[int]] | None = None) -> Path:
        training = _training(config, self.keys, num_examples, self.fixed)
        if order is not None:
            training["order"] = order
        meta = {"source": "flower", "view": view, "round": server_round, "node": str(node),
                "training": training, "config": _scalars(config), "data": self.data, **extra}
        folder = self.out_dir / f"round-{server_round}" / f"{view}-{node}"
        return write_capture(folder, global_arrays=global_arrays, update_arrays=update_arrays, meta=meta,
                             batch=batch, probe=self._fingerprint(global_arrays))

    def _fingerprint(self, global_arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """The deployed model (the `model` factory with the global arrays loaded) on the fixed probe."""
        if self.model is None:
            return None
        model = self.model()
        model.load_state_dict(match_state(model, global_arrays, "the capture's model factory"))
        return fingerprint(model, self.shape or (), self.value_range)


def _round(msg: Any, config: Mapping[str, Any], seen: dict[str, int]) -> int:
    for key in ("server-round", "server_round", "round"):
        if isinstance(config.get(key), int):
            return int(config[key])
    group = str(getattr(msg.metadata, "group_id", "") or "")
    if group.isdigit():
        return int(group)
    seen["train"] = seen.get("train", 0) + 1  # no round anywhere: count this client's training messages
    return seen["train"]


def _legacy(content: Any, prefix: str) -> bool:
    return f"{prefix}.parameters" in content.array_records


def _incoming(content: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if _legacy(content, "fitins"):
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        ins = compat.recorddict_to_fitins(content, keep_input=True)
        return ({str(i): a for i, a in enumerate(parameters_to_ndarrays(ins.parameters))}, dict(ins.config))
    arrays = content.array_records.get("arrays")
    config = content.config_records.get("config")
    return ({k: v.numpy() for k, v in arrays.items()} if arrays is not None else {}), dict(config or {})


def _outgoing(content: Any) -> tuple[dict[str, np.ndarray], int | None, dict[str, Any]]:
    if _legacy(content, "fitres"):
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        res = compat.recorddict_to_fitres(content, keep_input=True)
        return ({str(i): a for i, a in enumerate(parameters_to_ndarrays(res.parameters))}, int(res.num_examples),
                dict(res.metrics))
    arrays = content.array_records.get("arrays")
    metrics = dict(content.metric_records.get("metrics") or {})
    n = metrics.get("num-examples", metrics.get("num_examples"))
    return ({k: v.numpy() for k, v in arrays.items()} if arrays is not None else {},
            int(n) if n is not None else None, metrics)


class CaptureMod(_Capturer):
    """Client-side Flower mod recording what really leaves the client; place it first in ``mods``.

    `rounds` / `clients` (partition ids from the node config, or node ids) select what is captured (default:
    everything). `input_shape` (C, H, W) and `num_classes` describe the data for the audit. Training details are
    read from the train message's config under `config_keys` (defaults: lr | learning-rate, local-epochs |
    epochs, batch-size); `training` gives fixed values for those the server does not send
    (e.g. ``{"lr": 0.1}``). `store_batch=True` stores the batch given to `record_batch`, or the steps given to
    `record_step` (data owners only). `model` (a function building the deployed model, as the client does)
    stores the deployed model's fingerprint. `followed_by` are the mods that follow this one in the ClientApp
    (its DP and clipping mods); pass ``mods=capture.mods`` to the ClientApp so the capture records them. Without
    `followed_by` the capture cannot know them and the report says "not declared"; ``followed_by=[]`` states
    there are none.
    """

    def __init__(self, out_dir: str | Path, *, rounds: Iterable[int] | None = None,
                 clients: Iterable[int | str] | None = None, store_batch: bool = False,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0),
                 config_keys: Mapping[str, Sequence[str] | str] | None = None,
                 training: Mapping[str, Any] | None = None, model: Callable[[], Any] | None = None,
                 followed_by: Sequence[Any] | None = None) -> None:
        super().__init__(out_dir, rounds=rounds, clients=clients, input_shape=input_shape, num_classes=num_classes,
                         value_range=value_range, config_keys=config_keys, training=training, model=model)
        self.store_batch = store_batch
        self.followed_by = None if followed_by is None else list(followed_by)
        self._seen: dict[str, int] = {}

    @property
    def mods(self) -> list[Any]:
        """The ClientApp's mod list: this capture first, then the mods it was told follow it."""
        return [self, *(self.followed_by or ())]

    def __call__(self, msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        from flwr.app import MessageType

        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        global_arrays, config = _incoming(msg.content)
        server_round = _round(msg, config, self._seen)
        partition = context.node_config.get("partition-id")
        reply = call_next(msg, context)
        batch_rec = context.state.array_records.pop(BATCH_KEY, None) if BATCH_KEY in context.state else None
        steps_rec = context.state.array_records.pop(STEPS_KEY, None) if STEPS_KEY in context.state else None
        if reply.has_error() or not self.wanted(server_round, (partition, context.node_id)):
            return reply
        update_arrays, num_examples, metrics = _outgoing(reply.content)
        batch = order = None
        if self.store_batch and steps_rec is not None and len(steps_rec):
            batch, order = _steps_batch(steps_rec)
        elif self.store_batch and batch_rec is not None:
            batch = (batch_rec["images"].numpy(), batch_rec["labels"].numpy())
        name = partition if partition is not None else context.node_id
        extra: dict[str, Any] = {"partition_id": partition, "node_id": str(context.node_id),
                                 "metrics": _scalars(metrics)}
        if self.followed_by is not None:
            extra["deployment_defenses"] = [describe_mod(m, config) for m in self.followed_by]
        self.write("client", server_round, name, global_arrays, update_arrays, config, num_examples, extra,
                   batch, order)
        return reply


class CaptureStrategy(_Capturer):
    """Wrap a Flower (legacy API) strategy; record, per client, what the server receives (the server's view).

    Every method is the wrapped strategy's; `configure_fit` remembers the global parameters and each client's
    config, `aggregate_fit` writes one capture per selected client before aggregating as usual. The DP wrappers
    inside `strategy` are recorded (`describe_strategy`); `model` stores the deployed model's fingerprint.
    """

    def __init__(self, strategy: Any, out_dir: str | Path, *, rounds: Iterable[int] | None = None,
                 clients: Iterable[int | str] | None = None, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 config_keys: Mapping[str, Sequence[str] | str] | None = None,
                 training: Mapping[str, Any] | None = None, model: Callable[[], Any] | None = None) -> None:
        super().__init__(out_dir, rounds=rounds, clients=clients, input_shape=input_shape, num_classes=num_classes,
                         value_range=value_range, config_keys=config_keys, training=training, model=model)
        self.strategy = strategy
        self._sent: dict[int, tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["strategy"], name)

    def __repr__(self) -> str:
        return f"CaptureStrategy({self.strategy!r})"

    def initialize_parameters(self, client_manager: Any) -> Any:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        from flwr.common import parameters_to_ndarrays

        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        arrays = {str(i): a for i, a in enumerate(parameters_to_ndarrays(parameters))}
        self._sent[server_round] = (arrays, {str(c.cid): dict(ins.config) for c, ins in instructions})
        return instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        from flwr.common import parameters_to_ndarrays

        arrays, configs = self._sent.pop(server_round, ({}, {}))
        for client, res in results:
            cid = str(client.cid)
            if not self.wanted(server_round, (cid,)):
                continue
            upd = {str(i): a for i, a in enumerate(parameters_to_ndarrays(res.parameters))}
            self.write("server", server_round, cid, arrays, upd, configs.get(cid, {}), int(res.num_examples),
                       {"metrics": _scalars(res.metrics), "deployment_defenses": describe_strategy(self.strategy)})
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return self.strategy.evaluate(server_round, parameters)
