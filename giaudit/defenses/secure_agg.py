"""Secure aggregation: the server sees only the sum of N clients' updates.

Bonawitz et al. 2017 ("Practical secure aggregation for privacy-preserving
machine learning"): masks that cancel in the sum let the server learn
sum_i u_i and nothing else about any single u_i. We simulate the result, not
the cryptography: the audited client's update plus those of N - 1 other
clients, each computing the same step (same model, protocol, batch size,
sampler and targets) on its own batch drawn from the same data pool (IID
clients: the hardest case for the attacker would be non-IID, the easiest is
this). What is shared is the sum, as the protocol delivers it; N is public.

Order in a chain: the other clients copy the client step as configured by the
defenses *before* this one, so `secure_agg` must come after defenses that
change how an update is computed (dpsgd, large_batch, label_disguise;
`build_chain` checks this). Transforms (noise, clip, top-k) run after every
configure hook, on what the server receives: here the aggregate, i.e. they
model a central mechanism. Noise each client adds itself belongs inside the
client's step: use dpsgd before secure_agg.

Threat model: honest-but-curious server; it knows N (disclosed) and the
audited client's batch size, and attacks the aggregate.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, RngTap, register
from giaudit.device import to_model
from giaudit.errors import ParamError
from giaudit.types import ClientProtocol, SharedUpdate


@register("secure_agg")
class SecureAggregation(RegisteredDefense):
    aggregation_only = True

    def __init__(self, *, clients: int) -> None:
        if clients < 1:
            raise ParamError("clients", "must be >= 1 (the audited client counts)")
        self.clients = int(clients)

    def configure(self, step: ClientStep) -> ClientStep:
        if self.clients == 1:
            return step
        pool = step.context.get("pool")
        if pool is None:
            raise self.fail("clients", "secure aggregation needs the client's data pool in ClientStep.context['pool']")
        tap = RngTap(step)
        inner_compute, inner_sampler, inner_targets = step.compute, step.sampler, step.targets
        batch_size, num_classes, others = step.batch_size, step.num_classes, self.clients - 1

        def compute(model: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol) -> tuple[Tensor, ...]:
            # Every client starts from the same global model: copy it before the audited client's step.
            start = copy.deepcopy(model)
            total = [t.detach() for t in inner_compute(model, x, y, protocol)]
            gen = tap.generator()
            for _ in range(others):
                idx = inner_sampler(pool.labels, batch_size, gen)
                # The other clients' batches come from the (CPU) pool and go where the model computes.
                xo = to_model(pool.images[idx], start)
                yo = to_model(inner_targets(pool.labels[idx], num_classes), start)
                u = inner_compute(copy.deepcopy(start), xo, yo, protocol)
                total = [a + b.detach() for a, b in zip(total, u)]
            return tuple(total)

        return step.with_(sampler=tap.sampler, compute=compute)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"secure_agg_clients": self.clients}
