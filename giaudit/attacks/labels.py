"""Label recovery from the last layer's gradient.

- iDLG (Zhao et al. 2020), batch 1: with softmax cross-entropy the gradient of
  the last layer's bias is p - onehot(y), negative only at the true class.
  Without a bias, the weight rows give the same sign (features after ReLU or
  sigmoid are non-negative), so the row sums are used.
- Row rule (Yin et al. 2021, GradInversion), batch B with distinct labels: the
  B classes with the most negative row sums / bias entries.
- Count-based (LLG-style, Wainakh et al. 2022, with an offset), repeated labels:
  for a mean loss over B samples, db_k = (1/B) sum_n (p_nk - y_nk), so the count
  of class k is B * (mean p_k - db_k). mean p_k is estimated from the model's
  predictions on random inputs drawn from the data range (the offset). Counts
  are rounded by largest remainder so they sum to B.

FedAvg deltas are turned into a gradient estimate, -delta / (lr * steps).
Threat model: the attacker sees the update and the batch size (class B); it
uses no data.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from giaudit.device import generator_device, to_model
from giaudit.errors import ThreatModelError
from giaudit.types import Capability, Observation


def _last_layer(obs: Observation) -> tuple[Tensor, Tensor | None]:
    """(weight gradient K x D, bias gradient K or None) of the final linear layer."""
    named = list(obs.model.named_parameters())
    tensors = obs.update.tensors
    idx = {n: i for i, (n, _) in enumerate(named)}
    last_linear = [m for n, m in obs.model.named_modules() if isinstance(m, nn.Linear)]
    if not last_linear:
        raise ThreatModelError("label recovery needs the model to end in an nn.Linear layer; "
                               "set labels = 'oracle' with threat.true_labels = true")
    lin = last_linear[-1]
    w_name = next(n for n, p in named if p is lin.weight)
    gw = tensors[idx[w_name]]
    gb = None
    if lin.bias is not None:
        b_name = next(n for n, p in named if p is lin.bias)
        gb = tensors[idx[b_name]]
    if obs.update.kind == "delta":
        proto = obs.protocol
        scale = -1.0 / ((proto.local_lr if proto else 1.0) * (proto.local_steps if proto else 1))
        gw = gw * scale
        gb = gb * scale if gb is not None else None
    return gw.detach(), (gb.detach() if gb is not None else None)


def _class_scores(obs: Observation) -> Tensor:
    gw, gb = _last_layer(obs)
    return gb if gb is not None else gw.sum(dim=1)


def idlg(obs: Observation) -> Tensor:
    return _class_scores(obs).argmin().view(1)


def row_rule(obs: Observation, batch_size: int) -> Tensor:
    scores = _class_scores(obs)
    k = min(batch_size, scores.numel())
    return torch.argsort(scores)[:k].sort().values


def count_based(obs: Observation, batch_size: int, generator: torch.Generator | None = None,
                probes: int = 64) -> Tensor:
    gw, gb = _last_layer(obs)
    model = obs.model
    lo, hi = obs.data_spec.value_range
    # Drawn on the (CPU) generator, then moved where the model is.
    x = lo + (hi - lo) * torch.rand((probes, *obs.data_spec.shape), generator=generator,
                                    device=generator_device(generator))
    x = to_model(x, model)
    was_training = model.training
    model.eval()  # estimating the offset must not move BN running statistics
    with torch.no_grad():
        p_mean = torch.softmax(model(x), dim=-1).mean(0)
    model.train(was_training)
    if gb is None:
        # Without a bias the row sums mix counts with feature magnitudes; the
        # row rule is the honest fallback (exact for distinct labels).
        return row_rule(obs, batch_size)
    counts = batch_size * (p_mean - gb)
    counts = counts.clamp_min(0)
    if counts.sum() <= 0:
        counts = torch.ones_like(counts)
    counts = counts / counts.sum() * batch_size
    base = counts.floor()
    remainder = int(batch_size - base.sum().item())
    if remainder > 0:
        order = torch.argsort(counts - base, descending=True)
        base[order[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), base.long())
    return labels[:batch_size]


LABEL_METHODS = ("auto", "oracle", "idlg", "yin", "count")


def recover_labels(obs: Observation, method: str = "auto", generator: torch.Generator | None = None,
                   attack: str | None = None) -> tuple[Tensor, str]:
    """Labels for the attack and the name of the method that produced them (errors name the config key
    ``attacks.<attack>.labels``)."""
    b = obs.batch_size
    key = f"attacks.{attack}.labels" if attack else "labels"
    if method == "oracle" or (method == "auto" and obs.threat.has(Capability.TRUE_LABELS)):
        if obs.labels is None:
            raise ThreatModelError(f"{key} = 'oracle' needs threat.true_labels = true")
        return obs.labels.clone(), "oracle"
    if b is None:
        raise ThreatModelError("label recovery needs the batch size: set threat.batch_size = true")
    if method == "idlg" or (method == "auto" and b == 1):
        if b != 1:
            raise ThreatModelError(f"{key} = 'idlg' recovers the label of a single image, but the batch "
                                   f"size is {b}; use {key} = 'yin' or 'count' (or 'auto')")
        return idlg(obs), "idlg"
    if method == "yin":
        return row_rule(obs, b), "yin"
    return count_based(obs, b, generator), "count"
