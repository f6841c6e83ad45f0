"""Triton kernels of the fused op ``rnn_mix``, the node mix of the DARTS RNN search cell.

Math (as ``csrc/include/pynas/rnn_mix.h``), for ``states``, ``c`` (already through the sigmoid) and
``h`` of shape (J, B, H) and ``probs`` (J, 5) over the functions none, tanh, relu, sigmoid,
identity (column 0, 'none', contributes nothing)::

    forward:   out[b, k] = sum_j sum_{f = 1..4} probs[j, f] * (s + c * (f(h) - s))
                         = sum_j ( P_j * s + c * (A - P_j * s) )          (s, c, h at [j, b, k])
               with P_j = sum_{f>=1} probs[j, f] and A = sum_{f>=1} probs[j, f] * f(h)
    backward:  for g = grad_out[b, k]:
               d s = g * P_j * (1 - c)
               d c = g * (A - P_j * s)
               d h = g * c * sum_{f>=1} probs[j, f] * f'(h)
               d probs[j, f] = sum_{b, k} g * (s + c * (f(h) - s))    (f >= 1; d probs[j, 0] = 0)

The activations are recomputed in backward, never stored. Everything is computed in float32
(float64 when the inputs are float64); ``out``, ``d states``, ``d c`` and ``d h`` are stored in the
inputs' dtype, ``d probs`` in the dtype of ``probs``.

Layout: the (J, B, H) inputs are viewed as J planes of N = B * H elements. One program owns a block
of ``BLOCK`` elements of a plane and loops over j, so ``out`` is written once per element (forward)
and ``grad_out`` read once per element (backward).

Numerics: tanh and sigmoid share one ``z = exp(-|h|)``, which never overflows:
``sigmoid(h) = 1 / (1 + z)`` for h >= 0 and ``z / (1 + z)`` otherwise, and
``tanh(h) = sign(h) * (1 - z^2) / (1 + z^2)``; large |h| (both signs), and h = +-inf, give exact
0 / 1 / -1 saturation instead of inf / nan, with derivatives 0; relu is a select (never ``0 * h``, NaN
at h = +-inf), so an infinite h reaches the results only through the relu and identity columns, as in
the plain-PyTorch formula. A NaN h gives NaN (relu included, as ``torch.relu``).

``d probs`` is deterministic: program p writes ``sum_{i in its block} g * (s + c * (f(h) - s))`` to
``partial[p, j, f]`` of a (num_programs, J, 5) buffer (column 0 written as zero; no atomics), and
torch sums it over dim 0.

Launching: as in ``mixed_sum``, plain tensors get a direct launch, tensor subclasses (Fake and
Functional tensors while ``torch.library.triton_op`` / ``torch.compile`` trace) a launch through
``torch.library.wrap_triton``; under ``TRITON_INTERPRET=1`` the kernels always launch directly and
run on CPU tensors. Note that the interpreter converts float32 to bfloat16 by truncation, where GPUs
round to nearest even: bfloat16 results under the interpreter can be one bfloat16 ulp further from
the truth than on a GPU.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import INT64_OFFSETS_FROM, accumulation_dtype, check_block, launch_geometry, launchable

__all__ = ["DEFAULT_BLOCK", "NUM_FUNCS", "rnn_mix_forward", "rnn_mix_backward"]

#: Elements (of one (B, H) plane) per program.
DEFAULT_BLOCK = 1024
#: Columns of ``probs``: none, tanh, relu, sigmoid, identity.
NUM_FUNCS = 5


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _activations(h):
    """(tanh(h), relu(h), sigmoid(h)) of a block ``h``, overflow-free (one exp)."""
    pos = h >= 0
    z = tl.exp(tl.where(pos, -h, h))  # exp(-|h|), in (0, 1]
    one_z = 1.0 + z
    sg = tl.where(pos, 1.0 / one_z, z / one_z)
    z2 = z * z  # exp(-2|h|)
    t_abs = (1.0 - z2) / (1.0 + z2)
    t = tl.where(pos, t_abs, -t_abs)
    r = tl.where(h < 0, 0.0, h)  # relu(NaN) = NaN, as torch.relu
    return t, r, sg


@triton.jit
def _rnn_mix_fwd_kernel(
    out_ptr,
    s_ptr,
    c_ptr,
    h_ptr,
    p_ptr,
    J,
    N,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """out[i] = sum_{j < J} sum_{f=1..4} p[j, f] * (s + c * (f(h) - s)),  s/c/h at [j, i], i < N.

    out_ptr: (N,) written, in the inputs' dtype (rounded once from the accumulation dtype).
    s_ptr, c_ptr, h_ptr: (J, N) contiguous, any float dtype (read as the accumulation dtype).
    p_ptr: (J, 5) contiguous probs, already in the accumulation dtype (float32/float64), which
           sets the dtype of every product and sum.
    J: nodes (runtime loop). N: B * H elements per plane. BLOCK: elements per program (power of
    two). USE_INT64: int64 offsets (needed once pid * BLOCK can pass 2**31 - 1); planes are
    stepped by advancing the pointers, so J * N may pass 2**31 either way.
    Grid: (cdiv(N, BLOCK),).
    """
    pid = tl.program_id(0)
    if USE_INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    s_ptrs = s_ptr + offs
    c_ptrs = c_ptr + offs
    h_ptrs = h_ptr + offs
    p_row = p_ptr
    for _ in range(0, J):
        p1 = tl.load(p_row + 1)
        p2 = tl.load(p_row + 2)
        p3 = tl.load(p_row + 3)
        p4 = tl.load(p_row + 4)
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(p1.dtype)
        c = tl.load(c_ptrs, mask=mask, other=0.0).to(p1.dtype)
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(p1.dtype)
        t, r, sg = _activations(h)
        P = p1 + p2 + p3 + p4
        A = p1 * t + p2 * r + p3 * sg + p4 * h
        Ps = P * s
        acc += Ps + c * (A - Ps)
        s_ptrs += N
        c_ptrs += N
        h_ptrs += N
        p_row += 5
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rnn_mix_bwd_kernel(
    g_ptr,
    s_ptr,
    c_ptr,
    h_ptr,
    p_ptr,
    ds_ptr,
    dc_ptr,
    dh_ptr,
    partial_ptr,
    J,
    N,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """One pass over grad_out and the J planes, for element i < N of program p's block:

        ds[j, i] = g * P_j * (1 - c),  dc[j, i] = g * (A - P_j * s),  dh[j, i] = g * c * D
        partial[p, j, f] = sum_{i in block p, i < N} g * (s + c * (f(h) - s))   (f >= 1; f = 0: 0)

    with g = grad_out[i], P_j = sum_{f>=1} p[j, f], A = sum_{f>=1} p[j, f] f(h),
    D = sum_{f>=1} p[j, f] f'(h).
    g_ptr: (N,) grad_out, any float dtype. s/c/h_ptr: (J, N) inputs; ds/dc/dh_ptr: (J, N) outputs
    in the inputs' dtype. p_ptr: (J, 5) probs in the accumulation dtype (float32/float64).
    partial_ptr: (num_programs, J, 5) contiguous, accumulation dtype; every entry of row p is
    written. J, N, BLOCK, USE_INT64: as the forward. Grid: (num_programs,) = (cdiv(N, BLOCK),).
    """
    pid = tl.program_id(0)
    if USE_INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc_ty = p_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_ty)  # zero on masked lanes
    s_ptrs = s_ptr + offs
    c_ptrs = c_ptr + offs
    h_ptrs = h_ptr + offs
    ds_ptrs = ds_ptr + offs
    dc_ptrs = dc_ptr + offs
    dh_ptrs = dh_ptr + offs
    p_row = p_ptr
    part = partial_ptr + pid * J * 5
    for _ in range(0, J):
        p1 = tl.load(p_row + 1)
        p2 = tl.load(p_row + 2)
        p3 = tl.load(p_row + 3)
        p4 = tl.load(p_row + 4)
        s = tl.load(s_ptrs, mask=mask, other=0.0).to(acc_ty)
        c = tl.load(c_ptrs, mask=mask, other=0.0).to(acc_ty)
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(acc_ty)
        t, r, sg = _activations(h)
        dt = 1.0 - t * t
        dr = tl.where(h > 0, 1.0, 0.0)
        dsg = sg * (1.0 - sg)
        P = p1 + p2 + p3 + p4
        A = p1 * t + p2 * r + p3 * sg + p4 * h
        D = p1 * dt + p2 * dr + p3 * dsg + p4
        Ps = P * s
        tl.store(ds_ptrs, (g * P * (1.0 - c)).to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(dc_ptrs, (g * (A - Ps)).to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs, (g * c * D).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(part, 0.0)
        tl.store(part + 1, tl.sum(g * (s + c * (t - s)), axis=0))
        tl.store(part + 2, tl.sum(g * (s + c * (r - s)), axis=0))
        tl.store(part + 3, tl.sum(g * (s + c * (sg - s)), axis=0))
        tl.store(part + 4, tl.sum(g * (s + c * (h - s)), axis=0))
        s_ptrs += N
        c_ptrs += N
        h_ptrs += N
        ds_ptrs += N
        dc_ptrs += N
        dh_ptrs += N
        p_row += 5
        part += 5


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_inputs(
    states: torch.Tensor, c: torch.Tensor, h: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the operands; return ``states``, ``c``, ``h`` contiguous."""
    named = (("states", states), ("c", c), ("h", h), ("probs", probs))
    for name, t in named:
        C.check_tensor(name, t)
    if states.dim() != 3:
        raise ValueError(f"states: expected shape (J, B, H), got {tuple(states.shape)}")
    C.check_supported_dtype("states", states)
    for name, t in named[1:3]:
        C.check_like(name, t, "states", states)
    C.check_shape("probs", probs, (states.shape[0], NUM_FUNCS), "J nodes x none, tanh, relu, sigmoid, identity")
    C.check_floating("probs", probs)
    C.check_device("probs", probs, "states", states)
    return states.contiguous(), c.contiguous(), h.contiguous()


def rnn_mix_forward(
    states: torch.Tensor,
    c: torch.Tensor,
    h: torch.Tensor,
    probs: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """``out = sum_j sum_{f=1..4} probs[j, f] * (states + c * (f(h) - states))`` over nodes j.

    Args:
        states, c, h: (J, B, H) tensors of one dtype (float16, bfloat16, float32 or float64) and
            one device; ``c`` already through the sigmoid. Non-contiguous ones are made contiguous.
        probs: (J, 5) tensor of any floating dtype on the same device, columns none, tanh, relu,
            sigmoid, identity (column 0 is ignored).
        block_size: elements of a (B, H) plane per Triton program (power of two >= 16).

    Returns:
        (B, H) contiguous tensor in the dtype of ``states``; computed in float32 (float64 for
        float64 inputs) and rounded once. J = 0 gives zeros.
    """
    states, c, h = _check_inputs(states, c, h, probs)
    block = check_block(block_size)
    J, B, H = states.shape
    acc_dtype = accumulation_dtype(states.dtype)
    p = probs.detach().to(acc_dtype).contiguous()
    out = torch.empty((B, H), dtype=states.dtype, device=states.device)
    n = B * H
    if n == 0:
        return out
    if J == 0:
        return out.zero_()
    n_programs, use_int64 = launch_geometry(n, block)
    kernel = launchable(_rnn_mix_fwd_kernel, [out, states, c, h, p])
    kernel[(n_programs,)](out, states, c, h, p, J, n, BLOCK=block, USE_INT64=use_int64)
    return out


def rnn_mix_backward(
    grad_out: torch.Tensor,
    states: torch.Tensor,
    c: torch.Tensor,
    h: torch.Tensor,
    probs: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`rnn_mix_forward`, in one pass over ``grad_out`` and the inputs.

    Args:
        grad_out: (B, H) gradient of ``out``, any floating dtype, same device as ``states``.
        states, c, h, probs: as for :func:`rnn_mix_forward`.
        block_size: elements of a (B, H) plane per Triton program (power of two >= 16).

    Returns:
        ``(d_states, d_c, d_h, d_probs)``: the first three (J, B, H) contiguous in the dtype of
        ``states``, ``d_probs`` (J, 5) in the dtype of ``probs`` with column 0 zero. Computed in
        float32 (float64 for float64 inputs); ``d_probs`` is reduced per program, then across
        programs by torch, so it is deterministic.
    """
    states, c, h = _check_inputs(states, c, h, probs)
    block = check_block(block_size)
    J, B, H = states.shape
    C.check_tensor("grad_out", grad_out)
    C.check_shape("grad_out", grad_out, (B, H), "the (B, H) of states")
    C.check_floating("grad_out", grad_out)
    C.check_device("grad_out", grad_out, "states", states)
    grad_out = grad_out.contiguous()

    acc_dtype = accumulation_dtype(states.dtype)
    p = probs.detach().to(acc_dtype).contiguous()
    d_states = torch.empty_like(states)
    d_c = torch.empty_like(c)
    d_h = torch.empty_like(h)
    n = B * H
    if n == 0 or J == 0:
        d_probs = torch.zeros((J, NUM_FUNCS), dtype=probs.dtype, device=probs.device)
        return d_states, d_c, d_h, d_probs

    n_programs, use_int64 = launch_geometry(n, block)
    # partial offsets pid * J * 5 + ... must fit as well
    use_int64 = use_int64 or n_programs * J * NUM_FUNCS > INT64_OFFSETS_FROM - 1
    partial = torch.empty((n_programs, J, NUM_FUNCS), dtype=acc_dtype, device=states.device)
    kernel = launchable(_rnn_mix_bwd_kernel, [grad_out, states, c, h, p])
    kernel[(n_programs,)](
        grad_out, states, c, h, p, d_states, d_c, d_h, partial, J, n,
        BLOCK=block, USE_INT64=use_int64,
    )
    d_probs = partial.sum(dim=0).to(probs.dtype)
    return d_states, d_c, d_h, d_probs
