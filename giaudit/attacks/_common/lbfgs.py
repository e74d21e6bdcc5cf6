"""L-BFGS with the strong-Wolfe line search for K independent problems at once: the algorithm of
`torch.optim.LBFGS(line_search_fn="strong_wolfe")`, step for step, with each problem's vectors stacked.

Every problem keeps its own iterate, direction, curvature history, step length and line-search state, and
takes exactly the decisions torch's optimiser takes for it alone (the same conditions, bracketing, cubic
interpolation, history updates and stopping tests, with torch's defaults: tolerance_grad 1e-7,
tolerance_change 1e-9, c1 1e-4, c2 0.9, max_eval = 5/4 max_iter, and as many line-search iterations as the
step's evaluations have left). What is
shared is the arithmetic: in each round every unfinished problem asks for one evaluation, all the asked
points are evaluated in one call, and the vector work of the round (dot products, steps, history updates,
the search direction) is done for all problems in one operation each. The search direction, H g from the
two-loop recursion in torch, is computed in its equivalent compact form (Byrd, Nocedal and Schnabel 1994:
two triangular solves against the history's inner products), which rounds differently from the recursion
but is the same product; scalars are Python floats (torch keeps some as float32 tensors). L-BFGS amplifies
last-bit differences, so a problem agrees with its torch run over the first steps to float tolerance and in
distribution afterwards, as any two implementations do.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

TOLERANCE_GRAD, TOLERANCE_CHANGE, C1, C2 = 1e-7, 1e-9, 1e-4, 0.9

# The K problems' objective at the asked points: (problem indices, points (r, n)) -> (values, gradients (r, n)).
Evaluate = Callable[[list[int], Tensor], tuple[list[float], Tensor]]
# Called at the end of every step of problem k with the loss at the step's start (what `LBFGS.step` returns)
# and the iterate after the step; True stops problem k.
OnStep = Callable[[int, float, Tensor], bool]


def cubic_interpolate(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                      bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2) within `bounds` (as torch's)."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(pos, lo), hi)
    return (lo + hi) / 2.0


@dataclass
class _Problem:
    """One problem's scalar state (its vectors are rows of the stacked tensors)."""

    phase: str = "start"            # "start": the step's first evaluation; "bracket" / "zoom": line search
    n_iter: int = 0                 # iterations over all steps (torch's state["n_iter"])
    step_iter: int = 0              # iterations in this step
    evals: int = 0                  # evaluations in this step
    orig_loss: float = math.nan     # the loss at the step's start
    loss: float = math.nan
    prev_loss: float = math.nan
    t: float = 0.0
    h_diag: float = 1.0
    history: int = 0
    # line search
    f0: float = 0.0
    gtd0: float = 0.0
    d_norm: float = 0.0
    t_prev: float = 0.0
    f_prev: float = 0.0
    g_prev: Tensor | None = None
    gtd_prev: float = 0.0
    ls_iter: int = 0
    max_ls: int = 0                 # the line search's iterations: the step's evaluations left
    ls_evals: int = 0
    bracket: list[float] = field(default_factory=list)
    bf: list[float] = field(default_factory=list)
    bg: list[Tensor] = field(default_factory=list)
    bgtd: list[float] = field(default_factory=list)
    low: int = 0
    high: int = 1
    insuf: bool = False
    done: bool = False


def minimise(evaluate: Evaluate, x0: Tensor, *, steps: int, lr: float, max_iter: int, history_size: int,
             on_step: OnStep) -> Tensor:
    """Up to `steps` `LBFGS.step` calls on each of the K problems whose starts are the rows of `x0` (K, n);
    `on_step` sees every step's result and may stop its problem. Returns the final iterates (K, n).

    Every vector operation acts on all K rows of fixed-shape tensors (rows a round does not update are
    selected away, never computed in a smaller batch), so a problem's arithmetic is the same whichever
    other problems share the solve and wherever they are."""
    k_total = x0.shape[0]
    max_eval = max_iter * 5 // 4
    st = _State(x0, min(history_size, steps * max_iter), history_size)
    probs = [_Problem() for _ in range(k_total)]
    steps_done = [0] * k_total
    active = set(range(k_total))
    dev = x0.device

    def end_step(k: int) -> None:
        steps_done[k] += 1
        if on_step(k, probs[k].orig_loss, st.x[k]) or steps_done[k] >= steps:
            active.discard(k)
        probs[k].phase = "start"

    while active:
        order = sorted(active)
        rows = torch.tensor(order, device=dev)
        ts = torch.tensor([0.0 if p.phase == "start" else p.t for p in probs], dtype=st.x.dtype, device=dev)
        searching = torch.tensor([p.phase != "start" for p in probs], device=dev)
        points = torch.where(searching[:, None], st.x + ts[:, None] * st.d, st.x).index_select(0, rows)
        values, asked = evaluate(order, points)
        grads = torch.zeros_like(st.x).index_copy_(0, rows, asked)
        gtd_new = (grads * st.d).sum(1).tolist()
        gmax_new = grads.abs().amax(1).tolist()
        accepted: list[tuple[int, float, float, Tensor]] = []   # (k, t, f, g row) of finished line searches
        directions: list[int] = []
        for j, k in enumerate(order):
            p = probs[k]
            if p.phase == "start":
                p.orig_loss = p.loss = values[j]
                p.evals, p.step_iter = 1, 0
                st.g[k] = grads[k]
                if gmax_new[k] <= TOLERANCE_GRAD:
                    end_step(k)
                else:
                    directions.append(k)
                continue
            result = _line_search_result(p, values[j], grads[k], gtd_new[k])
            if result is not None:
                accepted.append((k, *result))
        if accepted:
            mask = torch.zeros(k_total, dtype=torch.bool, device=dev)
            tt = torch.zeros(k_total, dtype=st.x.dtype, device=dev)
            for k, t, _f, row in accepted:
                mask[k], tt[k] = True, t
                st.g[k] = row
            st.x = torch.where(mask[:, None], st.x + tt[:, None] * st.d, st.x)
            gmax = st.g.abs().amax(1).tolist()
            for k, t, f, _row in accepted:
                p = probs[k]
                p.t, p.loss = t, f
                p.evals += p.ls_evals
                if (p.step_iter == max_iter or p.evals >= max_eval or gmax[k] <= TOLERANCE_GRAD
                        or p.d_norm * abs(t) <= TOLERANCE_CHANGE or abs(p.loss - p.prev_loss) < TOLERANCE_CHANGE):
                    end_step(k)
                else:
                    directions.append(k)
        if directions:
            _directions(sorted(directions), probs, st, lr, max_eval, end_step)
    return st.x


class _State:
    """The K problems' vectors: iterates, flat gradients, directions, the previous iteration's gradients, and
    the curvature histories (oldest pair first, `memory` slots: the most pairs the solve can keep) with the
    inner products s_i . y_j of each history, kept as pairs arrive."""

    def __init__(self, x0: Tensor, memory: int, history_size: int) -> None:
        k, n = x0.shape
        self.x = x0.detach().clone()
        self.g = torch.zeros_like(self.x)
        self.d = torch.zeros_like(self.x)
        self.prev_g = torch.zeros_like(self.x)
        self.history_size = history_size
        self.s = self.x.new_zeros((k, memory, n))
        self.y = self.x.new_zeros((k, memory, n))
        self.rho = torch.zeros((k, memory), dtype=torch.float64, device=x0.device)
        self.sy = torch.zeros((k, memory, memory), dtype=torch.float64, device=x0.device)


def _line_search_result(p: _Problem, f_new: float, g_new: Tensor, gtd_new: float
                        ) -> tuple[float, float, Tensor] | None:
    """Advance problem `p`'s strong-Wolfe line search by the evaluation at its step `p.t`: None while it
    asks for another point (`p.t` set), else the accepted (step, value, gradient)."""
    p.ls_evals += 1
    if p.phase == "bracket":
        first = p.ls_evals == 1
        if not first:
            p.ls_iter += 1
        if p.ls_iter >= p.max_ls:
            p.bracket, p.bf, p.bg, p.bgtd = [0.0, p.t], [p.f0, f_new], [p.bg[0], g_new], [p.gtd0, gtd_new]
            return _zoom_enter(p)
        overshot = f_new > p.f0 + C1 * p.t * p.gtd0 or (p.ls_iter > 1 and f_new >= p.f_prev)
        if not overshot and abs(gtd_new) <= -C2 * p.gtd0:
            p.bracket, p.bf, p.bg, p.done = [p.t], [f_new], [g_new], True
            return _zoom_enter(p)
        if overshot or gtd_new >= 0:
            p.bracket, p.bf = [p.t_prev, p.t], [p.f_prev, f_new]
            p.bg, p.bgtd = [_row(p.g_prev), g_new], [p.gtd_prev, gtd_new]
            return _zoom_enter(p)
        min_step, max_step = p.t + 0.01 * (p.t - p.t_prev), p.t * 10
        t_next = cubic_interpolate(p.t_prev, p.f_prev, p.gtd_prev, p.t, f_new, gtd_new, (min_step, max_step))
        p.t_prev, p.f_prev, p.g_prev, p.gtd_prev, p.t = p.t, f_new, g_new, gtd_new, t_next
        return None
    # zoom: the evaluation at p.t inside the bracket
    p.ls_iter += 1
    lo, hi = p.low, p.high
    if f_new > p.f0 + C1 * p.t * p.gtd0 or f_new >= p.bf[lo]:
        p.bracket[hi], p.bf[hi], p.bg[hi], p.bgtd[hi] = p.t, f_new, g_new, gtd_new
        p.low, p.high = (0, 1) if p.bf[0] <= p.bf[1] else (1, 0)
    else:
        if abs(gtd_new) <= -C2 * p.gtd0:
            p.done = True
        elif gtd_new * (p.bracket[hi] - p.bracket[lo]) >= 0:
            p.bracket[hi], p.bf[hi], p.bg[hi], p.bgtd[hi] = p.bracket[lo], p.bf[lo], p.bg[lo], p.bgtd[lo]
        p.bracket[lo], p.bf[lo], p.bg[lo], p.bgtd[lo] = p.t, f_new, g_new, gtd_new
    return _zoom_next(p)


def _row(t: Tensor | None) -> Tensor:
    assert t is not None
    return t


def _zoom_enter(p: _Problem) -> tuple[float, float, Tensor] | None:
    p.insuf = False
    p.low, p.high = (0, 1) if p.bf[0] <= p.bf[-1] else (1, 0)
    p.phase = "zoom"
    return _zoom_next(p)


def _zoom_next(p: _Problem) -> tuple[float, float, Tensor] | None:
    """The next zoom point (`p.t`, None returned) or, when the search is over, its result."""
    if not p.done and p.ls_iter < p.max_ls and abs(p.bracket[1] - p.bracket[0]) * p.d_norm >= TOLERANCE_CHANGE:
        b = p.bracket
        t = cubic_interpolate(b[0], p.bf[0], p.bgtd[0], b[1], p.bf[1], p.bgtd[1])
        top, bottom = max(b), min(b)
        eps = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < eps:
            if p.insuf or t >= top or t <= bottom:
                t = top - eps if abs(t - top) < abs(t - bottom) else bottom + eps
                p.insuf = False
            else:
                p.insuf = True
        else:
            p.insuf = False
        p.t = t
        return None
    return p.bracket[p.low], p.bf[p.low], p.bg[p.low]


def _directions(order: Sequence[int], probs: list[_Problem], st: _State, lr: float, max_eval: int,
                end_step: Callable[[int], None]) -> None:
    """The next iteration of the problems in `order`: the history update, the direction -H g, the first step
    length and the start of the line search (or the end of the step when the direction does not descend)."""
    dev = st.x.device
    ts = torch.tensor([p.t for p in probs], dtype=st.x.dtype, device=dev)
    yv = st.g - st.prev_g
    sv = st.d * ts[:, None]
    ys = (yv * sv).sum(1).tolist()
    yy = (yv * yv).sum(1).tolist()
    pushed = []
    for k in order:
        p = probs[k]
        if p.n_iter == 0 or ys[k] <= 1e-10:
            continue
        if p.history == st.history_size or p.history == st.s.shape[1]:  # drop the oldest pair
            for t in (st.s, st.y, st.rho):
                t[k, :-1] = t[k, 1:].clone()
            st.sy[k, :-1, :-1] = st.sy[k, 1:, 1:].clone()
            p.history -= 1
        st.s[k, p.history], st.y[k, p.history] = sv[k], yv[k]
        st.rho[k, p.history] = 1.0 / ys[k]
        pushed.append((k, p.history))
        p.history += 1
        p.h_diag = ys[k] / yy[k]
    if pushed:  # over all K rows (a batch whose size depended on who pushed would round differently)
        row = torch.bmm(st.y, sv.unsqueeze(-1)).squeeze(-1)   # s_new . y_j
        col = torch.bmm(st.s, yv.unsqueeze(-1)).squeeze(-1)   # s_i . y_new
        for k, h in pushed:
            st.sy[k, h, :] = row[k]
            st.sy[k, :, h] = col[k]
    h_diags = torch.tensor([p.h_diag for p in probs], dtype=st.x.dtype, device=dev)
    dk = _two_loop(st.g, st.s, st.y, st.rho, h_diags, st.sy)
    for k in order:
        st.d[k] = -st.g[k] if probs[k].n_iter == 0 else dk[k]  # the first iteration ever: steepest descent
        st.prev_g[k] = st.g[k]
    gtd = (st.g * st.d).sum(1).tolist()
    l1 = st.g.abs().sum(1).tolist()
    dmax = st.d.abs().amax(1).tolist()
    for k in order:
        p = probs[k]
        p.n_iter += 1
        p.step_iter += 1
        p.prev_loss = p.loss
        p.t = min(1.0, 1.0 / l1[k]) * lr if p.n_iter == 1 else lr
        if gtd[k] > -TOLERANCE_CHANGE:
            end_step(k)
            continue
        p.phase, p.f0, p.gtd0, p.d_norm = "bracket", p.loss, gtd[k], dmax[k]
        p.t_prev, p.f_prev, p.g_prev, p.gtd_prev = 0.0, p.loss, st.g[k].clone(), gtd[k]
        p.ls_iter, p.ls_evals, p.done, p.max_ls = 0, 0, False, max_eval - p.evals
        p.bg = [p.g_prev]  # the gradient at step 0, for a search that runs out of evaluations


def _two_loop(grad: Tensor, s: Tensor, y: Tensor, rho: Tensor, h_diag: Tensor, sy: Tensor | None = None) -> Tensor:
    """-H grad for each problem (rows), H the L-BFGS inverse-Hessian approximation of its history (s, y:
    (K, m, n), oldest first; rho = 1 / y.s, 0 for unused entries; sy their inner products s_i . y_j, computed
    here when not given) and initial scaling h_diag: torch's two-loop recursion written as two triangular
    solves.

    The first loop's coefficients a_i = rho_i s_i.(-g - sum_{j>i} a_j y_j) solve (I + rho U) a = -rho S g with
    U_ij = s_i.y_j (j > i); with r0 = h_diag (-g - Y^T a), the second loop's c_i = a_i - b_i, b_i =
    rho_i y_i.(r0 + sum_{j<i} c_j s_j), solve (I + rho L) c = a - rho Y r0 with L_ij = y_i.s_j (j < i); the
    direction is r0 + S^T c."""
    f64 = torch.float64
    if sy is None:
        sy = torch.bmm(s, y.transpose(1, 2)).to(f64)      # (K, m, m): s_i . y_j
    eye = torch.eye(sy.shape[1], dtype=f64, device=sy.device)
    sg = torch.bmm(s, grad.unsqueeze(-1)).squeeze(-1).to(f64)
    upper = eye + rho.unsqueeze(-1) * torch.triu(sy, 1)
    a = torch.linalg.solve_triangular(upper, (-rho * sg).unsqueeze(-1), upper=True).squeeze(-1)
    r0 = h_diag[:, None] * (-grad - torch.bmm(a.to(grad.dtype).unsqueeze(1), y).squeeze(1))
    yr = torch.bmm(y, r0.unsqueeze(-1)).squeeze(-1).to(f64)
    lower = eye + rho.unsqueeze(-1) * torch.tril(sy.transpose(1, 2), -1)
    c = torch.linalg.solve_triangular(lower, (a - rho * yr).unsqueeze(-1), upper=False).squeeze(-1)
    return r0 + torch.bmm(c.to(grad.dtype).unsqueeze(1), s).squeeze(1)
