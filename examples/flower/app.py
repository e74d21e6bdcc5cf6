"""A minimal Flower app whose client updates giaudit captures, then audits.

    python examples/flower/app.py --out captures          # 2 clients, 1 round, batch 1, one local SGD step
    python examples/flower/app.py --out captures-dp --dp  # the same with Flower's LocalDpMod after the capture
    giaudit audit examples/flower/audit.toml              # reconstruct client 0's digit from its captured update

The capture mod is first in the mod list, so it records what leaves the client after LocalDpMod. Being the
data owner here, the client hands its batch to the mod (store_batch=True) so the audit can measure the leakage.
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
from task import client_batch, make_model  # noqa: E402

from giaudit.integrations.flower import CaptureMod, CaptureStrategy, record_batch  # noqa: E402


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


def build_apps(out: Path, dp: bool) -> tuple[ServerApp, ClientApp]:
    mods = [CaptureMod(out, store_batch=True, input_shape=(1, 32, 32), num_classes=10)]
    if dp:
        mods.append(LocalDpMod(clipping_norm=1.0, sensitivity=0.1, epsilon=10.0, delta=1e-5))
    client_app = ClientApp(client_fn=lambda context: DigitClient(context).to_client(), mods=mods)

    def server_fn(context: Context) -> ServerAppComponents:
        init = ndarrays_to_parameters([v.detach().numpy() for v in make_model().state_dict().values()])
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                          initial_parameters=init,
                          on_fit_config_fn=lambda rnd: {"lr": 0.1, "local-epochs": 1, "batch-size": 1})
        wrapped = CaptureStrategy(strategy, out / "server", input_shape=(1, 32, 32), num_classes=10)
        return ServerAppComponents(strategy=wrapped, config=ServerConfig(num_rounds=1))

    return ServerApp(server_fn=server_fn), client_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="captures", help="capture folder")
    p.add_argument("--dp", action="store_true", help="add Flower's LocalDpMod after the capture mod")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server_app, client_app = build_apps(Path(args.out).resolve(), args.dp)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


if __name__ == "__main__":
    main()
