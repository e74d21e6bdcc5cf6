"""A federated client computing its shared update on a private batch.

The scenario owns the global model and the data pool. `simulate()` draws the
private batch, runs the client's step (FedSGD: one gradient of the mean loss;
FedAvg: E epochs of local SGD over ordered mini-batches, sharing w_after -
w_before), passes the update through the defenses, and returns two objects:
the attacker's `Observation` and the `GroundTruth`, split where the batch is
drawn. The global model the attacker receives is a copy taken before the
client trains, so BN running statistics the client moves do not leak through it.

The server step: an honest-but-curious server (SoK classes A-E) sends the
agreed global model. A malicious one (F-H) sends another (`Scenario.served`,
made by an active attack's `serve` with `Scenario.serve`): every client then
computes its update on the model it received, and every defense applies as
usual (secure aggregation's other clients received it too). Defenses find the
model the server sent under ``context["served_model"]`` and the agreed one
under ``context["agreed_model"]`` (what a client can check, e.g.
model_validation); ``context["model"]`` is the model the client trains, which
a defense may replace (DP-SGD's GroupNorm conversion).

A malicious server that chooses which clients take part (SoK class H, `Capability.SELECTS_CLIENTS`) also runs
the round again without the audited client: the other clients of secure aggregation recompute on the same
model and their same batches, every defense applies as usual with fresh randomness (noise drawn anew, so it
does not cancel), and the attacker gets that round's update as `Observation.without_client`. Without
aggregation the round without the audited client has no client: nothing is sent (zeros).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from giaudit.data import ImageDataset
from giaudit.defenses.base import SAMPLERS, Chain, ClientStep, Defense
from giaudit.device import to_model
from giaudit.errors import ConfigError
from giaudit.fl import BNStatsRecorder
from giaudit.threat import observe
from giaudit.types import Capability, ClientProtocol, GroundTruth, Observation, SharedUpdate, ThreatModel


def pretrain(model: nn.Module, data: ImageDataset, steps: int, generator: torch.Generator,
             lr: float = 0.05, batch_size: int = 64) -> nn.Module:
    """Train the global model for `steps` SGD steps (the "trained for N steps" setting), on the model's device
    (the batches are drawn on the CPU)."""
    if steps <= 0:
        return model
    was_training = model.training
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=generator, device=generator.device)
        opt.zero_grad(set_to_none=True)
        x, y = to_model(data.images[idx], model), to_model(data.labels[idx], model)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.train(was_training)
    return model


def configure_client(pool: ImageDataset, model: nn.Module, protocol: ClientProtocol, batch_size: int,
                     defenses: Chain | Defense | None, generator: torch.Generator | None,
                     client_data: str = "iid", agreed: nn.Module | None = None
                     ) -> tuple[torch.Generator, Chain, ClientStep]:
    """The client's step as its defenses configure it, checked against its pool (every scenario starts here).
    `client_data` names how the private batch is drawn (`SAMPLERS`: iid, or one_label for one user's batch).
    `model` is the global model the server sent; `agreed` the one the federation agreed on (None: the same).

    Returns the generator (seed 0 when none is given), the defenses as one chain, and the configured step.
    """
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
    defense = defenses if isinstance(defenses, Chain) else Chain([defenses] if defenses is not None else [])
    step = defense.configure(ClientStep(protocol, batch_size, pool.spec.num_classes, sampler=SAMPLERS[client_data],
                                        context={"pool": pool, "model": model, "served_model": model,
                                                 "agreed_model": model if agreed is None else agreed}))
    if step.batch_size > len(pool):
        raise ConfigError(f"scenario.batch_size: {step.batch_size} is larger than the data pool "
                          f"({len(pool)} images)")
    return gen, defense, step


# A malicious server's change of the global model (an active attack's `serve` with its other arguments bound).
ServerStep = Callable[[nn.Module], nn.Module]


@dataclass
class Scenario:
    model: nn.Module          # the agreed global model, in the BN mode the client uses
    pool: ImageDataset        # the client's private data pool
    protocol: ClientProtocol
    batch_size: int
    threat: ThreatModel
    client_data: str = "iid"  # how the private batch is drawn (configure_client)
    served: nn.Module | None = None  # the model a malicious server sends instead of `model`; None: the agreed one

    def serve(self, step: ServerStep) -> Scenario:
        """This scenario with a malicious server: it sends `step(model)` instead of the agreed model."""
        return dataclasses.replace(self, served=step(self.model))

    def simulate(self, defenses: Chain | Defense | None = None,
                 generator: torch.Generator | None = None) -> tuple[Observation, GroundTruth]:
        sent = self.model if self.served is None else self.served
        gen, defense, step = configure_client(self.pool, sent, self.protocol, self.batch_size, defenses,
                                              generator, self.client_data, agreed=self.model)
        # A defense may replace the global model (DP-SGD converting BatchNorm to
        # GroupNorm); the client trains, and the attacker observes, that model.
        global_model = step.context.get("model", sent)
        idx = step.sampler(self.pool.labels, step.batch_size, gen)
        batch = self.pool.subset(idx)
        truth = GroundTruth(batch.images.clone(), batch.labels.clone(), batch.meta)

        client_model = copy.deepcopy(global_model)
        recorder = BNStatsRecorder(client_model, detach=True)
        # The private batch goes to the model's device for the client's step; the ground truth stays on the CPU.
        targets = to_model(step.targets(batch.labels, step.num_classes), client_model)
        tensors = step.compute(client_model, to_model(batch.images, client_model), targets, step.protocol)
        bn_stats = recorder.take() if recorder.layers else None
        recorder.close()
        kind: Literal["gradient", "delta"] = "gradient" if step.protocol.name == "fedsgd" else "delta"
        update = defense.transform(SharedUpdate(tuple(t.detach() for t in tensors), kind), gen)
        without = without_client(step, global_model, defense, update, gen) \
            if self.threat.has(Capability.SELECTS_CLIENTS) else None

        obs = observe(model=copy.deepcopy(global_model), update=update, data_spec=self.pool.spec,
                      threat=self.threat, batch_size=step.batch_size, protocol=step.protocol,
                      labels=to_model(batch.labels, global_model), bn_statistics=bn_stats,
                      disclosed=defense.disclosures(update), without_client=without)
        return obs, truth


def without_client(step: ClientStep, model: nn.Module, defense: Chain, update: SharedUpdate,
                   generator: torch.Generator) -> SharedUpdate:
    """The round run again without the audited client, on `model`: the other clients of secure aggregation
    (``step.context["without_audited"]``) on their same batches, then the chain's transforms, all with fresh
    randomness drawn from `generator`; zeros when the round has no other client."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    fresh = torch.Generator(device=generator.device).manual_seed(seed)
    rerun = step.context.get("without_audited")
    if rerun is None:
        return SharedUpdate(tuple(torch.zeros_like(t) for t in update.tensors), update.kind)
    tensors = rerun(model, step.protocol, fresh)
    return defense.transform(SharedUpdate(tuple(t.detach() for t in tensors), update.kind), fresh)
