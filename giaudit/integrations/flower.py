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
  `record_batch`; that batch is the audit's ground truth.
- `CaptureStrategy`, a server-side wrapper around a Flower (legacy API)
  strategy, recording what an honest-but-curious server receives from each
  client: the global parameters it sent, each client's returned parameters,
  config and number of examples. Under secure aggregation the server only
  receives the aggregate, and that is all this view can hold.

Both the legacy message layout (``NumPyClient``; the form Flower's own
``LocalDpMod`` works on) and the Message API layout (``arrays`` /
``config`` / ``metrics`` records) are understood.

Then ``giaudit audit`` with ``[scenario] capture = "OUT/round-1/client-<node>"``
and ``model_factory = "module:function"`` audits the captured update (see
examples/flower/).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from giaudit.scenario.capture import write_capture

BATCH_KEY = "giaudit.batch"
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
                 training: Mapping[str, Any] | None) -> None:
        self.out_dir = Path(out_dir)
        self.rounds = set(rounds) if rounds is not None else None
        self.clients = {str(c) for c in clients} if clients is not None else None
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
              extra: Mapping[str, Any], batch: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
        meta = {"source": "flower", "view": view, "round": server_round, "node": str(node),
                "training": _training(config, self.keys, num_examples, self.fixed), "config": _scalars(config),
                "data": self.data, **extra}
        folder = self.out_dir / f"round-{server_round}" / f"{view}-{node}"
        return write_capture(folder, global_arrays=global_arrays, update_arrays=update_arrays, meta=meta,
                             batch=batch)


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
    (e.g. ``{"lr": 0.1}``). `store_batch=True` stores the batch given to `record_batch` (data owners only).
    """

    def __init__(self, out_dir: str | Path, *, rounds: Iterable[int] | None = None,
                 clients: Iterable[int | str] | None = None, store_batch: bool = False,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0),
                 config_keys: Mapping[str, Sequence[str] | str] | None = None,
                 training: Mapping[str, Any] | None = None) -> None:
        super().__init__(out_dir, rounds=rounds, clients=clients, input_shape=input_shape, num_classes=num_classes,
                         value_range=value_range, config_keys=config_keys, training=training)
        self.store_batch = store_batch
        self._seen: dict[str, int] = {}

    def __call__(self, msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
        from flwr.app import MessageType

        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        global_arrays, config = _incoming(msg.content)
        server_round = _round(msg, config, self._seen)
        partition = context.node_config.get("partition-id")
        reply = call_next(msg, context)
        batch_rec = context.state.array_records.pop(BATCH_KEY, None) if BATCH_KEY in context.state else None
        if reply.has_error() or not self.wanted(server_round, (partition, context.node_id)):
            return reply
        update_arrays, num_examples, metrics = _outgoing(reply.content)
        batch = None
        if self.store_batch and batch_rec is not None:
            batch = (batch_rec["images"].numpy(), batch_rec["labels"].numpy())
        name = partition if partition is not None else context.node_id
        self.write("client", server_round, name, global_arrays, update_arrays, config, num_examples,
                   {"partition_id": partition, "node_id": str(context.node_id), "metrics": _scalars(metrics)},
                   batch)
        return reply


class CaptureStrategy(_Capturer):
    """Wrap a Flower (legacy API) strategy; record, per client, what the server receives (the server's view).

    Every method is the wrapped strategy's; `configure_fit` remembers the global parameters and each client's
    config, `aggregate_fit` writes one capture per selected client before aggregating as usual.
    """

    def __init__(self, strategy: Any, out_dir: str | Path, *, rounds: Iterable[int] | None = None,
                 clients: Iterable[int | str] | None = None, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                 config_keys: Mapping[str, Sequence[str] | str] | None = None,
                 training: Mapping[str, Any] | None = None) -> None:
        super().__init__(out_dir, rounds=rounds, clients=clients, input_shape=input_shape, num_classes=num_classes,
                         value_range=value_range, config_keys=config_keys, training=training)
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
                       {"metrics": _scalars(res.metrics)})
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return self.strategy.evaluate(server_round, parameters)
