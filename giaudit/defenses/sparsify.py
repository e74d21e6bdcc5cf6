"""Gradient sparsification: top-k per layer or global, random masks, DGC error feedback.

- Top-k by magnitude per layer: the "gradient pruning" defense of Zhu et al.
  2019 (DLG, section 5.2) and the sparsity axis of Jeon et al. 2021 (NeurIPS,
  figure 5: "sparsity 0.99 removes the 99 % smallest entries at each layer").
- Global top-k: one magnitude threshold over all layers together.
- Random masking: each layer keeps a uniformly random subset (`k` entries, or
  each entry with probability 1 - sparsity); `rescale` divides the kept
  entries by their keep rate so the update stays unbiased.
- Error feedback (Lin et al. 2018, Deep Gradient Compression): what a client
  did not send is added to its next update, so over FedAvg rounds nothing is
  lost. The residual is per client: the caller passes a dict in
  `ClientStep.context["client_state"]` that persists across that client's
  rounds (giaudit.utility does). Without it (the audited round) the residual
  is zero, i.e. the observed round is the client's first. DGC's momentum
  correction and warm-up are not modelled.

Threat model: an honest-but-curious server; it sees which entries are zero
(the mask) and knows the sparsity level (disclosed), which an adaptive attack
replays on its trial update (`SparsifyReplay`): when the observed mask is
visible, it keeps only the entries the client sent (exact for top-k and random
masks alike, a constant mask); when noise added later hid the mask, it applies
the same top-k to the trial (per layer, or one global threshold for
`topk_global`) at the configured level. A hidden random mask cannot be
replayed. The mask counts as visible when the observed update has at least
half the zeros the configured level implies.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from giaudit.defenses.base import ClientStep
from giaudit.defenses.registry import RegisteredDefense, register
from giaudit.errors import ParamError
from giaudit.ops import keep_count, keep_largest
from giaudit.registry import check_number
from giaudit.types import ReplayFn, ReplayRule, SharedUpdate

MODES = ("topk", "topk_global", "random")


def topk_mask(t: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly `k` largest-magnitude entries of `t` (ties broken by torch.topk)."""
    flat = t.reshape(-1).abs()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(t)


@dataclass(frozen=True)
class SparsifyReplay:
    mode: str
    sparsity: float | None
    k: int | None

    def build(self, observed: tuple[Tensor, ...], batch_size: int | None,
              kind: str) -> tuple[str, ReplayFn] | None:
        sizes = [t.numel() for t in observed]
        total = sum(sizes) or 1
        if self.k is not None:
            kept = self.k if self.mode == "topk_global" else sum(min(self.k, n) for n in sizes)
            expected = 1.0 - kept / total
        else:
            expected = float(self.sparsity or 0.0)
        zeros = sum(int((t == 0).sum()) for t in observed) / total
        level = f"k{self.k}" if self.k is not None else f"{float(self.sparsity or 0.0):g}"
        if zeros > 0 and zeros >= 0.5 * expected:
            masks = tuple((t != 0).to(t.dtype) for t in observed)
            return "observed_mask", lambda ts: tuple(t * m for t, m in zip(ts, masks))
        if self.mode == "topk":
            counts = tuple(keep_count(n, self.sparsity, self.k) for n in sizes)
            return f"topk_{level}", lambda ts: tuple(keep_largest((t,), c)[0] for t, c in zip(ts, counts))
        if self.mode == "topk_global":
            count = keep_count(total, self.sparsity, self.k)
            return f"topk_global_{level}", lambda ts: keep_largest(ts, count)
        return None


@register("sparsify")
class Sparsify(RegisteredDefense):
    def __init__(self, *, mode: Literal["topk", "topk_global", "random"] = "topk", sparsity: float | None = None,
                 k: int | None = None, error_feedback: bool = False, rescale: bool = False) -> None:
        if (sparsity is None) == (k is None):
            raise ParamError("sparsity", "set exactly one of sparsity (fraction removed, e.g. 0.9) or k "
                             "(entries kept per layer; in total for topk_global)")
        check_number("sparsity", sparsity, low=0.0)
        if sparsity is not None and sparsity >= 1.0:
            raise ParamError("sparsity", "must be < 1 (1 would send nothing)")
        if k is not None and k < 1:
            raise ParamError("k", "must be >= 1")
        if rescale and mode != "random":
            raise ParamError("rescale", "only random masks are rescaled (top-k keeps the largest entries as they are)")
        self.mode, self.sparsity, self.k = mode, sparsity, k
        self.error_feedback, self.rescale = error_feedback, rescale
        self._state: dict[str, Any] | None = None

    # -- the model's layer sizes are known only once the scenario configures the step
    def _check_sizes(self, sizes: list[tuple[str, int]]) -> None:
        if self.k is None:
            return
        if self.mode == "topk_global":
            total = sum(n for _, n in sizes)
            if self.k > total:
                raise self.fail("k", f"{self.k} is larger than the model ({total} entries)")
            return
        small = [(name, n) for name, n in sizes if self.k > n]
        if small:
            name, n = min(small, key=lambda s: s[1])
            raise self.fail("k", f"{self.k} is larger than layer {name} ({n} entries); use a k of at most "
                            f"{min(n for _, n in sizes)} or set sparsity instead")

    def configure(self, step: ClientStep) -> ClientStep:
        model = step.context.get("model")
        if model is not None:
            self._check_sizes([(n, p.numel()) for n, p in model.named_parameters()])
        self._state = step.context.get("client_state") if self.error_feedback else None
        return step

    def _keep(self, n: int) -> int:
        if self.k is not None:
            return self.k
        return keep_count(n, self.sparsity, None)

    def sparsify(self, tensors: tuple[Tensor, ...], rng: torch.Generator) -> tuple[Tensor, ...]:
        if self.mode == "topk":
            self._check_sizes([(f"#{i}", t.numel()) for i, t in enumerate(tensors)])
            return tuple(t * topk_mask(t, self._keep(t.numel())) for t in tensors)
        if self.mode == "topk_global":
            self._check_sizes([(f"#{i}", t.numel()) for i, t in enumerate(tensors)])
            flat = torch.cat([t.reshape(-1) for t in tensors])
            mask = topk_mask(flat, self._keep(flat.numel()))
            out, start = [], 0
            for t in tensors:
                out.append(t * mask[start:start + t.numel()].view_as(t))
                start += t.numel()
            return tuple(out)
        out = []
        for t in tensors:
            if self.k is not None:
                self._check_sizes([("#", t.numel())])
                mask = torch.zeros(t.numel(), dtype=torch.bool, device=rng.device)
                mask[torch.randperm(t.numel(), generator=rng, device=rng.device)[:self.k]] = True
                rate = self.k / t.numel()
            else:
                rate = 1.0 - float(self.sparsity or 0.0)
                mask = torch.rand(t.numel(), generator=rng, device=rng.device) < rate
            kept = t * mask.to(t.device).view_as(t)  # drawn on the (CPU) generator
            out.append(kept / rate if self.rescale else kept)
        return tuple(out)

    def transform(self, update: SharedUpdate, rng: torch.Generator) -> SharedUpdate:
        tensors = update.tensors
        state = self._state
        if state is not None and "residual" in state:
            tensors = tuple(t + r for t, r in zip(tensors, state["residual"]))
        sent = self.sparsify(tensors, rng)
        if state is not None:
            # DGC: what was not sent this round is carried to the client's next round.
            state["residual"] = tuple((t - s).detach() for t, s in zip(tensors, sent))
        return SharedUpdate(sent, update.kind)

    def disclose(self, update: SharedUpdate) -> Mapping[str, Any]:
        flat = update.flat()
        observed = float((flat == 0).float().mean()) if flat.numel() else 0.0
        return {"sparsify": self.mode, "sparsity": self.sparsity if self.sparsity is not None else observed,
                "sparsify_k": self.k, "error_feedback": self.error_feedback}

    def replay_rule(self) -> ReplayRule:
        return SparsifyReplay(self.mode, self.sparsity, self.k)
