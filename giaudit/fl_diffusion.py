"""The federated diffusion client's update, written once (client and every attack's trial use it).

The federated model is a DDPM noise predictor `eps_phi` (a `diffusers.UNet2DModel`). On its batch `x`
(images in [0, 1], mapped to the model's [-1, 1]) with its own timesteps `t` and noise `eps`, the client's
loss is the DDPM loss of Ho et al. 2020,

    L(phi) = mean_i mean_pixels (eps_i - eps_phi(sqrt(a_t_i) x_i + sqrt(1 - a_t_i) eps_i, t_i))^2,

with `a_t` the cumulative product of the noise schedule. FedSGD shares dL/dphi; FedAvg shares
w_after - w_before of `local_steps` epochs of SGD over ordered mini-batches, each image keeping its `t` and
`eps` in every epoch (the client draws them once per round).

Soft timesteps (GIDM+): `t` may be a (N, K) grid of timesteps with per-image weights (N, K) summing to 1;
the loss of image i is then sum_k w_ik * loss(x_i, t_ik, eps_i), so the update is the expectation of the
update over the timestep distribution and is differentiable in the weights. One batched forward of N*K
images computes it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from giaudit.fl import local_batches
from giaudit.types import ClientProtocol


@dataclass(frozen=True)
class DiffusionDraw:
    """The client's private randomness of one round: one timestep and one noise image per sample."""

    timesteps: Tensor   # N, long
    noise: Tensor       # N,C,H,W, standard normal


def draw(n: int, shape: Sequence[int], num_train_timesteps: int, generator: torch.Generator) -> DiffusionDraw:
    """Uniform timesteps in [0, T) and standard-normal noise, from `generator`."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator, device=generator.device)
    return DiffusionDraw(t, torch.randn((n, *shape), generator=generator, device=generator.device))


def diffusion_loss(model: nn.Module, x: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor,
                   weights: Tensor | None = None, params: dict[str, Tensor] | None = None) -> Tensor:
    """DDPM loss of images `x` in [0, 1]; `t` (N,) or (N, K) with `weights` (N, K) (see module docstring)."""
    x0 = x * 2.0 - 1.0
    n = x0.shape[0]
    if t.ndim == 2:
        k = t.shape[1]
        if weights is None or weights.shape != t.shape:
            raise ValueError("soft timesteps (N, K) need weights of the same shape")
        x0 = x0.repeat_interleave(k, 0)
        noise = noise.repeat_interleave(k, 0)
        t = t.reshape(-1)
        w = weights.reshape(-1) / n
    else:
        w = None
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if params is None:
        pred = model(x_t, t).sample
    else:
        pred = functional_call(model, params, (x_t, t)).sample
    per = (pred - noise).pow(2).flatten(1).mean(1)
    return per.mean() if w is None else (w * per).sum()


def diffusion_update(model: nn.Module, x: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor,
                     protocol: ClientProtocol | None = None, *, weights: Tensor | None = None,
                     create_graph: bool = False, params: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
    """FedSGD: gradient of the DDPM loss. FedAvg: w_after - w_before of the client's local SGD.

    Differentiable in `x`, `noise` and `weights` with `create_graph=True` (what the attacks optimise).
    Tensors follow `model.parameters()` order.
    """
    protocol = protocol or ClientProtocol()
    names = [n for n, _ in model.named_parameters()]
    start = list(params) if params is not None else [p for p in model.parameters()]
    if protocol.name == "fedsgd":
        loss = diffusion_loss(model, x, t, noise, alphas_cumprod, weights, dict(zip(names, start)))
        return tuple(torch.autograd.grad(loss, start, create_graph=create_graph))
    current = start
    for sl in local_batches(protocol, x.shape[0]):
        w = weights[sl] if weights is not None else None
        loss = diffusion_loss(model, x[sl], t[sl], noise[sl], alphas_cumprod, w, dict(zip(names, current)))
        grads = torch.autograd.grad(loss, current, create_graph=create_graph)
        current = [p - protocol.local_lr * g for p, g in zip(current, grads)]
    return tuple(c - s for c, s in zip(current, start))
