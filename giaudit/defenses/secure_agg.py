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
audited client's batch size, and attacks the aggregate. A malicious server
that chooses which clients take part (SoK class H) can run the round again
without the audited client: ``ClientStep.context["without_audited"]`` is that
round, the same other clients recomputing on the same batches from the given
model, with fresh randomness for the defenses inside their steps (DP-SGD's
noise is drawn anew: a second round draws its own).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
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

        def other_clients(start: nn.Module, protocol: ClientProtocol,
                          fresh: torch.Generator | None) -> Iterator[tuple[Tensor, ...]]:
            """The other clients' updates from `start`, on the batches the round's seed draws. `fresh`: a
            generator that re-arms the randomness of the defenses inside their steps after each batch is drawn
            (the same batches, new draws: a second round)."""
            gen = tap.generator()
            for _ in range(others):
                idx = inner_sampler(pool.labels, batch_size, gen)
                if fresh is not None:
                    inner_sampler(pool.labels, batch_size, fresh)  # its batch unused: it reseeds the inner defenses
                # The other clients' batches come from the (CPU) pool and go where the model computes.
                xo = to_model(pool.images[idx], start)
                yo = to_model(inner_targets(pool.labels[idx], num_classes), start)
                yield tuple(t.detach() for t in inner_compute(copy.deepcopy(start), xo, yo, protocol))

        def compute(model: nn.Module, x: Tensor, y: Tensor, protocol: ClientProtocol) -> tuple[Tensor, ...]:
            # Every client starts from the same global model: copy it before the audited client's step.
            start = copy.deepcopy(model)
            total = [t.detach() for t in inner_compute(model, x, y, protocol)]
            for u in other_clients(start, protocol, None):
                total = [a + b for a, b in zip(total, u)]
            return tuple(total)

        def without_audited(model: nn.Module, protocol: ClientProtocol,
                            fresh: torch.Generator) -> tuple[Tensor, ...]:
            """The same round without the audited client: the sum of the other clients' updates from `model`."""
            total: list[Tensor] | None = None
            for u in other_clients(copy.deepcopy(model), protocol, fresh):
                total = list(u) if total is None else [a + b for a, b in zip(total, u)]
            assert total is not None  # clients > 1: at least one other client
            return tuple(total)

        return step.with_(sampler=tap.sampler, compute=compute,
                          context={**step.context, "without_audited": without_audited})

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"secure_agg_clients": self.clients}
