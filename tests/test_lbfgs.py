"""Stacked L-BFGS (giaudit.attacks._common.lbfgs): each of K problems takes torch.optim.LBFGS's steps
(strong-Wolfe line search) to float tolerance, with the same number of evaluations, and the compact
direction equals torch's two-loop recursion."""
from __future__ import annotations

import torch

from giaudit.attacks._common.lbfgs import _two_loop, minimise


def test_the_compact_direction_is_the_two_loop_recursion() -> None:
    gen = torch.Generator().manual_seed(0)
    k, m, n = 3, 7, 20
    s = torch.randn(k, m, n, generator=gen)
    y = s + 0.3 * torch.randn(k, m, n, generator=gen)
    g = torch.randn(k, n, generator=gen)
    rho = (1 / (s * y).sum(-1)).double()
    rho[2, 4:] = 0  # problem 2 holds 4 pairs: the unused entries are zero
    s[2, 4:], y[2, 4:] = 0, 0
    h = torch.rand(k, generator=gen) + 0.5
    got = _two_loop(g, s, y, rho, h)
    for p in range(k):
        used = int((rho[p] != 0).sum())
        q, al = -g[p].clone(), [0.0] * used
        for i in range(used - 1, -1, -1):
            al[i] = float(s[p, i] @ q) * float(rho[p, i])
            q -= al[i] * y[p, i]
        r = q * h[p]
        for i in range(used):
            r += s[p, i] * (al[i] - float(y[p, i] @ r) * float(rho[p, i]))
        assert (got[p] - r).abs().max() <= 1e-5 * r.abs().max()


def _rosenbrock(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return ((a - v[:-1]) ** 2).sum() + 10 * ((v[1:] - v[:-1] ** 2) ** 2).sum()


def test_each_problem_takes_torchs_lbfgs_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    k = 5
    a = torch.rand(k, generator=gen) + 0.5
    x0 = torch.randn(k, 6, generator=gen) * 0.7
    evals = [0] * k
    rounds = [0]

    def evaluate(order, points):
        rounds[0] += 1
        values, grads = [], []
        for p, v in zip(order, points):
            evals[p] += 1
            leaf = v.detach().clone().requires_grad_(True)
            loss = _rosenbrock(leaf, a[p])
            values.append(float(loss.detach()))
            grads.append(torch.autograd.grad(loss, leaf)[0])
        return values, torch.stack(grads)

    losses: list[list[float]] = [[] for _ in range(k)]

    def on_step(p, loss, x):
        losses[p].append(loss)
        return p == 0 and len(losses[p]) == 2  # problem 0 stops on its own after two steps

    final = minimise(evaluate, x0, steps=3, lr=1.0, max_iter=8, history_size=5, on_step=on_step)
    assert rounds[0] == max(evals)  # one evaluation per unfinished problem per round
    for p in range(k):
        v = x0[p].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], lr=1.0, max_iter=8, history_size=5, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = _rosenbrock(v, a[p])
            loss.backward()
            return loss

        want = [float(opt.step(closure).detach()) for _ in range(2 if p == 0 else 3)]
        assert len(losses[p]) == len(want)
        assert all(abs(x - y) <= 1e-4 * abs(y) + 1e-6 for x, y in zip(losses[p], want))
        assert evals[p] == opt.state[v]["func_evals"]
        assert (final[p] - v.detach()).abs().max() <= 3e-3  # along the valley floor, where the loss is flat
