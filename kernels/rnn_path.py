"""Triton kernels of the fused op ``rnn_path``: the highway step of the DARTS RNN evaluation cell.

Math (as ``csrc/include/pynas/rnn_path.h``), for a node's GEMM output ``ch = [c | g]`` of shape (B, 2H) and its
predecessor state ``p`` (B, H), with the node's activation ``f`` (codes 1 tanh, 2 relu, 3 sigmoid, 4 identity)::

    forward:   s = p + sigmoid(c) * (f(g) - p)           and, with a mask, m = s * h_mask
    backward:  for G = d s:
               d c = G * (f(g) - p) * sigmoid(c) * (1 - sigmoid(c))
               d g = G * sigmoid(c) * f'(g)
               d p = G * (1 - sigmoid(c))                (written, or added to ``g_prev``)

Everything is computed in float32 (float64 when the inputs are float64) and stored in the inputs' dtype. The
activation is a constexpr (one specialisation per code); the loop over nodes and time steps, and the GEMMs,
stay in Python around these kernels (pynas/ops/rnn_path.py, ``rnn_path_forward_impl``).

Layout: one program owns ``BLOCK`` consecutive elements of the (B, H) state; element ``i = b * H + k`` reads
``ch[b, k]`` and ``ch[b, H + k]``. No reductions, so the results do not depend on the launch.

Numerics: sigmoid and tanh from ``z = exp(-|x|)``, which never overflows (saturating to exact 0 / 1 / -1 with
derivatives 0 for large |x|); relu is a select (relu(NaN) = NaN, as ``torch.relu``).

Launching: as kernels/rnn_mix.py (plain tensors directly, traced ones through ``torch.library.wrap_triton``;
under ``TRITON_INTERPRET=1`` on CPU tensors).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import check_block, launch_geometry, launchable

__all__ = ["DEFAULT_BLOCK", "ACTIVATIONS", "rnn_path_step_forward", "rnn_path_step_backward"]

#: Elements of the (B, H) state per program.
DEFAULT_BLOCK = 1024
#: Activation codes (the columns of rnn_mix's probs, 'none' excluded).
ACTIVATIONS = {1: "tanh", 2: "relu", 3: "sigmoid", 4: "identity"}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    """sigmoid(x) from exp(-|x|), overflow-free."""
    pos = x >= 0
    z = tl.exp(tl.where(pos, -x, x))
    return tl.where(pos, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """(f(x), f'(x)) of activation code ACT."""
    if ACT == 1:
        pos = x >= 0
        z = tl.exp(tl.where(pos, -x, x))
        z2 = z * z
        t_abs = (1.0 - z2) / (1.0 + z2)
        a = tl.where(pos, t_abs, -t_abs)
        d = 1.0 - a * a
    elif ACT == 2:
        a = tl.where(x < 0, 0.0, x)
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 3:
        a = _sigmoid(x)
        d = a * (1.0 - a)
    else:
        a = x
        d = tl.full(x.shape, 1.0, x.dtype)
    return a, d


@triton.jit
def _offsets(N, BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
    pid = tl.program_id(0)
    if USE_INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _step_offsets(N, H, BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
    """The program's elements i = b * H + k of a (B, H) plane, their validity, and the position of c = ch[b, k]
    in the (B, 2H) ch (x = ch[b, H + k] is H further)."""
    offs, valid = _offsets(N, BLOCK, USE_INT64)
    row = offs // H
    return offs, valid, row * 2 * H + (offs - row * H)


@triton.jit
def _rnn_path_step_fwd_kernel(
    ch_ptr,
    p_ptr,
    mask_ptr,
    s_ptr,
    m_ptr,
    N,
    H,
    ACT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """s[i] = p[i] + sigmoid(c) * (f_ACT(g) - p[i]) with c = ch[b, k], g = ch[b, H + k], i = b * H + k < N;
    with HAS_MASK also m[i] = s[i] * mask[i] (from the stored s).

    ch_ptr: (B, 2H) contiguous; p_ptr, s_ptr: (B, H) contiguous; mask_ptr, m_ptr: (B, H) contiguous, read or
    written only with HAS_MASK (any tensor otherwise). One dtype for all. N = B * H. WIDE: compute in float64
    (else float32). BLOCK: elements per program (power of two). USE_INT64: int64 offsets.
    Grid: (cdiv(N, BLOCK),).
    """
    offs, valid, cpos = _step_offsets(N, H, BLOCK, USE_INT64)
    acc_ty = tl.float64 if WIDE else tl.float32
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(acc_ty)
    c = tl.load(ch_ptr + cpos, mask=valid, other=0.0).to(acc_ty)
    g = tl.load(ch_ptr + cpos + H, mask=valid, other=0.0).to(acc_ty)
    a, _ = _activation(g, ACT)
    s = (p + _sigmoid(c) * (a - p)).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + offs, s, mask=valid)
    if HAS_MASK:
        hm = tl.load(mask_ptr + offs, mask=valid, other=0.0).to(acc_ty)
        tl.store(m_ptr + offs, (s.to(acc_ty) * hm).to(m_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rnn_path_step_bwd_kernel(
    g_ptr,
    ch_ptr,
    p_ptr,
    gch_ptr,
    gp_ptr,
    N,
    H,
    ACT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """For G = g[i], i = b * H + k < N, c = ch[b, k], x = ch[b, H + k], sc = sigmoid(c):

        gch[b, k] = G * (f(x) - p[i]) * sc * (1 - sc),   gch[b, H + k] = G * sc * f'(x),
        gp[i] = G * (1 - sc)   (ACCUMULATE: gp[i] += ...)

    g_ptr, p_ptr, gp_ptr: (B, H) contiguous; ch_ptr, gch_ptr: (B, 2H) contiguous; one dtype. N, H, ACT, WIDE,
    BLOCK, USE_INT64: as the forward. Grid: (cdiv(N, BLOCK),).
    """
    offs, valid, cpos = _step_offsets(N, H, BLOCK, USE_INT64)
    acc_ty = tl.float64 if WIDE else tl.float32
    G = tl.load(g_ptr + offs, mask=valid, other=0.0).to(acc_ty)
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(acc_ty)
    c = tl.load(ch_ptr + cpos, mask=valid, other=0.0).to(acc_ty)
    x = tl.load(ch_ptr + cpos + H, mask=valid, other=0.0).to(acc_ty)
    a, d = _activation(x, ACT)
    sc = _sigmoid(c)
    tl.store(gch_ptr + cpos, (G * (a - p) * sc * (1.0 - sc)).to(gch_ptr.dtype.element_ty), mask=valid)
    tl.store(gch_ptr + cpos + H, (G * sc * d).to(gch_ptr.dtype.element_ty), mask=valid)
    dp = G * (1.0 - sc)
    if ACCUMULATE:
        dp += tl.load(gp_ptr + offs, mask=valid, other=0.0).to(acc_ty)
    tl.store(gp_ptr + offs, dp.to(gp_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_plane(name: str, t: torch.Tensor, shape, ref: torch.Tensor, what: str) -> None:
    C.check_tensor(name, t)
    C.check_shape(name, t, shape, what)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of prev ({ref.dtype}), got {t.dtype}")
    C.check_device(name, t, "prev", ref)
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def _check_act(act) -> int:
    if not isinstance(act, int) or isinstance(act, bool) or act not in ACTIVATIONS:
        raise ValueError(f"act: expected an activation code 1..4 (tanh, relu, sigmoid, identity), got {act!r}")
    return act


def _geometry(prev: torch.Tensor, block_size: int):
    C.check_tensor("prev", prev)
    if prev.dim() != 2:
        raise ValueError(f"prev: expected shape (B, H), got {tuple(prev.shape)}")
    C.check_supported_dtype("prev", prev)
    block = check_block(block_size)
    B, H = prev.shape
    n_programs, use_int64 = launch_geometry(B * H, block)
    # ch's offsets reach 2 * N
    use_int64 = use_int64 or 2 * n_programs * block > C.INT64_OFFSETS_FROM - 1
    return B, H, block, n_programs, use_int64


def rnn_path_step_forward(ch: torch.Tensor, prev: torch.Tensor, act: int, h_mask: Optional[torch.Tensor],
                          s: torch.Tensor, m: Optional[torch.Tensor], *, block_size: int = DEFAULT_BLOCK) -> None:
    """In place: ``s = prev + sigmoid(ch[:, :H]) * (f(ch[:, H:]) - prev)`` and, with ``h_mask``, ``m = s * h_mask``.

    Args:
        ch: (B, 2H) the node's GEMM output. prev: (B, H) its predecessor state. act: activation code 1..4.
        h_mask: (B, H) or None (then ``m`` must be None). s, m: (B, H) outputs.
        All contiguous, of one dtype (float16, bfloat16, float32, float64) and device.
        block_size: elements per program (power of two >= 16).
    """
    B, H, block, n_programs, use_int64 = _geometry(prev, block_size)
    _check_plane("prev", prev, (B, H), prev, "(B, H)")
    _check_plane("ch", ch, (B, 2 * H), prev, "(B, 2H)")
    _check_plane("s", s, (B, H), prev, "(B, H)")
    if (h_mask is None) != (m is None):
        raise ValueError(f"h_mask, m: expected both or neither, got only {'m' if h_mask is None else 'h_mask'}")
    if h_mask is not None:
        _check_plane("h_mask", h_mask, (B, H), prev, "(B, H)")
        _check_plane("m", m, (B, H), prev, "(B, H)")
    act = _check_act(act)
    if B * H == 0:
        return
    mask_t = h_mask if h_mask is not None else prev  # never read without HAS_MASK
    m_t = m if m is not None else s  # never written without HAS_MASK
    kernel = launchable(_rnn_path_step_fwd_kernel, [ch, prev, mask_t, s, m_t])
    kernel[(n_programs,)](ch, prev, mask_t, s, m_t, B * H, H, ACT=act, HAS_MASK=h_mask is not None,
                          WIDE=prev.dtype == torch.float64, BLOCK=block, USE_INT64=use_int64)


def rnn_path_step_backward(g: torch.Tensor, ch: torch.Tensor, prev: torch.Tensor, act: int, gch: torch.Tensor,
                           g_prev: torch.Tensor, accumulate: bool, *, block_size: int = DEFAULT_BLOCK) -> None:
    """In place, from ``g`` = d s of :func:`rnn_path_step_forward`: ``gch = [d c | d g]`` and ``g_prev = d prev``
    (``g_prev += d prev`` with ``accumulate``).

    Args:
        g, prev, g_prev: (B, H); ch, gch: (B, 2H); all contiguous, of one dtype and device. act: code 1..4.
        block_size: elements per program (power of two >= 16).
    """
    B, H, block, n_programs, use_int64 = _geometry(prev, block_size)
    _check_plane("prev", prev, (B, H), prev, "(B, H)")
    _check_plane("g", g, (B, H), prev, "(B, H)")
    _check_plane("ch", ch, (B, 2 * H), prev, "(B, 2H)")
    _check_plane("gch", gch, (B, 2 * H), prev, "(B, 2H)")
    _check_plane("g_prev", g_prev, (B, H), prev, "(B, H)")
    act = _check_act(act)
    if B * H == 0:
        return
    kernel = launchable(_rnn_path_step_bwd_kernel, [g, ch, prev, gch, g_prev])
    kernel[(n_programs,)](g, ch, prev, gch, g_prev, B * H, H, ACT=act, ACCUMULATE=bool(accumulate),
                          WIDE=prev.dtype == torch.float64, BLOCK=block, USE_INT64=use_int64)
