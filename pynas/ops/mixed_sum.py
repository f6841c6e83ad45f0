"""mixed_sum: the weighted sum of a MixedOp's candidate outputs.

    out = sum_k weights[k] * xs[k]

``xs``: K tensors of one shape S, dtype and device (or one tensor of shape
(K, *S)); ``weights``: shape (K,), floating. ``out`` has shape S and xs' dtype;
the kernels accumulate in float32 (float64 for float64 inputs). Backward:
``grad_xs[k] = weights[k] * grad_out`` and ``grad_weights[k] = <grad_out, xs[k]>``.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

from .. import _autodiff
from . import _dispatch
from ._checks import as_tensor_list, check_same, check_weights

__all__ = ["mixed_sum", "mixed_sum_ref"]


def mixed_sum_ref(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference: ``sum_k weights[k] * xs[k]`` in xs' dtype (autograd by torch)."""
    out = weights[0] * xs[0]
    for k in range(1, len(xs)):
        out = out + weights[k] * xs[k]
    # 0-d xs: a float32 weight times a 0-d bfloat16 / float16 x promotes to float32
    return out.to(xs[0].dtype)


def _ref_backward(grad_out, xs, weights):
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    g = grad_out.to(acc)
    grad_xs = [(weights[k].to(acc) * g).to(grad_out.dtype) for k in range(len(xs))]
    grad_w = torch.stack([(g * x.to(acc)).sum() for x in xs]).to(weights.dtype)
    return grad_xs, grad_w


TABLE = _dispatch.register("mixed_sum", _dispatch.every_backend("mixed_sum"))


def _kernels(backend: str):
    return TABLE[backend].kernels()


@torch.library.custom_op("pynas::mixed_sum", mutates_args=())
def _mixed_sum_op(xs: List[torch.Tensor], weights: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "reference":
        with torch.no_grad():
            return mixed_sum_ref(xs, weights)
    return _kernels(backend).mixed_sum_forward(list(xs), weights)


@_mixed_sum_op.register_fake
def _(xs, weights, backend):
    return torch.empty_like(xs[0], memory_format=torch.contiguous_format)


@torch.library.custom_op("pynas::mixed_sum_backward", mutates_args=())
def _mixed_sum_backward_op(
    grad_out: torch.Tensor, xs: List[torch.Tensor], weights: torch.Tensor, backend: str
) -> List[torch.Tensor]:
    """Returns K+1 tensors: grad_xs[0..K-1], then grad_weights."""
    grad_out = grad_out.contiguous()
    if backend == "reference":
        grad_xs, grad_w = _ref_backward(grad_out, xs, weights)
    else:
        grad_xs, grad_w = _kernels(backend).mixed_sum_backward(grad_out, list(xs), weights)
    return list(grad_xs) + [grad_w]


@_mixed_sum_backward_op.register_fake
def _(grad_out, xs, weights, backend):
    grads = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    return grads + [torch.empty_like(weights)]


def _differentiable_backward(grad_out, xs, weights):
    """(grad_xs, grad_weights) in differentiable ops: a backward run with create_graph=True takes this."""
    grad_xs = [weights[k] * grad_out for k in range(len(xs))]
    return grad_xs, torch.stack([(grad_out * x).sum() for x in xs]).to(weights.dtype)


def _setup_context(ctx, inputs, output):
    xs, weights, backend = inputs
    ctx.save_for_backward(*xs, weights)
    ctx.backend = backend


def _backward(ctx, grad_out):
    *xs, weights = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the reference backward, differentiable (exact)
        grad_xs, grad_w = _differentiable_backward(grad_out, xs, weights)
        return grad_xs, grad_w, None
    grads = torch.ops.pynas.mixed_sum_backward(grad_out, xs, weights, ctx.backend)
    return list(grads[:-1]), grads[-1], None


torch.library.register_autograd("pynas::mixed_sum", _backward, setup_context=_setup_context)


class _MixedSumFunction(torch.autograd.Function):
    """The eager path to the same kernels as ``torch.ops.pynas.mixed_sum``.

    Eager calls take it because a ``torch.library`` custom op adds Python and dispatcher work per
    forward and backward, more than the kernels themselves take at DARTS's small sizes. The
    custom op stays the path under ``torch.compile`` (and for opcheck).
    """

    @staticmethod
    def forward(ctx, backend: str, weights: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
        ctx.backend = backend
        ctx.save_for_backward(weights, *xs)
        return _kernels(backend).mixed_sum_forward(list(xs), weights)

    @staticmethod
    def backward(ctx, grad_out):
        weights, *xs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference backward, differentiable (exact)
            grad_xs, grad_w = _differentiable_backward(grad_out, xs, weights)
            return (None, grad_w, *grad_xs)
        grad_xs, grad_w = _kernels(ctx.backend).mixed_sum_backward(grad_out.contiguous(), xs, weights)
        return (None, grad_w, *grad_xs)


def mixed_sum(
    xs: Union[torch.Tensor, Sequence[torch.Tensor]],
    weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_k weights[k] * xs[k]``, differentiable w.r.t. ``xs`` and ``weights``.

    Args:
        xs: K tensors of one shape S, dtype and device, or one tensor (K, *S).
        weights: shape (K,), floating, on the same device.
        backend: overrides the backend in force (see :func:`pynas.use_backend`).

    Returns:
        A tensor of shape S in xs' dtype.
    """
    items = as_tensor_list(xs, "xs")
    check_same(items, "xs")
    check_weights(weights, len(items), items[0].device)
    return _mixed_sum(items, weights, TABLE.resolve(items + [weights], backend))


def _mixed_sum(items: List[torch.Tensor], weights: torch.Tensor, impl: _dispatch.Implementation) -> torch.Tensor:
    """mixed_sum on checked inputs through ``impl`` (a caller that has resolved the backend already)."""
    compiling = torch.compiler.is_compiling()
    if impl.backend == "reference" or (not compiling and _autodiff.under_transform()):
        return mixed_sum_ref(items, weights)
    items = [x.contiguous() for x in items]
    if compiling:
        return torch.ops.pynas.mixed_sum(items, weights.contiguous(), impl.backend)
    return _MixedSumFunction.apply(impl.backend, weights.contiguous(), *items)
