"""Large client batches.

Averaging the gradient over many samples dilutes each one's signal: every
inversion attack degrades with the batch size (Geiping et al. 2020, section 6;
Jeon et al. 2021, NeurIPS, appendix F, "Using large mini-batch"). The defense
sets the client's batch size; the attacker still knows the size (class B
basic knowledge), never the samples.

Threat model: unchanged; the server learns the batch size as before, through
the threat model's `batch_size` capability (nothing extra is disclosed).
"""
from __future__ import annotations

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.errors import ParamError


@register("large_batch")
class LargeBatch(RegisteredDefense):
    changes_step = True

    def __init__(self, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ParamError("batch_size", "must be >= 1")
        self.batch_size = int(batch_size)

    def configure(self, step: ClientStep) -> ClientStep:
        pool = step.context.get("pool")
        if pool is not None and self.batch_size > len(pool):
            raise self.fail("batch_size", f"{self.batch_size} is larger than the client's data pool "
                            f"({len(pool)} images)")
        return step.with_(batch_size=self.batch_size)
