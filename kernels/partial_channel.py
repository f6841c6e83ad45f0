"""Triton kernels of the fused op ``partial_channel``, the output of a PC-DARTS partial-channel edge.

The two functions have the names, argument order and return structure of the ``pynas._C`` bindings
``partial_channel_forward`` and ``partial_channel_backward`` (contract in
``csrc/include/pynas/partial_channel.h``), so ``pynas/ops/partial_channel.py`` can call either module.

Math, for x (N, C, H, W), K = ``groups`` (Cg = C / K), stride s in {1, 2} and t (N, Cg, H / s, W / s)::

    bypass = x[:, Cg:]  (s = 1)   or   max_pool2d(x[:, Cg:], 2, 2)  (s = 2)
    out[:, c' * K + g] = cat([t, bypass], 1)[:, g * Cg + c']            (channel shuffle, K groups)
    backward: g_t = d t; g_x (N, C, H, W) zero in its first Cg channels, the bypass gradient in the rest
              (s = 2: each window's gradient at its first maximum in row-major order, NaN counting as a
              maximum, as torch's max_pool2d)

Kernels, both with grid (N * C planes, tiles of the (H / s, W / s) plane):

* forward: program (n, oc) reads one plane of t, one of x, or the four values of each 2x2 window of
  one plane of x, and writes plane (n, oc) of ``out``: one pass, no concatenation, no pooled copy.
* backward: program (n, a) reads plane (n, out channel of a) of g and writes plane (n, a) of g_x,
  and for a < Cg plane (n, a) of g_t (g_x zero there).

Values are only copied and compared, never rounded: results are exact in every dtype (float16,
bfloat16, float32, float64; on CPU tensors under ``TRITON_INTERPRET=1`` float32 and float64, as the
op's table says). Kernels are launched directly; the wrappers never synchronise with the GPU.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from .._triton import interpreting
from ._common import SUPPORTED_DTYPES

__all__ = ["partial_channel_forward", "partial_channel_backward"]

#: Largest tile (values of an output plane per program).
_MAX_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _window_argmax(x00, x01, x10, x11, WIDE: tl.constexpr):
    """The tap (0..3, row-major) of each 2x2 window's maximum: the first maximum, a later value
    winning when greater or NaN (torch's max_pool2d). Compared in float64 (WIDE) or float32 (which
    holds float16 and bfloat16 exactly)."""
    if WIDE:
        x00, x01, x10, x11 = x00.to(tl.float64), x01.to(tl.float64), x10.to(tl.float64), x11.to(tl.float64)
    else:
        x00, x01, x10, x11 = x00.to(tl.float32), x01.to(tl.float32), x10.to(tl.float32), x11.to(tl.float32)
    best = x00
    arg = tl.zeros(x00.shape, tl.int32)
    better = (x01 > best) | (x01 != x01)
    best = tl.where(better, x01, best)
    arg = tl.where(better, 1, arg)
    better = (x10 > best) | (x10 != x10)
    best = tl.where(better, x10, best)
    arg = tl.where(better, 2, arg)
    better = (x11 > best) | (x11 != x11)
    arg = tl.where(better, 3, arg)
    return arg


@triton.jit
def _pc_fwd_kernel(
    t_ptr, x_ptr, out_ptr,
    C, K, CG, W, Wo, HWo,
    STRIDE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[n, oc] = t[n, a] (a < CG), x[n, a] (STRIDE 1) or maxpool2x2(x[n, a]) (STRIDE 2), with
    a = (oc % K) * CG + oc // K the channel of cat([t, bypass]) that out channel oc shows.

    t_ptr: (N, CG, Ho, Wo); x_ptr: (N, C, H, W); out_ptr: (N, C, Ho, Wo), contiguous, one dtype.
    WIDE: compare in float64 (float64 inputs), else float32. Grid: (N * C, cdiv(Ho * Wo, BLOCK)).
    """
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HWo
    n = plane // C
    oc = plane % C
    a = (oc % K) * CG + oc // K
    inner = a < CG
    from_t = mask & inner
    from_x = mask & (a >= CG)
    # t's plane index only where it exists (a < CG): other programs read nothing of t
    tv = tl.load(t_ptr + (n * CG + tl.where(inner, a, 0)) * HWo + offs, mask=from_t)
    if STRIDE == 1:
        xv = tl.load(x_ptr + (n * C + a) * HWo + offs, mask=from_x)
    else:
        oh = offs // Wo
        ow = offs % Wo
        at = x_ptr + (n * C + a) * (4 * HWo) + (2 * oh) * W + 2 * ow
        x00 = tl.load(at, mask=from_x)
        x01 = tl.load(at + 1, mask=from_x)
        x10 = tl.load(at + W, mask=from_x)
        x11 = tl.load(at + W + 1, mask=from_x)
        arg = _window_argmax(x00, x01, x10, x11, WIDE)
        xv = tl.where(arg == 0, x00, tl.where(arg == 1, x01, tl.where(arg == 2, x10, x11)))
    tl.store(out_ptr + plane * HWo + offs, tl.where(inner, tv, xv), mask=mask)


@triton.jit
def _pc_bwd_kernel(
    g_ptr, x_ptr, gt_ptr, gx_ptr,
    C, K, CG, W, Wo, HWo,
    STRIDE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    """For plane (n, a) of cat([t, bypass]) and v = g[n, oc] (oc = (a % CG) * K + a // CG):

        a < CG:   g_t[n, a] = v, g_x[n, a] = 0
        a >= CG:  g_x[n, a] = v (STRIDE 1), or v at each 2x2 window's argmax of x[n, a], 0 at its
                  other three positions (STRIDE 2)

    g_ptr: (N, C, Ho, Wo); x_ptr, gx_ptr: (N, C, H, W); gt_ptr: (N, CG, Ho, Wo), contiguous, one
    dtype. WIDE: as for the forward. Tiles are of the (Ho, Wo) plane. Grid: (N * C, cdiv(Ho * Wo, BLOCK)).
    """
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HWo
    n = plane // C
    a = plane % C
    oc = (a % CG) * K + a // CG
    inner = a < CG
    v = tl.load(g_ptr + (n * C + oc) * HWo + offs, mask=mask)
    zero = tl.zeros([BLOCK], v.dtype)
    tl.store(gt_ptr + (n * CG + tl.where(inner, a, 0)) * HWo + offs, v, mask=mask & inner)
    if STRIDE == 1:
        tl.store(gx_ptr + plane * HWo + offs, tl.where(inner, zero, v), mask=mask)
    else:
        oh = offs // Wo
        ow = offs % Wo
        base = plane * (4 * HWo) + (2 * oh) * W + 2 * ow
        from_x = mask & (a >= CG)
        x00 = tl.load(x_ptr + base, mask=from_x)
        x01 = tl.load(x_ptr + base + 1, mask=from_x)
        x10 = tl.load(x_ptr + base + W, mask=from_x)
        x11 = tl.load(x_ptr + base + W + 1, mask=from_x)
        arg = _window_argmax(x00, x01, x10, x11, WIDE)
        arg = tl.where(inner, -1, arg)
        tl.store(gx_ptr + base, tl.where(arg == 0, v, zero), mask=mask)
        tl.store(gx_ptr + base + 1, tl.where(arg == 1, v, zero), mask=mask)
        tl.store(gx_ptr + base + W, tl.where(arg == 2, v, zero), mask=mask)
        tl.store(gx_ptr + base + W + 1, tl.where(arg == 3, v, zero), mask=mask)


# --------------------------------------------------------------------------------------------
# Argument checks (the bindings' checks in csrc/bindings.cpp, as Python exceptions)
# --------------------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_int(op: str, v, name: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{op}: {name}: expected an int, got {type(v).__name__}")
    return operator.index(v)


def _check_geometry(op: str, x, groups, stride):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x: expected a tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"{op}: x: expected a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x: expected 4-D (N, C, H, W), got {_describe(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x: expected dtype torch.float16, torch.bfloat16, torch.float32 or torch.float64, "
                        f"got {_describe(x)}")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError(f"{op}: x is on cpu; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")
    groups = _check_int(op, groups, "groups")
    stride = _check_int(op, stride, "stride")
    N, C, H, W = x.shape
    if groups < 1:
        raise ValueError(f"{op}: groups: expected a positive integer, got {groups}")
    if C % groups:
        raise ValueError(f"{op}: groups: expected a divisor of x's channels ({C}), got {groups}")
    if stride not in (1, 2):
        raise ValueError(f"{op}: stride: expected 1 or 2, got {stride}")
    if stride == 2 and (H % 2 or W % 2):
        raise ValueError(f"{op}: x: expected an even height and width at stride 2 (a 2x2 max pool), "
                         f"got {_describe(x)}")
    return groups, stride


def _check_plane(op: str, t, name: str, x: torch.Tensor, channels: int, stride: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a tensor, got {type(t).__name__}")
    N, _, H, W = x.shape
    shape = (N, channels, H // stride, W // stride)
    if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device or t.layout != torch.strided:
        raise ValueError(f"{op}: {name}: expected {list(shape)} ({what}) with the dtype and device of x, "
                         f"got {_describe(t)}")


def _launch_args(x: torch.Tensor, groups: int, stride: int):
    N, C, H, W = x.shape
    wo = W // stride
    hwo = (H // stride) * wo
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(hwo, 1))))
    grid = (N * C, triton.cdiv(hwo, block))
    return grid, (C, groups, C // groups, W, wo, hwo), dict(STRIDE=stride, WIDE=x.dtype == torch.float64,
                                                             BLOCK=block)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def partial_channel_forward(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """``out`` (N, C, H / stride, W / stride) in x's dtype, contiguous (see the module docstring).

    Args:
        t: (N, C / groups, H / stride, W / stride), the inner op's output, x's dtype and device.
        x: (N, C, H, W), the edge's input.
        groups: K, a divisor of C. stride: 1 or 2 (then H and W even).
    """
    op = "partial_channel_forward"
    groups, stride = _check_geometry(op, x, groups, stride)
    _check_plane(op, t, "t", x, x.shape[1] // groups, stride, "N, C / groups, H / stride, W / stride")
    t, x = t.detach().contiguous(), x.detach().contiguous()
    N, C, H, W = x.shape
    out = torch.empty((N, C, H // stride, W // stride), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid, ints, consts = _launch_args(x, groups, stride)
    _pc_fwd_kernel[grid](t, x, out, *ints, **consts)
    return out


def partial_channel_backward(g: torch.Tensor, x: torch.Tensor, groups: int,
                             stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_t, g_x)``: g_t (N, C / groups, H / stride, W / stride), g_x (N, C, H, W) zero in its first
    C / groups channels, both contiguous in g's dtype (see the module docstring).

    Args:
        g: (N, C, H / stride, W / stride), the gradient of ``out``, x's dtype and device.
        x: (N, C, H, W), the edge's input (its 2x2 windows' maxima at stride 2).
        groups, stride: as for :func:`partial_channel_forward`.
    """
    op = "partial_channel_backward"
    groups, stride = _check_geometry(op, x, groups, stride)
    _check_plane(op, g, "g", x, x.shape[1], stride, "the output's shape")
    g, x = g.detach().contiguous(), x.detach().contiguous()
    N, C, H, W = x.shape
    g_t = torch.empty((N, C // groups, H // stride, W // stride), dtype=g.dtype, device=g.device)
    g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if g.numel() == 0:
        return g_t, g_x
    grid, ints, consts = _launch_args(x, groups, stride)
    _pc_bwd_kernel[grid](g, x, g_t, g_x, *ints, **consts)
    return g_t, g_x
