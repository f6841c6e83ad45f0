"""rnn_mix: the node mix of the DARTS RNN search cell, fused.

    out = sum_j sum_{f != none} probs[j, f] * (states[j] + c[j] * (f(h[j]) - states[j]))

``states, c, h``: (J, B, H), one dtype and device, ``c`` already through the sigmoid; ``probs``: (J, 5),
floating, over ``none, tanh, relu, sigmoid, identity`` (the softmaxed arch weights of the J edges
into a node). Returns (B, H). The backward (d states, d c, d h, d probs) recomputes the activations
instead of storing them; the reference formulation below stores every activation and every product.
Math and kernels: csrc/include/pynas/rnn_mix.h, csrc/cpu/rnn_mix.cpp, csrc/cuda/rnn_mix.cu,
kernels/rnn_mix.py.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _autodiff
from . import _dispatch
from ._checks import RNN_FUNCS, check_rnn_mix_args

__all__ = ["rnn_mix", "rnn_mix_ref", "RNN_FUNCS"]

def rnn_mix_ref(states: torch.Tensor, c: torch.Tensor, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference (autograd by torch), in the form of the DARTS RNN cell."""
    out = None
    for j in range(states.shape[0]):
        s, cj, hj = states[j], c[j], h[j]
        for k, f in ((1, torch.tanh), (2, torch.relu), (3, torch.sigmoid), (4, lambda t: t)):
            term = probs[j, k] * (s + cj * (f(hj) - s))
            out = term if out is None else out + term
    # J = 0 (a node with no inputs): zeros (B, H), still in the graph of states
    return states.sum(0) if out is None else out


TABLE = _dispatch.register("rnn_mix", _dispatch.every_backend("rnn_mix"))


def _kernels(backend: str):
    return TABLE[backend].kernels()


@torch.library.custom_op("pynas::rnn_mix", mutates_args=())
def _rnn_mix_op(states: torch.Tensor, c: torch.Tensor, h: torch.Tensor, probs: torch.Tensor,
                backend: str) -> torch.Tensor:
    if backend == "reference":
        with torch.no_grad():
            return rnn_mix_ref(states, c, h, probs)
    return _kernels(backend).rnn_mix_forward(states, c, h, probs)


@_rnn_mix_op.register_fake
def _(states, c, h, probs, backend):
    return states.new_empty(states.shape[1:])


@torch.library.custom_op("pynas::rnn_mix_backward", mutates_args=())
def _rnn_mix_backward_op(grad_out: torch.Tensor, states: torch.Tensor, c: torch.Tensor, h: torch.Tensor,
                         probs: torch.Tensor, backend: str) -> List[torch.Tensor]:
    """[d states, d c, d h, d probs]."""
    grad_out = grad_out.contiguous()
    if backend == "reference":
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (states, c, h, probs)]
            return list(torch.autograd.grad(rnn_mix_ref(*ins), ins, grad_out))
    return list(_kernels(backend).rnn_mix_backward(grad_out, states, c, h, probs))


@_rnn_mix_backward_op.register_fake
def _(grad_out, states, c, h, probs, backend):
    return [torch.empty_like(states), torch.empty_like(states), torch.empty_like(states), torch.empty_like(probs)]


def _setup_context(ctx, inputs, output):
    states, c, h, probs, backend = inputs
    ctx.save_for_backward(states, c, h, probs)
    ctx.backend = backend


def _backward(ctx, grad_out):
    states, c, h, probs = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact to any order)
        return (*_autodiff.grad_through(rnn_mix_ref, (states, c, h, probs), ctx.needs_input_grad[:4], grad_out),
                None)
    ds, dc, dh, dp = torch.ops.pynas.rnn_mix_backward(grad_out, states, c, h, probs, ctx.backend)
    return ds, dc, dh, dp, None


torch.library.register_autograd("pynas::rnn_mix", _backward, setup_context=_setup_context)


class _RnnMixFunction(torch.autograd.Function):
    """The eager path to the same kernels (an autograd.Function costs less per call than a custom op)."""

    @staticmethod
    def forward(ctx, backend: str, states, c, h, probs):
        ctx.backend = backend
        ctx.save_for_backward(states, c, h, probs)
        return _kernels(backend).rnn_mix_forward(states, c, h, probs)

    @staticmethod
    def backward(ctx, grad_out):
        states, c, h, probs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact to any order)
            return (None, *_autodiff.grad_through(rnn_mix_ref, (states, c, h, probs), ctx.needs_input_grad[1:],
                                                  grad_out))
        ds, dc, dh, dp = _kernels(ctx.backend).rnn_mix_backward(grad_out.contiguous(), states, c, h, probs)
        return None, ds, dc, dh, dp


def rnn_mix(states: torch.Tensor, c: torch.Tensor, h: torch.Tensor, probs: torch.Tensor, *,
            backend: Optional[str] = None) -> torch.Tensor:
    """The DARTS RNN node mix (see the module docstring); differentiable w.r.t. all four inputs."""
    check_rnn_mix_args(states, c, h, probs)
    return _rnn_mix(states, c, h, probs, TABLE.resolve([states, c, h, probs], backend))


def _rnn_mix(states, c, h, probs, impl: _dispatch.Implementation) -> torch.Tensor:
    """rnn_mix on checked inputs through ``impl`` (a caller that has resolved the backend already)."""
    compiling = torch.compiler.is_compiling()
    if impl.backend == "reference" or (not compiling and _autodiff.under_transform()):
        return rnn_mix_ref(states, c, h, probs)
    states, c, h, probs = (t.contiguous() for t in (states, c, h, probs))
    if compiling:
        return torch.ops.pynas.rnn_mix(states, c, h, probs, impl.backend)
    return _RnnMixFunction.apply(impl.backend, states, c, h, probs)
