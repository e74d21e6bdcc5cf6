"""A minimal Flower app whose client updates giaudit captures, then audits.

    python examples/flower/app.py --out captures          # 2 clients, 1 round, batch 1, one local SGD step
    python examples/flower/app.py --out captures-dp --dp  # the same with Flower's LocalDpMod after the capture
    giaudit audit examples/flower/audit.toml              # reconstruct client 0's digit from its captured update

    python examples/flower/app.py --out captures-bn --bn  # a BatchNorm CNN, 2 digits per client, a shuffling
                                                          # DataLoader of batch 1 over 2 local epochs
    giaudit audit examples/flower/audit_bn.toml           # its audit follows the steps the client really took

The capture mod is first in the mod list (``mods=capture.mods``), so it records what leaves the client after
LocalDpMod, and it records LocalDpMod itself (``followed_by``) for the report. Being the data owner here, the
client hands its data to the mod (store_batch=True): the whole batch with `record_batch`, or step by step with
`record_step` when it shuffles, so the audit can measure the leakage. ``model=`` stores a fingerprint of the
deployed model, against which the audit checks its model factory.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.client.mod import LocalDpMod  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from task import BN_SIZE, client_batch, make_bn_model, make_model  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from giaudit.integrations.flower import CaptureMod, CaptureStrategy, record_batch, record_step  # noqa: E402

# The BatchNorm variant: each client holds BN_DIGITS digits and trains BN_EPOCHS epochs of SGD on batches of
# BN_BATCH from a shuffling DataLoader (seeded per client, so a rerun takes the same steps).
BN_DIGITS, BN_EPOCHS, BN_BATCH = 2, 2, 1


class DigitClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.context = context
        self.model = make_model()
        self.partition = int(context.node_config["partition-id"])

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        return [v.detach().numpy() for v in self.model.state_dict().values()]

    def set_parameters(self, arrays) -> None:  # type: ignore[no-untyped-def]
        keys = list(self.model.state_dict())
        self.model.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays)})

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        self.set_parameters(parameters)
        x, y = client_batch(self.partition, int(config["batch-size"]))
        record_batch(self.context, x, y)  # the data owner's evaluation flag: the audit's ground truth
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["lr"]))
        self.model.train()
        for _ in range(int(config["local-epochs"])):
            for i in range(0, len(x), int(config["batch-size"])):
                opt.zero_grad()
                xb, yb = x[i:i + int(config["batch-size"])], y[i:i + int(config["batch-size"])]
                torch.nn.functional.cross_entropy(self.model(xb), yb).backward()
                opt.step()
        return self.get_parameters({}), len(x), {}


class ShufflingBNClient(DigitClient):
    """The BatchNorm variant's client: a shuffling DataLoader, every step handed to the capture."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.model = make_bn_model()

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        self.set_parameters(parameters)
        x, y = client_batch(self.partition, BN_DIGITS, size=BN_SIZE)
        loader = DataLoader(TensorDataset(x, y), batch_size=int(config["batch-size"]), shuffle=True,
                            generator=torch.Generator().manual_seed(self.partition + 1))
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["lr"]))
        self.model.train()
        for _ in range(int(config["local-epochs"])):
            for xb, yb in loader:
                record_step(self.context, xb, yb)  # the data owner's evaluation flag, in the order taken
                opt.zero_grad()
                torch.nn.functional.cross_entropy(self.model(xb), yb).backward()
                opt.step()
        return self.get_parameters({}), len(x), {}


def build_apps(out: Path, dp: bool, bn: bool = False) -> tuple[ServerApp, ClientApp]:
    factory, shape = (make_bn_model, (1, BN_SIZE, BN_SIZE)) if bn else (make_model, (1, 32, 32))
    client_cls = ShufflingBNClient if bn else DigitClient
    after = [LocalDpMod(clipping_norm=1.0, sensitivity=0.1, epsilon=10.0, delta=1e-5)] if dp else []
    capture = CaptureMod(out, store_batch=True, input_shape=shape, num_classes=10, model=factory, followed_by=after)
    client_app = ClientApp(client_fn=lambda context: client_cls(context).to_client(), mods=capture.mods)
    fit_config = {"lr": 0.1, "local-epochs": BN_EPOCHS if bn else 1, "batch-size": BN_BATCH if bn else 1}

    def server_fn(context: Context) -> ServerAppComponents:
        init = ndarrays_to_parameters([v.detach().numpy() for v in factory().state_dict().values()])
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                          initial_parameters=init, on_fit_config_fn=lambda rnd: dict(fit_config))
        wrapped = CaptureStrategy(strategy, out / "server", input_shape=shape, num_classes=10, model=factory)
        return ServerAppComponents(strategy=wrapped, config=ServerConfig(num_rounds=1))

    return ServerApp(server_fn=server_fn), client_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="captures", help="capture folder")
    p.add_argument("--dp", action="store_true", help="add Flower's LocalDpMod after the capture mod")
    p.add_argument("--bn", action="store_true", help="the BatchNorm CNN with a shuffling DataLoader over 2 epochs")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server_app, client_app = build_apps(Path(args.out).resolve(), args.dp, args.bn)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


if __name__ == "__main__":
    main()
