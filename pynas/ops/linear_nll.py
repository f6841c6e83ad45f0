"""linear_nll: a language model's decoder, log-softmax and mean NLL as one autograd node.

    loss = mean_i [ logsumexp(h_i W^T + b) - (h_i W^T + b)[target_i] ]
         = F.nll_loss(F.log_softmax(F.linear(h, W, b), -1), target)

for h (N, D), W (V, D), b (V,) or None and target (N,) int64 class indices in [0, V). The eager composition
stores the (N, V) logits and log-probabilities (22 MB each at the DARTS RNN's CPU size, N = 560, V = 10 000),
makes an (N, V) zero gradient for the NLL and passes over the log-probabilities twice more in backward. Here
the rows go in chunks of about 2**20 logits: per chunk one GEMM for the logits, the rows kernel (each row's
log-sum-exp and NLL; when a gradient is wanted, the row overwritten by (softmax - onehot) / N), then the GEMMs
of grad_h = P W and grad_W += P^T h. The gradients are so computed in the forward (when grad mode is on and an
input requires grad: only those that do, so an architecture-only pass with frozen weights skips grad_W and
grad_b) and the backward scales them by the incoming gradient. Nothing of size (N, V) outlives a call.

A backward with ``create_graph=True`` differentiates the reference (:func:`linear_nll_ref`) on the saved
inputs: exact to every order. Under torch.func transforms and torch.compile the reference runs.

Backends: 'reference' (the composition above), 'cpu' (the rows kernel in C++, float32 8 lanes wide under
AVX2, float64), 'cuda' and 'triton' (GPU rows kernels; the GEMMs are torch's on every backend).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import _autodiff, _ext
from . import _dispatch

__all__ = ["linear_nll", "linear_nll_ref"]

#: Logits per chunk (4 MiB of float32): large enough for efficient GEMMs, small enough to stay out of the
#: page-fault cost of a fresh (N, V) buffer per call.
CHUNK_LOGITS = 1 << 20


def linear_nll_ref(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   target: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference: ``nll_loss(log_softmax(linear(h, weight, bias)), target)`` (mean)."""
    return F.nll_loss(F.log_softmax(F.linear(h, weight, bias), -1), target)


TABLE = _dispatch.register("linear_nll", [
    _dispatch.reference("linear_nll"),
    _dispatch.extension("linear_nll", "cpu", _dispatch.WIDE_FLOATS, _ext.get, "h (N, D), weight (V, D)"),
    _dispatch.extension("linear_nll", "cuda", _dispatch.FLOATS, _ext.get, "h (N, D), weight (V, D)"),
    _dispatch.triton("linear_nll", "linear_nll", _dispatch.FLOATS, layout="h (N, D), weight (V, D)"),
])


def linear_nll_chunked(rows_, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       target: torch.Tensor, need_h: bool, need_w: bool, need_b: bool):
    """``(loss, grad_h, grad_weight, grad_bias)`` of the mean NLL (each gradient None unless needed), the rows
    kernel ``rows_`` (a backend's ``linear_nll_rows_``) run on chunks of rows between torch's GEMMs."""
    N, _ = h.shape
    V = weight.shape[0]
    h, weight = h.detach().contiguous(), weight.detach().contiguous()
    b = None if bias is None else bias.detach()
    grad = need_h or need_w or need_b
    R = max(1, min(N, CHUNK_LOGITS // V))
    buf = torch.empty(R, V, dtype=h.dtype, device=h.device)
    nll = torch.empty(N, dtype=h.dtype, device=h.device)
    gh = torch.empty_like(h) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros(V, dtype=h.dtype, device=h.device) if need_b else None
    wt = weight.t()
    scale = 1.0 / N
    for s in range(0, N, R):
        r = min(R, N - s)
        rows, hs = buf[:r], h[s:s + r]
        if b is None:
            torch.mm(hs, wt, out=rows)
        else:
            torch.addmm(b, hs, wt, out=rows)
        rows_(rows, target[s:s + r], nll[s:s + r], grad, scale)
        if need_h:
            torch.mm(rows, weight, out=gh[s:s + r])
        if need_w:
            gw.addmm_(rows.t(), hs)
        if need_b:
            gb.add_(rows.sum(0))
    return nll.sum() * scale, gh, gw, gb


class _LinearNLLFunction(torch.autograd.Function):
    """forward(backend, need (h, weight, bias), h, weight, bias or None, target) -> loss (0-d)."""

    @staticmethod
    def forward(ctx, backend, need, h, weight, bias, target):
        rows_ = TABLE[backend].kernels().linear_nll_rows_
        loss, gh, gw, gb = linear_nll_chunked(rows_, h, weight, bias, target, *need)
        ctx.grads = (gh, gw, gb)
        ctx.save_for_backward(h, weight, bias, target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, bias, target = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact)
            g = _autodiff.grad_through(lambda h_, w_, b_: linear_nll_ref(h_, w_, b_, target), (h, weight, bias),
                                       [n and t is not None for n, t in zip(needs, (h, weight, bias))], grad_loss)
            return (None, None, *g, None)
        out: List[Optional[torch.Tensor]] = []
        for n, g in zip(needs, ctx.grads):
            if not n:
                out.append(None)
            elif g is None:
                raise RuntimeError("linear_nll: a gradient was not computed in the forward (an input's "
                                   "requires_grad changed between the forward and the backward)")
            else:
                out.append(g * grad_loss.to(g.dtype))
        return (None, None, *out, None)


def _check(h, weight, bias, target) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"h: expected a floating (N, D) tensor, got {getattr(h, 'shape', type(h))}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[1]
            or weight.dtype != h.dtype or weight.device != h.device):
        raise ValueError(f"weight: expected (V, {h.shape[1]}) of h's dtype and device, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != h.dtype or bias.device != h.device):
        raise ValueError(f"bias: expected None or ({weight.shape[0]},) of h's dtype and device, got "
                         f"{getattr(bias, 'shape', type(bias))}")
    if (not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (h.shape[0],)
            or target.device != h.device):
        raise ValueError(f"target: expected an int64 ({h.shape[0]},) tensor on h's device, got "
                         f"{getattr(target, 'dtype', type(target))} {tuple(getattr(target, 'shape', ()))}")
    if h.shape[0] == 0 or weight.shape[0] == 0:
        raise ValueError(f"h, weight: expected at least one row and one class, got N={h.shape[0]}, "
                         f"V={weight.shape[0]}")


def linear_nll(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """The mean NLL of ``target`` under ``log_softmax(h @ weight.T + bias)`` (0-d), differentiable w.r.t. h,
    weight and bias.

    Args:
        h: (N, D) floating inputs of the decoder.
        weight: (V, D), bias: (V,) or None, of h's dtype and device.
        target: (N,) int64 class indices in [0, V) (the CPU kernel raises on others; the GPU kernels give NaN).
        backend: overrides the backend in force (see :func:`pynas.use_backend`).
    """
    _check(h, weight, bias, target)
    tensors = [h, weight] + ([] if bias is None else [bias])
    impl = TABLE.resolve(tensors, backend)
    if impl.backend == "reference" or _autodiff.under_transform() or torch.compiler.is_compiling():
        return linear_nll_ref(h, weight, bias, target)
    grad = torch.is_grad_enabled()
    need = tuple(grad and t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearNLLFunction.apply(impl.backend, need, h, weight, bias, target.contiguous())
