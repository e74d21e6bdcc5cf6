"""K copies of one architecture, each with its own parameters, evaluated as one forward pass of block-diagonal
operations: the fast path of the stacked solvers (`giaudit.attacks.batched`).

`torch.func.vmap` maps any model over a stack of parameters, but on a CPU a small model's double backward
under vmap pays the functorch transforms' dispatch on every operation, which at LeNet sizes costs more than
the arithmetic. `stacked_forward` instead traces the model once with `torch.fx` and rewrites each operation
for a leading problem axis K: a convolution becomes one unfold and one batched matrix product with each
problem's own kernel (`torch.baddbmm` over K), a linear layer a batched matrix product, BatchNorm in
evaluation mode its own running statistics per problem, pooling and elementwise operations the same
operation on the K x B samples. Plain autograd then differentiates it (double backward included).

Why the problems do not mix: every rewritten operation computes problem k's slice of its output from problem
k's slice of its inputs and problem k's parameters alone (a batched matrix product multiplies matrix k by
matrix k; unfold, pooling and elementwise operations act per sample). So the gradient of the sum of the K
problems' losses with respect to problem k's parameters or inputs is the gradient of problem k's loss alone.
Tests compare every problem's loss and gradients with its own unbatched model's (and with vmap's) to float
tolerance.

What is rewritten (anything else returns None, and the caller maps the model with vmap instead): Conv2d
(one group, zero padding), Linear, BatchNorm1d/2d in evaluation mode, Dropout in evaluation mode, Identity,
Flatten, max / average / adaptive pooling, elementwise activations (as modules, functions or methods),
+ - * / between tensors of one rank or with numbers, torch.cat, flatten / view / reshape / size; the
model's input normalisation (`giaudit.fl.Normalise` pre-hook) is applied as the model applies it,
and any other hook makes the model unsupported.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from giaudit.fl import Normalise

StackedForward = Callable[[Tensor, dict[str, Tensor], dict[str, Tensor]], Tensor]

_ELEMENTWISE_MODULES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus,
                        nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)
_ELEMENTWISE_FUNCTIONS: set[Any] = {torch.relu, torch.sigmoid, torch.tanh, F.relu, F.sigmoid, F.tanh, F.gelu,
                                    F.leaky_relu, F.elu, F.silu, F.softplus, torch.nn.functional.relu6}
_POOL_FUNCTIONS: set[Any] = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ARITHMETIC: set[Any] = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


class _Unsupported(Exception):
    pass


def _per_sample(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn` on the K x B samples of a stacked activation (K, B, ...), folded back to (K, B, ...)."""
    k, b = x.shape[:2]
    out = fn(x.reshape(k * b, *x.shape[2:]))
    return out.reshape(k, b, *out.shape[1:])


def _conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
    """Problem k's convolution of x[k] (B, C, H, W) with weight[k] (O, C, kh, kw), for every k at once."""
    k, b, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape[1:]
    pad = cast(tuple[int, int], conv.padding)  # a string padding is refused before (`_check`)
    cols = F.unfold(x.reshape(k * b, c, h, w), (kh, kw), dilation=conv.dilation, padding=pad,
                    stride=conv.stride)  # (K B, C kh kw, L)
    ho = (h + 2 * pad[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    wo = (w + 2 * pad[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    cols = cols.reshape(k, b, c * kh * kw, ho * wo).transpose(1, 2).reshape(k, c * kh * kw, b * ho * wo)
    flat = weight.reshape(k, out_c, c * kh * kw)
    out = torch.bmm(flat, cols) if bias is None else torch.baddbmm(bias.unsqueeze(-1), flat, cols)
    return out.reshape(k, out_c, b, ho, wo).transpose(1, 2)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    k = x.shape[0]
    flat = x.reshape(k, -1, x.shape[-1])
    out = torch.bmm(flat, weight.transpose(1, 2)) if bias is None else torch.baddbmm(
        bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _batch_norm(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> Tensor:
    """Evaluation-mode BatchNorm with problem k's running statistics and affine parameters on x[k]."""
    shape = (x.shape[0], 1, x.shape[2]) + (1,) * (x.ndim - 3)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return x * scale.reshape(shape) + shift.reshape(shape)


def _apply_hook(hook: Normalise, model: nn.Module, x: Tensor) -> Tensor:
    return hook(model, (x,))[0]


def _shift_dim(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def stacked_forward(model: nn.Module, sample: tuple[int, ...]) -> StackedForward | None:
    """The forward pass of K stacked copies of `model`: f(x, params, buffers) with x (K, B, ...), and
    `params` / `buffers` each problem's own named tensors stacked on a leading axis (K, ...), returning the
    K problems' outputs (K, B, ...). None when `model` uses anything this module does not rewrite, or when
    the rewrite, run on two copies of `model` at an input of shape `sample` (B, ...), does not give the
    model's own output (to 1e-4 of its largest value)."""
    forward = _rewrite(model)
    if forward is None:
        return None
    try:
        with torch.no_grad():
            first = next(iter(model.parameters()))
            gen = torch.Generator(device=first.device).manual_seed(0)
            x = torch.rand((2, *sample), generator=gen, device=first.device, dtype=first.dtype)
            want = torch.stack([model(x[0]), model(x[1])])
            params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
            buffers = {n: b.expand(2, *b.shape) for n, b in model.named_buffers()}
            got = forward(x, params, buffers)
    except Exception:  # noqa: BLE001  (a rewrite that cannot run this model: the vmap path handles it)
        return None
    if got.shape != want.shape or not bool((got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1e-12)):
        return None
    return forward


def _rewrite(model: nn.Module) -> StackedForward | None:
    pre_hooks = [cast(Normalise, h) for h in model._forward_pre_hooks.values()]
    if (model._forward_hooks or model._backward_hooks or not all(isinstance(h, Normalise) for h in pre_hooks)
            or any(_hooks(m) for _n, m in model.named_modules() if m is not model)):
        return None
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  (untraceable Python control flow: the vmap path handles it)
        return None
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    try:
        for node in nodes:
            _check(node, modules)
    except _Unsupported:
        return None
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return None

    def forward(x: Tensor, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        for hook in pre_hooks:
            x = _per_sample(partial(_apply_hook, hook, model), x)
        env: dict[fx.Node, Any] = {}

        def value(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        for node in nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                return _one_tensor(value(node.args[0]))
            elif node.op == "call_module":
                env[node] = _run_module(modules[str(node.target)], str(node.target), value(node.args[0]),
                                        params, buffers)
            elif node.op == "call_function":
                env[node] = _run_function(node.target, value(node.args), value(node.kwargs))
            else:  # call_method
                env[node] = _run_method(str(node.target), value(node.args), value(node.kwargs))
        raise RuntimeError("the traced graph has no output")

    return forward


def _one_tensor(v: Any) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError("the model's output is not one tensor")
    return v


def _check(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    if node.op in ("placeholder", "output"):
        if node.op == "output" and not isinstance(node.args[0], fx.Node):
            raise _Unsupported
        return
    if node.op == "call_module":
        m = modules[str(node.target)]
        if len(node.args) != 1 or node.kwargs:
            raise _Unsupported
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise _Unsupported
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.training or not m.track_running_stats or m.running_mean is None:
                raise _Unsupported
        elif isinstance(m, nn.Dropout):
            if m.training:
                raise _Unsupported
        elif isinstance(m, nn.Flatten):
            pass
        elif not isinstance(m, (nn.Linear, *_ELEMENTWISE_MODULES, *_POOLS)):
            raise _Unsupported
        return
    if node.op == "call_function":
        t = node.target
        if t in _ELEMENTWISE_FUNCTIONS or t in _POOL_FUNCTIONS or t in _ARITHMETIC:
            return
        if t in (torch.flatten, torch.cat):
            return
        raise _Unsupported
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS or node.target in ("flatten", "view", "reshape"):
            return
        if node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
            return
        raise _Unsupported
    raise _Unsupported  # get_attr: a parameter read outside its module


def _run_module(m: nn.Module, name: str, x: Tensor, params: dict[str, Tensor], buffers: dict[str, Tensor]
                ) -> Tensor:
    def own(field: str) -> Tensor | None:
        key = f"{name}.{field}"
        return params.get(key, buffers.get(key))

    if isinstance(m, nn.Conv2d):
        weight = own("weight")
        assert weight is not None
        return _conv2d(x, weight, own("bias"), m)
    if isinstance(m, nn.Linear):
        weight = own("weight")
        assert weight is not None
        return _linear(x, weight, own("bias"))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        mean, var = own("running_mean"), own("running_var")
        assert mean is not None and var is not None
        return _batch_norm(x, mean, var, own("weight"), own("bias"), m.eps)
    if isinstance(m, nn.Flatten):
        return x.flatten(_shift_dim(m.start_dim), _shift_dim(m.end_dim))
    if isinstance(m, _POOLS):
        return _per_sample(m, x)
    return m(x)  # elementwise, Identity, Dropout in evaluation mode


def _run_function(fn: Any, args: tuple, kwargs: dict) -> Any:
    if fn in _ELEMENTWISE_FUNCTIONS:
        return fn(*args, **kwargs)
    if fn in _POOL_FUNCTIONS:
        return _per_sample(lambda v: fn(v, *args[1:], **kwargs), args[0])
    if fn in _ARITHMETIC:
        ranks = {a.ndim for a in args if isinstance(a, Tensor)}
        if len(ranks) > 1:  # a stacked (K, ...) operand broadcast against another rank would pair wrong axes
            raise ValueError("stacked arithmetic between tensors of different ranks")
        return fn(*args, **kwargs)
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return args[0].flatten(_shift_dim(start), _shift_dim(end))
    if fn is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return torch.cat(list(args[0]), _shift_dim(dim))
    raise ValueError(f"no stacked rewrite of {fn}")


def _run_method(name: str, args: tuple, kwargs: dict) -> Any:
    x, rest = args[0], args[1:]
    if name in _ELEMENTWISE_METHODS:
        return getattr(x, name)(*rest, **kwargs)
    if name == "size":
        return x.size(_shift_dim(rest[0]))
    if name == "flatten":
        start = rest[0] if rest else kwargs.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
        return x.flatten(_shift_dim(start), _shift_dim(end))
    shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
    return x.reshape(x.shape[0], *shape)  # view / reshape of each problem's activation
