"""Triton kernels of the fused op ``mixed_sum``, the weighted sum of a DARTS mixed edge.

Math, for K candidate-op outputs ``x_k`` of one shape ``S`` and architecture weights ``w`` (K,)::

    forward:   out = sum_k w[k] * x_k                              (shape S)
    backward:  grad_x_k  = w[k] * grad_out                         (shape S, for each k)
               grad_w[k] = sum_{all elements i} grad_out[i] * x_k[i]   (shape (K,))

Products and sums are computed in float32 (float64 when the ``x_k`` are float64); results are
stored in the ``x_k`` dtype (``out``, ``grad_x_k``) and in the weights' dtype (``grad_w``).

How the K tensors reach a kernel: Triton (3.6, portable code) has no arrays of pointers, so each
kernel takes ``MAX_POINTERS`` pointer arguments ``x0 .. x7`` plus a constexpr ``K`` saying how many
are live; the unused ones receive a dummy (``x0``) that is never read, since the code that would
read them is compiled out. For K > ``MAX_POINTERS`` the wrappers launch once per chunk of 8:

* forward: chunks after the first read the running sum (``ACCUMULATE``) and add to it. The
  running sum lives in the accumulation dtype (float32 for half/bfloat16 inputs) so the result is
  rounded to the output dtype once, not once per chunk.
* backward: every chunk reads ``grad_out`` again, writes its own ``grad_x_k`` and its rows of the
  partial-sum buffer.

``grad_w`` is deterministic: each program writes ``sum_{i in its block} grad_out[i] * x_k[i]`` to
``partial[k, program]`` of a (K, num_programs) buffer (no atomics), and torch sums its rows.

Launching: on plain tensors the kernels are launched directly (fast eager calls, also from the
body of a ``torch.library.custom_op``). On tensor subclasses - the Fake and Functional tensors that
``torch.library.triton_op`` traces its body with - launches go through
``torch.library.wrap_triton``, so the public functions may also serve as the body of a
``triton_op`` that ``torch.compile`` sees into. Under ``TRITON_INTERPRET=1`` the kernels always
launch directly and run on CPU tensors (so there a ``triton_op`` cannot be traced with fake
tensors: give the op an explicit fake implementation instead). Note that the interpreter converts
float32 to bfloat16 by truncation, where GPUs round to nearest even: bfloat16 results under the
interpreter can be one bfloat16 ulp further from the truth than on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import MAX_POINTERS, accumulation_dtype, check_block, chunks, launch_geometry, launchable, padded

__all__ = ["MAX_POINTERS", "DEFAULT_BLOCK", "mixed_sum_forward", "mixed_sum_backward"]

#: Elements per program.
DEFAULT_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _program_offsets(BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
    """Program id and the offsets ``pid * BLOCK + [0, BLOCK)`` of its block (int64 if asked)."""
    pid = tl.program_id(0)
    if USE_INT64:
        pid = pid.to(tl.int64)
    return pid, pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _add_weighted(acc, x_ptr, w_ptr, k: tl.constexpr, offs, mask):
    """``acc + w[k] * x[offs]``, in acc's dtype; ``acc`` and ``offs`` are (BLOCK,)."""
    w = tl.load(w_ptr + k)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return acc + w * x.to(w.dtype)


@triton.jit
def _mixed_sum_fwd_kernel(
    out_ptr,
    acc_ptr,
    w_ptr,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    numel,
    K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """out[i] = (acc[i] if ACCUMULATE else 0) + sum_{k < K} w[k] * x_k[i], for i < numel.

    out_ptr: (numel,) any float dtype, written (rounded once, from the accumulation dtype).
    acc_ptr: (numel,) running sum of earlier chunks, read only if ACCUMULATE; may be out_ptr.
    w_ptr:   (>= K,) weights of this chunk, already in the accumulation dtype (float32/float64),
             which sets the dtype of every product and sum.
    x0..x7:  (numel,) each; only x0 .. x{K-1} are read, the rest are dummies.
    numel:   number of elements. K: live pointers, 1..8. BLOCK: elements per program (power of 2).
    USE_INT64: compute offsets in int64 (needed once pid * BLOCK can pass 2**31 - 1).
    Grid: (cdiv(numel, BLOCK),).
    """
    _, offs = _program_offsets(BLOCK, USE_INT64)
    mask = offs < numel
    if ACCUMULATE:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0).to(w_ptr.dtype.element_ty)
    else:
        acc = tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty)
    acc = _add_weighted(acc, x0, w_ptr, 0, offs, mask)
    if K > 1:
        acc = _add_weighted(acc, x1, w_ptr, 1, offs, mask)
    if K > 2:
        acc = _add_weighted(acc, x2, w_ptr, 2, offs, mask)
    if K > 3:
        acc = _add_weighted(acc, x3, w_ptr, 3, offs, mask)
    if K > 4:
        acc = _add_weighted(acc, x4, w_ptr, 4, offs, mask)
    if K > 5:
        acc = _add_weighted(acc, x5, w_ptr, 5, offs, mask)
    if K > 6:
        acc = _add_weighted(acc, x6, w_ptr, 6, offs, mask)
    if K > 7:
        acc = _add_weighted(acc, x7, w_ptr, 7, offs, mask)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_one(
    g, x_ptr, gx_ptr, w_ptr, partial_ptr, partial_stride, k: tl.constexpr, pid, offs, mask
):
    """Store gx[offs] = w[k] * g and partial[k * partial_stride + pid] = sum(g * x[offs]).

    ``g`` is grad_out's block in the accumulation dtype, zero where masked, so masked lanes add
    nothing to the partial sum.
    """
    w = tl.load(w_ptr + k)
    tl.store(gx_ptr + offs, (w * g).to(gx_ptr.dtype.element_ty), mask=mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(g.dtype)
    tl.store(partial_ptr + k * partial_stride + pid, tl.sum(g * x, axis=0))


@triton.jit
def _mixed_sum_bwd_kernel(
    g_ptr,
    w_ptr,
    partial_ptr,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    gx0,
    gx1,
    gx2,
    gx3,
    gx4,
    gx5,
    gx6,
    gx7,
    numel,
    partial_stride,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """One pass over grad_out and the x_k of a chunk, for k < K and program p:

        gx_k[i]       = w[k] * g[i]                                  for i < numel
        partial[k, p] = sum_{i in block p, i < numel} g[i] * x_k[i]

    g_ptr:       (numel,) grad_out, any float dtype (read as the accumulation dtype).
    w_ptr:       (>= K,) weights of this chunk in the accumulation dtype (float32/float64).
    partial_ptr: (K, num_programs) rows of this chunk, row stride ``partial_stride``
                 (= num_programs), accumulation dtype; every (k, p) with k < K is written.
    x0..x7:      (numel,) inputs; gx0..gx7: (numel,) outputs, x dtype. Only the first K of each
                 are touched, the rest are dummies.
    numel: elements. K: live pointers, 1..8. BLOCK: elements per program (power of 2).
    USE_INT64: int64 offsets. Grid: (num_programs,) = (cdiv(numel, BLOCK),).
    """
    pid, offs = _program_offsets(BLOCK, USE_INT64)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(w_ptr.dtype.element_ty)
    _grad_one(g, x0, gx0, w_ptr, partial_ptr, partial_stride, 0, pid, offs, mask)
    if K > 1:
        _grad_one(g, x1, gx1, w_ptr, partial_ptr, partial_stride, 1, pid, offs, mask)
    if K > 2:
        _grad_one(g, x2, gx2, w_ptr, partial_ptr, partial_stride, 2, pid, offs, mask)
    if K > 3:
        _grad_one(g, x3, gx3, w_ptr, partial_ptr, partial_stride, 3, pid, offs, mask)
    if K > 4:
        _grad_one(g, x4, gx4, w_ptr, partial_ptr, partial_stride, 4, pid, offs, mask)
    if K > 5:
        _grad_one(g, x5, gx5, w_ptr, partial_ptr, partial_stride, 5, pid, offs, mask)
    if K > 6:
        _grad_one(g, x6, gx6, w_ptr, partial_ptr, partial_stride, 6, pid, offs, mask)
    if K > 7:
        _grad_one(g, x7, gx7, w_ptr, partial_ptr, partial_stride, 7, pid, offs, mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_xs(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Validate ``xs`` (K >= 1 tensors of one shape, dtype and device); return them contiguous."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"xs: expected a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError("xs: expected at least one tensor, got an empty sequence")
    for k, x in enumerate(xs):
        C.check_tensor(f"xs[{k}]", x)
    C.check_supported_dtype("xs[0]", xs[0])
    for k, x in enumerate(xs[1:], start=1):
        C.check_like(f"xs[{k}]", x, "xs[0]", xs[0])
    return [x.contiguous() for x in xs]


def _check_weights(weights: torch.Tensor, xs: list[torch.Tensor]) -> None:
    C.check_tensor("weights", weights)
    C.check_shape("weights", weights, (len(xs),), "one per tensor in xs")
    C.check_floating("weights", weights)
    C.check_device("weights", weights, "xs", xs[0])


def mixed_sum_forward(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """``out = sum_k weights[k] * xs[k]``.

    Args:
        xs: K >= 1 tensors of one shape S, one dtype (float16, bfloat16, float32 or float64) and
            one device; non-contiguous ones are made contiguous.
        weights: (K,) tensor of any floating dtype on the same device.
        block_size: elements per Triton program (power of two >= 16).

    Returns:
        (S) tensor in the dtype of ``xs``, contiguous. Products and sums are computed in float32
        (float64 for float64 ``xs``) and rounded to the output dtype once.
    """
    xs = _check_xs(xs)
    _check_weights(weights, xs)
    block = check_block(block_size)
    x0 = xs[0]
    acc_dtype = accumulation_dtype(x0.dtype)
    w = weights.detach().to(acc_dtype).contiguous()
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    numel = x0.numel()
    if numel == 0:
        return out

    spans = chunks(len(xs))
    # Running sum between chunks: the output itself when it already has the accumulation dtype.
    if len(spans) == 1 or out.dtype == acc_dtype:
        acc = out
    else:
        acc = torch.empty(x0.shape, dtype=acc_dtype, device=x0.device)
    n_programs, use_int64 = launch_geometry(numel, block)
    kernel = launchable(_mixed_sum_fwd_kernel, [out, w, *xs])
    for i, (start, stop) in enumerate(spans):
        last = i == len(spans) - 1
        kernel[(n_programs,)](
            out if last else acc,
            acc,
            w[start:],  # starts at a multiple of 8 elements: stays 16-byte aligned
            *padded(xs[start:stop], xs[0]),
            numel,
            K=stop - start,
            ACCUMULATE=i > 0,
            BLOCK=block,
            USE_INT64=use_int64,
        )
    return out


def mixed_sum_backward(
    grad_out: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of ``out = sum_k weights[k] * xs[k]``.

    ``grad_xs[k] = weights[k] * grad_out`` and ``grad_weights[k] = sum(grad_out * xs[k])`` over all
    elements, in one pass over ``grad_out`` and ``xs`` per chunk of 8 tensors.

    Args:
        grad_out: (S) gradient of ``out``, any floating dtype, same device as ``xs``.
        xs: K >= 1 tensors of shape S (as for :func:`mixed_sum_forward`).
        weights: (K,) tensor of any floating dtype on the same device.
        block_size: elements per Triton program (power of two >= 16).

    Returns:
        ``(grad_xs, grad_weights)``: ``grad_xs`` a list of K contiguous (S) tensors in the dtype
        of ``xs``; ``grad_weights`` a (K,) tensor in the dtype of ``weights``. Everything is
        computed in float32 (float64 for float64 ``xs``); ``grad_weights`` is reduced per
        program, then across programs by torch, so it is deterministic.
    """
    xs = _check_xs(xs)
    _check_weights(weights, xs)
    block = check_block(block_size)
    x0 = xs[0]
    C.check_tensor("grad_out", grad_out)
    C.check_like("grad_out", grad_out, "xs[0]", x0, dtype=False)
    C.check_floating("grad_out", grad_out)
    grad_out = grad_out.contiguous()

    K = len(xs)
    acc_dtype = accumulation_dtype(x0.dtype)
    w = weights.detach().to(acc_dtype).contiguous()
    grad_xs = [torch.empty_like(x) for x in xs]
    numel = x0.numel()
    if numel == 0:
        return grad_xs, torch.zeros(K, dtype=weights.dtype, device=weights.device)

    n_programs, use_int64 = launch_geometry(numel, block)
    partial = torch.empty((K, n_programs), dtype=acc_dtype, device=x0.device)
    kernel = launchable(_mixed_sum_bwd_kernel, [grad_out, w, *xs])
    for start, stop in chunks(K):
        kernel[(n_programs,)](
            grad_out,
            w[start:],  # chunk starts are multiples of 8 elements: views stay 16-byte aligned
            partial[start:],
            *padded(xs[start:stop], xs[0]),
            *padded(grad_xs[start:stop], grad_xs[0]),
            numel,
            n_programs,
            K=stop - start,
            BLOCK=block,
            USE_INT64=use_int64,
        )
    grad_weights = partial.sum(dim=1).to(weights.dtype)
    return grad_xs, grad_weights
