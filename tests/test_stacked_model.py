"""The stacked-model forward (giaudit.attacks._common.stacked_model): K copies of an architecture, each with its
own parameters, give each model's own outputs and gradients (first and second order) to float tolerance,
problem k's slice never depends on another problem's parameters or inputs (to the bit), and a model with
anything the rewrite does not cover is refused (the solvers then map it with vmap)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

from giaudit.attacks._common.stacked_model import stacked_forward
from giaudit.attacks.batched import _trial_updates
from giaudit.fl import classification_loss, normalise_inputs
from giaudit.scenario.models import build_model


class Residual(nn.Module):
    """What a user's model may use: a residual sum, functional activations and pooling, view by size, cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Tanh())
        self.side = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.max_pool2d(h + self.block(h), 2)
        h = torch.cat([h, torch.sigmoid(self.side(h))], 1)
        return self.head(F.avg_pool2d(h, 2).view(h.size(0), -1))


def _models(name: str, k: int = 3) -> list[nn.Module]:
    out = []
    for seed in range(k):
        g = torch.Generator().manual_seed(seed)
        if name == "residual":
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                m = normalise_inputs(Residual(), (0.5,), (0.25,))
                m.block[1].running_mean.uniform_(-0.1, 0.1)
                m.block[1].running_var.uniform_(0.5, 1.5)
        else:
            m = build_model(name, channels=1, num_classes=10, size=16, width=4 if name == "convnet" else None,
                            generator=g)
        out.append(m.eval())
    return out


@pytest.mark.parametrize("name", ["lenet_relu", "lenet", "convnet", "residual"])
def test_each_problem_is_its_own_model_in_output_trial_update_and_image_gradient(name) -> None:
    models = _models(name)
    size = 16
    forward = stacked_forward(models[0], (2, 1, size, size))
    assert forward is not None
    params, buffers = stack_module_state(models)
    x = torch.rand(3, 2, 1, size, size, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (3, 2), generator=torch.Generator().manual_seed(6))
    got = forward(x, params, buffers)
    want = torch.stack([m(x[k]) for k, m in enumerate(models)])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    names = [n for n, _ in models[0].named_parameters()]
    trial = _trial_updates(models[0], names, (2, 1, size, size))
    leaves = {n: v.detach().requires_grad_(True) for n, v in params.items()}
    xs = x.clone().requires_grad_(True)
    updates = trial(xs, y, leaves, buffers)
    (gx,) = torch.autograd.grad(sum((u ** 2).sum() for u in updates), xs)
    for k, m in enumerate(models):
        xk = x[k].clone().requires_grad_(True)
        own = torch.autograd.grad(classification_loss(m(xk), y[k]), list(m.parameters()), create_graph=True)
        (own_gx,) = torch.autograd.grad(sum((u ** 2).sum() for u in own), xk)
        for a, b in zip(updates, own):
            assert (a[k] - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12)
        assert (gx[k] - own_gx).abs().max() <= 1e-4 * own_gx.abs().max()


def test_problems_never_mix() -> None:
    """Changing problem 1's parameters and images changes nothing of problems 0 and 2, to the bit: each
    operation computes problem k's slice from problem k's inputs alone."""
    models = _models("lenet_relu")
    names = [n for n, _ in models[0].named_parameters()]
    trial = _trial_updates(models[0], names, (1, 1, 16, 16))
    params, buffers = stack_module_state(models)
    x = torch.rand(3, 1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[1], [2], [3]])

    def run(p, xv):
        leaves = {n: v.detach().requires_grad_(True) for n, v in p.items()}
        xs = xv.clone().requires_grad_(True)
        updates = trial(xs, y, leaves, buffers)
        (gx,) = torch.autograd.grad(sum((u ** 2).sum() for u in updates), xs)
        return updates, gx

    first = run(params, x)
    other = {n: v.clone() for n, v in params.items()}
    for v in other.values():
        v[1].mul_(-2.0)
    x2 = x.clone()
    x2[1] = 1 - x2[1]
    second = run(other, x2)
    for k in (0, 2):
        assert torch.equal(first[1][k], second[1][k])
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first[0], second[0]))
    assert not torch.equal(first[1][1], second[1][1])


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))  # a reduction the rewrite does not cover


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


def test_what_the_rewrite_does_not_cover_is_refused() -> None:
    lenet = _models("lenet_relu", 1)[0]
    assert stacked_forward(lenet, (1, 1, 16, 16)) is not None
    hooked = _models("lenet_relu", 1)[0]
    hooked.body[0].register_forward_hook(lambda m, i, o: o * 2)
    assert stacked_forward(hooked, (1, 1, 16, 16)) is None
    training = _models("convnet", 1)[0].train()
    assert stacked_forward(training, (2, 1, 16, 16)) is None
    assert stacked_forward(nn.Sequential(nn.Conv2d(1, 2, 3), _Mean()), (1, 1, 8, 8)) is None
    assert stacked_forward(_Branch(), (1, 4)) is None
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert stacked_forward(grouped, (1, 2, 8, 8)) is None
