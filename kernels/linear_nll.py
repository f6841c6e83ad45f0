"""Triton kernel of the fused op ``linear_nll``: the rows pass between the decoder's GEMMs.

``linear_nll_rows_`` has the name, argument order and effect of the ``pynas._C`` binding of the same name
(contract in ``csrc/include/pynas/linear_nll.h``), so ``pynas/ops/linear_nll.py`` drives either. For logits
(R, V) and target (R,)::

    nll[r]    = logsumexp(logits[r]) - logits[r, target[r]]
    logits[r] = (softmax(logits[r]) - onehot(target[r])) * scale            (grad only, in place)

One program per row, BLOCK logits at a time: a pass for the max, one for the sum of exp(x - max), one writing
the gradient. Arithmetic in float32 (float64 for float64 rows). A target outside [0, V) gives a NaN nll and
leaves its row unscaled, as the CUDA kernel does. Launched directly; the wrapper never synchronises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launchable

__all__ = ["linear_nll_rows_"]

_MAX_BLOCK = 1024


@triton.jit
def _nll_rows_kernel(x_ptr, t_ptr, nll_ptr, V, scale, GRAD: tl.constexpr, WIDE: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Grid (R,): row r of x_ptr (R, V contiguous), its target t_ptr[r], its nll into nll_ptr[r]."""
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * V
    acc = tl.float64 if WIDE else tl.float32
    t = tl.load(t_ptr + r)
    valid = (t >= 0) & (t < V)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), acc)
    nan_seen = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        v = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(acc)
        nan_seen = nan_seen | (v != v).to(tl.int32)
        m = tl.maximum(m, v)
    mx = tl.max(m, 0)
    mx = tl.where(tl.max(nan_seen, 0) > 0, float("nan"), mx)
    s = tl.zeros([BLOCK], acc)
    for start in range(0, V, BLOCK):
        idx = start + offs
        v = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(acc)
        s += tl.where(idx < V, tl.exp(v - mx), 0.0)
    lse = mx + tl.log(tl.sum(s, 0))
    xt = tl.load(row + tl.where(valid, t, 0)).to(acc)
    tl.store(nll_ptr + r, tl.where(valid, lse - xt, float("nan")).to(nll_ptr.dtype.element_ty))
    if GRAD:
        if valid:
            for start in range(0, V, BLOCK):
                idx = start + offs
                v = tl.load(row + idx, mask=idx < V, other=0.0).to(acc)
                p = tl.exp(v - lse) - tl.where(idx == t, 1.0, 0.0)
                tl.store(row + idx, (p * scale).to(x_ptr.dtype.element_ty), mask=idx < V)


def linear_nll_rows_(logits: torch.Tensor, target: torch.Tensor, nll: torch.Tensor, grad: bool,
                     scale: float) -> torch.Tensor:
    """nll[r] = logsumexp(logits[r]) - logits[r, target[r]]; with ``grad`` logits[r] becomes
    (softmax - onehot) * scale in place. logits (R, V) contiguous, target (R,) int64, nll (R,) of logits' dtype."""
    R, V = logits.shape
    if R == 0:
        return nll
    block = min(_MAX_BLOCK, triton.next_power_of_2(V))
    launchable(_nll_rows_kernel, (logits, target, nll))[(R,)](
        logits, target, nll, V, float(scale), GRAD=bool(grad), WIDE=logits.dtype == torch.float64, BLOCK=block)
    return nll
