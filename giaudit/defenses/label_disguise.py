"""Label disguise: batches and targets that defeat label recovery.

Jeon et al. 2021 (GIAS, NeurIPS, appendix F, "Disguising label
information") observe that a recovered label shrinks the attacker's search
(their conditional generator needs it) and suggest that clients build each
mini-batch from a fixed number of distinct labels, fewer than the batch size
but not too few, so each label repeats and the label multiset is harder to
read from the last layer. `labels_per_batch` implements that sampler: it
draws `labels_per_batch` classes and spreads the batch evenly over them.

Two target-side variants are added (they act even at batch size 1):
- `smoothing`: label smoothing, target (1 - s) onehot(y) + s / K.
- `mix`: each sample's target puts weight `mix` on a decoy class drawn
  uniformly from the other K - 1 classes, afresh every round. With
  mix > 1 - mix the decoy dominates the *shared* gradient's last layer, so
  iDLG-style recovery reads the decoy; the *expected* target still peaks on
  the true class as long as mix < (K - 1)(1 - s) / K, so the model still
  learns the task (the utility measurement shows what it costs).

Threat model: honest-but-curious server that knows the scheme and its
parameters (disclosed), not the decoys.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.errors import ParamError
from giaudit.registry import check_number
from giaudit.types import SharedUpdate


def spread_sampler(labels: Tensor, batch_size: int, n_labels: int, generator: torch.Generator) -> Tensor:
    """Indices of a batch drawn from exactly `n_labels` classes, spread as evenly as possible."""
    per = [batch_size // n_labels + (1 if i < batch_size % n_labels else 0) for i in range(n_labels)]
    classes, counts = torch.unique(labels, return_counts=True)
    eligible = classes[counts >= per[0]]
    if eligible.numel() < n_labels:
        raise ValueError(f"only {eligible.numel()} classes have {per[0]} images; cannot build a batch of "
                         f"{batch_size} from {n_labels} labels")
    chosen = eligible[torch.randperm(eligible.numel(), generator=generator, device=generator.device)[:n_labels]]
    parts = []
    for c, n in zip(chosen.tolist(), per):
        members = torch.nonzero(labels == c).view(-1)
        parts.append(members[torch.randperm(members.numel(), generator=generator, device=generator.device)[:n]])
    idx = torch.cat(parts)
    return idx[torch.randperm(idx.numel(), generator=generator, device=generator.device)]


@register("label_disguise")
class LabelDisguise(RegisteredDefense):
    changes_step = True

    def __init__(self, *, labels_per_batch: int | None = None, mix: float = 0.0, smoothing: float = 0.0) -> None:
        if labels_per_batch is not None and labels_per_batch < 1:
            raise ParamError("labels_per_batch", "must be >= 1")
        check_number("mix", mix, low=0.0, high=1.0)
        check_number("smoothing", smoothing, low=0.0, high=1.0)
        if mix + smoothing >= 1.0:
            raise ParamError("mix", "mix + smoothing must be < 1 (the true class must keep some weight)")
        if labels_per_batch is None and mix == 0 and smoothing == 0:
            raise ParamError("labels_per_batch", "set labels_per_batch, mix or smoothing (all off does nothing)")
        self.labels_per_batch, self.mix, self.smoothing = labels_per_batch, float(mix), float(smoothing)

    def configure(self, step: ClientStep) -> ClientStep:
        k = step.num_classes
        if self.labels_per_batch is not None:
            if self.labels_per_batch > step.batch_size:
                raise self.fail("labels_per_batch", f"{self.labels_per_batch} is larger than the batch size "
                                f"({step.batch_size}); put label_disguise after large_batch or lower it")
            if self.labels_per_batch > k:
                raise self.fail("labels_per_batch", f"{self.labels_per_batch} is more than the {k} classes")
        if self.mix > 0 and k < 2:
            raise self.fail("mix", "needs at least two classes")
        if self.mix > 0 and not self.mix < (k - 1) * (1 - self.smoothing) / k:
            raise self.fail("mix", f"must be < {(k - 1) * (1 - self.smoothing) / k:.3f} for {k} classes: above "
                            "it the expected target favours a wrong class and the model cannot learn")
        inner_sampler, inner_targets = step.sampler, step.targets
        n_labels, mix, smoothing = self.labels_per_batch, self.mix, self.smoothing
        decoys: dict[str, Tensor] = {}

        def sampler(labels: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
            if n_labels is not None:
                try:
                    idx = spread_sampler(labels, batch_size, min(n_labels, batch_size), generator)
                except ValueError as exc:
                    raise self.fail("labels_per_batch", str(exc)) from None
            else:
                idx = inner_sampler(labels, batch_size, generator)
            if mix > 0:
                # A decoy class != the true one, uniform over the other K-1, drawn from the scenario's generator.
                y = labels[idx]
                shift = torch.randint(0, k - 1, y.shape, generator=generator, device=generator.device)
                decoys["current"] = (y + 1 + shift) % k
            return idx

        def targets(y: Tensor, num_classes: int) -> Tensor:
            base = inner_targets(y, num_classes)
            if mix == 0 and smoothing == 0:
                return base
            soft = F.one_hot(base, num_classes).float() if base.dtype in (torch.int64, torch.int32) else base
            out = soft * (1.0 - mix - smoothing) + smoothing / num_classes
            if mix > 0:
                d = decoys.get("current")
                if d is None or d.shape != y.shape:
                    raise RuntimeError("label_disguise: the step's sampler must draw the batch before its targets")
                out = out + mix * F.one_hot(d, num_classes).float()
            return out

        return step.with_(sampler=sampler, targets=targets)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        return {"labels_per_batch": self.labels_per_batch, "label_mix": self.mix, "label_smoothing": self.smoothing}
