"""Triton kernels of the fused DARTS CNN edge (a whole MixedOp), interchangeable with ``pynas._C``.

The functions below have the names, argument order and return structure of the ``pynas._C``
bindings ``cnn_edge_dw_forward``, ``cnn_edge_dw_backward``, ``cnn_edge_bn_stats``, ``cnn_edge_bn_backward``,
``cnn_edge_mix_forward`` and ``cnn_edge_mix_backward`` (contracts in ``csrc/include/pynas/cnn_edge.h``),
so ``pynas/ops/cnn_edge.py`` can call either module; ``cnn_edge_pw_forward`` / ``cnn_edge_pw_backward`` (the
1x1 convs, CPU-only in ``pynas._C``) are here too, as torch matmuls plus the BatchNorm statistics
kernel. Activations are NCHW; one (n, c) plane is ``x[n, c]``, and every kernel's grid is
(planes, tiles of a plane).

Math, for x (N, C, H, W), per channel c (``M`` = number of values a BatchNorm sees per channel)::

    pre(x)     = x                                  pre = 0
               = relu(x)                            pre = 1
               = relu((x - mean[c]) * rstd[c])      pre = 2  (the previous BatchNorm, applied on read)
    dwconv:      y[n,c,o,p] = sum_{i,j} w[c,0,i,j] * pre(x)[n, c, o*s - pad + i*d, p*s - pad + j*d]
                 (zero outside the plane, AFTER the transform)
    its grads:   grad_in   = pre'(x) * sum_m dwconv_m^T(gs[m])   (pre = 2: w.r.t. a = (x - mean) * rstd)
                 grad_w[c] = sum_{n,o,p} gs[n,c,o,p] * pre(x)[n, c, o*s - pad + i*d, p*s - pad + j*d]
                 sums      = (sum grad_in, sum grad_in * a) per channel            (pre = 2 only)
    BN stats:    mean = sum(p) / M, var = sum((p - mean)^2) / M, rstd = 1 / sqrt(var + eps)
                 running_mean <- (1 - momentum) * running_mean + momentum * mean
                 running_var  <- (1 - momentum) * running_var + momentum * var * M / (M - 1)
    BN backward: grad_p = rstd * (g - sum(g) / M - xhat * sum(g * xhat) / M),  xhat = (p - mean) * rstd
    the mix:     out = w[0] BN(maxpool(x)) + w[1] BN(avgpool(x)) + w[2] x + sum_j w[3 + j] BN(ps[j])
                 pools 3x3, stride s, padding 1; avg counts only the input pixels (count_include_pad
                 False); max sends its gradient to the first maximum of the window in row-major
                 order, as torch does. Its backward recomputes the pools from x.

How the kernels split the work:

* Every reduction over the batch is deterministic, without atomics: a kernel writes one partial
  per (plane, tile) - sums, or (count, mean, M2) for the moments, merged by Chan's formula - and
  torch adds the partials over tiles, then over the batch, in a fixed order. The per-channel
  coefficients (rstd, the BatchNorm backward's A, B, D, the mix's a_j = w_j * rstd_j) are a few
  torch ops on (C,)-vectors: no host synchronisation anywhere.
* A depthwise-conv program works on a (taps, pixels) tile: every tap of a block of output (or
  input) pixels in one masked load, then a sum over the taps (``KS`` is a constexpr). The
  transposed conv of the backward is a gather (each input pixel collects the outputs that read
  it), so it needs no atomics either. With several convs in one call the input gradient is
  accumulated, conv by conv, in the accumulation dtype, and rounded once.
* The mix forward reads ``ps`` through up to ``MAX_POINTERS`` pointer arguments per launch (as
  ``kernels/mixed_sum.py`` does), more in chunks that add to a running sum.
* The max pool's backward stores, per output pixel, the BatchNorm-backward gradient and the tap
  (0..8) of its first maximum; a gather kernel then brings them (and the avg pool's and the skip's
  share) to each input pixel.

dtypes: activations float16, bfloat16, float32 or float64, also on CPU tensors under
``TRITON_INTERPRET=1`` (where float32 is rounded to bfloat16 by truncation, not to nearest).
Everything is computed in float32 (float64 for float64); ``mean``, ``rstd`` and ``sums`` are
returned in that accumulation dtype (as inputs, the activations' dtype is accepted too); running
statistics are updated in their own dtype; ``grad_w`` of the mix has ``w``'s dtype, depthwise
weight gradients the weights' dtype. Kernels are launched directly (no
``torch.library.wrap_triton``), and the wrappers never synchronise with the GPU.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._triton import interpreting
from ..ops._conv1x1 import conv1x1, conv1x1_backward
from ._common import MAX_POINTERS, SUPPORTED_DTYPES, accumulation_dtype, chunks, padded

__all__ = [
    "MAX_POINTERS",
    "cnn_edge_dw_forward",
    "cnn_edge_dw_backward",
    "cnn_edge_bn_stats",
    "cnn_edge_bn_backward",
    "cnn_edge_mix_forward",
    "cnn_edge_mix_backward",
    "cnn_edge_pw_forward",
    "cnn_edge_pw_backward",
]

#: Largest tile (elements of a plane per program) of the elementwise and reduction kernels.
_MAX_BLOCK = 1024
#: Largest (taps x pixels) tile of the depthwise-conv kernels, in elements.
_MAX_CONV_TILE = 4096

_PRE_NONE, _PRE_RELU, _PRE_NORM_RELU = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Kernels: shared pieces
# --------------------------------------------------------------------------------------------


@triton.jit
def _plane_tile(BLOCK: tl.constexpr):
    """(plane, tile, offs): plane = program_id(0) as int64, offs = tile * BLOCK + [0, BLOCK)."""
    plane = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    return plane, tile, tile * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _transform(v, mu, r, PRE: tl.constexpr):
    """pre(v): v, relu(v) or relu((v - mu) * r); relu as ``v > 0 ? v : 0`` like the C++ code."""
    if PRE == 1:
        v = tl.where(v > 0, v, 0.0)
    elif PRE == 2:
        v = (v - mu) * r
        v = tl.where(v > 0, v, 0.0)
    return v


@triton.jit
def _tile_moments(v, mask, cnt):
    """(mean, M2) of the ``cnt`` valid lanes of ``v`` (masked lanes must hold 0)."""
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(mask, v - mean, 0.0)
    return mean, tl.sum(d * d, axis=0)


@triton.jit
def _store_moments(part_ptr, v, mask, cnt):
    """part[0..2] = (cnt, mean, M2) of the tile."""
    mean, m2 = _tile_moments(v, mask, cnt)
    tl.store(part_ptr, cnt)
    tl.store(part_ptr + 1, mean)
    tl.store(part_ptr + 2, m2)


@triton.jit
def _max_pool_tile(xb, oh, ow, mask, H, W, stride, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(max, tap) of the 3x3 windows (padding 1) at outputs (oh, ow) of the plane at ``xb``.

    ``tap`` (ki * 3 + kj) is the first maximum in row-major window order: it starts at the first
    in-bounds pixel and moves only on a strictly greater value, as torch's max_pool2d does. Masked
    lanes hold -inf.
    """
    best = tl.full([BLOCK], float("-inf"), ACC)
    ih0 = oh * stride - 1
    iw0 = ow * stride - 1
    arg = tl.where(ih0 < 0, 3, 0) + tl.where(iw0 < 0, 1, 0)
    for ki in tl.static_range(3):
        ih = ih0 + ki
        ok_h = mask & (ih >= 0) & (ih < H)
        for kj in tl.static_range(3):
            iw = iw0 + kj
            ok = ok_h & (iw >= 0) & (iw < W)
            v = tl.load(xb + ih * W + iw, mask=ok, other=float("-inf")).to(ACC)
            better = v > best
            best = tl.where(better, v, best)
            arg = tl.where(better, ki * 3 + kj, arg)
    return best, arg


@triton.jit
def _avg_pool_tile(xb, oh, ow, mask, H, W, stride, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(avg, 1 / count) of the 3x3 windows (padding 1, padding not counted); masked lanes 0."""
    acc = tl.zeros([BLOCK], ACC)
    ih0 = oh * stride - 1
    iw0 = ow * stride - 1
    for ki in tl.static_range(3):
        ih = ih0 + ki
        ok_h = mask & (ih >= 0) & (ih < H)
        for kj in tl.static_range(3):
            iw = iw0 + kj
            ok = ok_h & (iw >= 0) & (iw < W)
            acc += tl.load(xb + ih * W + iw, mask=ok, other=0.0).to(ACC)
    ch = tl.minimum(ih0 + 3, H) - tl.maximum(ih0, 0)
    cw = tl.minimum(iw0 + 3, W) - tl.maximum(iw0, 0)
    cnt = tl.where(mask, ch * cw, 1).to(ACC)
    inv = 1.0 / cnt
    return tl.where(mask, acc * inv, 0.0), inv


# --------------------------------------------------------------------------------------------
# Kernels: depthwise convs
# --------------------------------------------------------------------------------------------


@triton.jit
def _taps(KS: tl.constexpr, TAPS: tl.constexpr):
    """The taps of a KS x KS window as a (TAPS,) vector: (tap, ki, kj, valid); TAPS >= KS*KS."""
    tap = tl.arange(0, TAPS)
    return tap, tap // KS, tap % KS, tap < KS * KS


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w_ptr, mean_ptr, rstd_ptr, y_ptr,
    C, H, W, Ho, Wo, stride, pad, dil,
    KS: tl.constexpr, TAPS: tl.constexpr, PRE: tl.constexpr, BLOCK: tl.constexpr,
):
    """y[plane, o, p] = sum_{i,j < KS} w[c, i, j] * pre(x)[plane, o*stride - pad + i*dil, ...].

    One (TAPS, BLOCK) tile: every tap of BLOCK output pixels, summed over the taps.
    x_ptr: (N*C, H, W) activations. w_ptr: (C, KS*KS) weights in the accumulation dtype (which
    sets the dtype of the math). mean_ptr, rstd_ptr: (C,) accumulation dtype, read when PRE == 2.
    y_ptr: (N*C, Ho, Wo), x's dtype. TAPS: power of two >= KS*KS.
    Grid: (N*C, cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = w_ptr.dtype.element_ty
    plane, _, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < Ho * Wo
    if PRE == 2:
        mu = tl.load(mean_ptr + c)
        r = tl.load(rstd_ptr + c)
    else:
        mu = 0.0
        r = 1.0
    tap, ki, kj, tap_ok = _taps(KS, TAPS)
    wv = tl.load(w_ptr + c * (KS * KS) + tap, mask=tap_ok, other=0.0)
    ih = (offs // Wo * stride - pad)[None, :] + (ki * dil)[:, None]
    iw = (offs % Wo * stride - pad)[None, :] + (kj * dil)[:, None]
    ok = (tap_ok[:, None] & mask[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(x_ptr + plane * H * W + ih * W + iw, mask=ok, other=0.0).to(ACC)
    v = tl.where(ok, _transform(v, mu, r, PRE), 0.0)  # the padding is zero after the transform
    y = tl.sum(v * wv[:, None], axis=0)
    tl.store(y_ptr + plane * Ho * Wo + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_bwd_input_kernel(
    g_ptr, w_ptr, x_ptr, mean_ptr, rstd_ptr, acc_ptr, out_ptr, part_ptr,
    C, H, W, Ho, Wo, stride, pad, dil, n_tiles,
    KS: tl.constexpr, TAPS: tl.constexpr, PRE: tl.constexpr, ACCUMULATE: tl.constexpr,
    FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Transposed depthwise conv of one conv's gradient, as a gather over input pixels:

        t[plane, h, v] = (acc[plane, h, v] if ACCUMULATE else 0)
                         + sum_{i,j: (h + pad - i*dil) = o*stride, (v + pad - j*dil) = p*stride}
                               w[c, i, j] * g[plane, o, p]

    FINAL: out = pre'(x) * t (out: x's dtype); with PRE == 2 also part[plane, tile] =
    (sum out, sum out * a), a = (x - mean) * rstd. Else: acc = t (accumulation dtype).
    g_ptr: (N*C, Ho, Wo). w_ptr: (C, KS*KS) accumulation dtype. x_ptr: (N*C, H, W).
    part_ptr: (N*C, n_tiles, 2) accumulation dtype. Grid: (N*C, n_tiles = cdiv(H*W, BLOCK)).
    """
    ACC: tl.constexpr = w_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < H * W
    tap, ki, kj, tap_ok = _taps(KS, TAPS)
    wv = tl.load(w_ptr + c * (KS * KS) + tap, mask=tap_ok, other=0.0)
    th = (offs // W + pad)[None, :] - (ki * dil)[:, None]
    tw = (offs % W + pad)[None, :] - (kj * dil)[:, None]
    ok = (tap_ok[:, None] & mask[None, :]) & (th >= 0) & (tw >= 0)
    th = tl.where(ok, th, 0)  # keeps // and % on non-negative numbers
    tw = tl.where(ok, tw, 0)
    oh = th // stride
    ow = tw // stride
    ok = ok & (th == oh * stride) & (tw == ow * stride) & (oh < Ho) & (ow < Wo)
    gv = tl.load(g_ptr + plane * Ho * Wo + oh * Wo + ow, mask=ok, other=0.0).to(ACC)
    t = tl.sum(gv * wv[:, None], axis=0)
    if ACCUMULATE:
        t += tl.load(acc_ptr + plane * H * W + offs, mask=mask, other=0.0).to(ACC)
    if FINAL:
        if PRE == 0:
            v = t
        else:
            x = tl.load(x_ptr + plane * H * W + offs, mask=mask, other=0.0).to(ACC)
            if PRE == 1:
                v = tl.where(x > 0, t, 0.0)
            else:
                a = (x - tl.load(mean_ptr + c)) * tl.load(rstd_ptr + c)
                v = tl.where(mask & (a > 0), t, 0.0)
                pb = part_ptr + (plane * n_tiles + tile) * 2
                tl.store(pb, tl.sum(v, axis=0))
                tl.store(pb + 1, tl.sum(v * a, axis=0))
        tl.store(out_ptr + plane * H * W + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + plane * H * W + offs, t.to(acc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_bwd_weight_kernel(
    x_ptr, g_ptr, mean_ptr, rstd_ptr, part_ptr,
    C, H, W, Ho, Wo, stride, pad, dil, n_tiles,
    KS: tl.constexpr, TAPS: tl.constexpr, PRE: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[plane, tile, i*KS + j] = sum_{(o,p) in tile} g[plane, o, p] * pre(x)[plane, o*stride
    - pad + i*dil, p*stride - pad + j*dil] (zero outside the plane), for i, j < KS.

    part_ptr: (N*C, n_tiles, TAPS) in the accumulation dtype (that of part_ptr), TAPS >= KS*KS a
    power of two (lanes past KS*KS hold 0). Grid: (N*C, n_tiles = cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < Ho * Wo
    if PRE == 2:
        mu = tl.load(mean_ptr + c).to(ACC)
        r = tl.load(rstd_ptr + c).to(ACC)
    else:
        mu = 0.0
        r = 1.0
    g = tl.load(g_ptr + plane * Ho * Wo + offs, mask=mask, other=0.0).to(ACC)
    tap, ki, kj, tap_ok = _taps(KS, TAPS)
    ih = (offs // Wo * stride - pad)[None, :] + (ki * dil)[:, None]
    iw = (offs % Wo * stride - pad)[None, :] + (kj * dil)[:, None]
    ok = (tap_ok[:, None] & mask[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(x_ptr + plane * H * W + ih * W + iw, mask=ok, other=0.0).to(ACC)
    v = tl.where(ok, _transform(v, mu, r, PRE), 0.0)
    tl.store(part_ptr + (plane * n_tiles + tile) * TAPS + tap, tl.sum(v * g[None, :], axis=1))


# --------------------------------------------------------------------------------------------
# Kernels: BatchNorm
# --------------------------------------------------------------------------------------------


@triton.jit
def _moments_kernel(p_ptr, part_ptr, HW, n_tiles, BLOCK: tl.constexpr):
    """part[plane, tile] = (count, mean, M2) of p's values in the tile.

    p_ptr: (N*C, HW). part_ptr: (N*C, n_tiles, 3), accumulation dtype.
    Grid: (N*C, n_tiles = cdiv(HW, BLOCK)).
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    mask = offs < HW
    v = tl.load(p_ptr + plane * HW + offs, mask=mask, other=0.0).to(ACC)
    cnt = tl.minimum(HW - tile * BLOCK, BLOCK).to(ACC)
    _store_moments(part_ptr + (plane * n_tiles + tile) * 3, v, mask, cnt)


@triton.jit
def _bn_sums_kernel(g_ptr, p_ptr, mean_ptr, rstd_ptr, part_ptr, C, HW, n_tiles, BLOCK: tl.constexpr):
    """part[plane, tile] = (sum g, sum g * (p - mean[c]) * rstd[c]) over the tile.

    g_ptr, p_ptr: (N*C, HW). mean_ptr, rstd_ptr: (C,) and part_ptr (N*C, n_tiles, 2), all in the
    accumulation dtype. Grid: (N*C, n_tiles = cdiv(HW, BLOCK)).
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < HW
    g = tl.load(g_ptr + plane * HW + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(p_ptr + plane * HW + offs, mask=mask, other=0.0).to(ACC)
    xhat = (p - tl.load(mean_ptr + c)) * tl.load(rstd_ptr + c)
    pb = part_ptr + (plane * n_tiles + tile) * 2
    tl.store(pb, tl.sum(g, axis=0))
    tl.store(pb + 1, tl.sum(tl.where(mask, g * xhat, 0.0), axis=0))


@triton.jit
def _affine_kernel(g_ptr, p_ptr, coef_ptr, out_ptr, C, HW, BLOCK: tl.constexpr):
    """out = A[c] * g + B[c] * p + D[c] (a BatchNorm backward with its sums folded into A, B, D).

    g_ptr, p_ptr, out_ptr: (N*C, HW). coef_ptr: (C, 3) = (A, B, D) in the accumulation dtype.
    Grid: (N*C, cdiv(HW, BLOCK)).
    """
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    plane, _, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < HW
    g = tl.load(g_ptr + plane * HW + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(p_ptr + plane * HW + offs, mask=mask, other=0.0).to(ACC)
    A = tl.load(coef_ptr + c * 3)
    B = tl.load(coef_ptr + c * 3 + 1)
    D = tl.load(coef_ptr + c * 3 + 2)
    tl.store(out_ptr + plane * HW + offs, (A * g + B * p + D).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Kernels: the mix (pools, skip, weighted sum of BatchNorms)
# --------------------------------------------------------------------------------------------


@triton.jit
def _pool_moments_kernel(
    x_ptr, part_ptr, H, W, Ho, Wo, stride, n_tiles,
    HAS_MAX: tl.constexpr, HAS_AVG: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[plane, tile, 0:3] = (count, mean, M2) of maxpool(x), part[..., 3:6] of avgpool(x).

    x_ptr: (N*C, H, W). part_ptr: (N*C, n_tiles, 6), accumulation dtype (only the present
    pools' entries are written). Grid: (N*C, n_tiles = cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    mask = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    xb = x_ptr + plane * H * W
    cnt = tl.minimum(Ho * Wo - tile * BLOCK, BLOCK).to(ACC)
    pb = part_ptr + (plane * n_tiles + tile) * 6
    if HAS_MAX:
        y, _ = _max_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        _store_moments(pb, tl.where(mask, y, 0.0), mask, cnt)
    if HAS_AVG:
        y, _ = _avg_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        _store_moments(pb + 3, y, mask, cnt)


@triton.jit
def _add_scaled(acc, p_ptr, coef_ptr, col: tl.constexpr, offs, mask):
    """acc + coef[col] * p[offs]."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
    return acc + tl.load(coef_ptr + col) * p


@triton.jit
def _mix_out_kernel(
    out_ptr, acc_ptr, x_ptr, coef_ptr,
    p0, p1, p2, p3, p4, p5, p6, p7,
    C, H, W, Ho, Wo, stride, n_coef, col0,
    K: tl.constexpr, FIRST: tl.constexpr, HAS_MAX: tl.constexpr, HAS_AVG: tl.constexpr,
    HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = [FIRST: D + w_skip * x + a_max * maxpool(x) + a_avg * avgpool(x) | else: acc]
             + sum_{k < K} a_{col0 + k} * p_k, per plane.

    coef_ptr: (C, n_coef) accumulation dtype; row c = (D, w_skip, a_max, a_avg, a_p0, ...), with
    a_j = w_j * rstd_j[c] and D = -sum_j a_j * mean_j[c]. p0..p7: (N*C, Ho, Wo), only the first
    K read (K may be 0); the running sum ``acc_ptr`` (accumulation dtype) is read unless FIRST.
    out_ptr: (N*C, Ho, Wo). Grid: (N*C, cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    plane, _, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < Ho * Wo
    cb = coef_ptr + c * n_coef
    if FIRST:
        acc = tl.zeros([BLOCK], ACC) + tl.load(cb)
        if HAS_SKIP:  # stride 1: x's plane is the output's
            acc = _add_scaled(acc, x_ptr + plane * H * W, cb, 1, offs, mask)
        oh = offs // Wo
        ow = offs % Wo
        xb = x_ptr + plane * H * W
        if HAS_MAX:
            y, _ = _max_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
            acc += tl.load(cb + 2) * tl.where(mask, y, 0.0)
        if HAS_AVG:
            y, _ = _avg_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
            acc += tl.load(cb + 3) * y
    else:
        acc = tl.load(acc_ptr + plane * Ho * Wo + offs, mask=mask, other=0.0).to(ACC)
    ob = plane * Ho * Wo + offs
    cb = cb + col0
    if K > 0:
        acc = _add_scaled(acc, p0, cb, 0, ob, mask)
    if K > 1:
        acc = _add_scaled(acc, p1, cb, 1, ob, mask)
    if K > 2:
        acc = _add_scaled(acc, p2, cb, 2, ob, mask)
    if K > 3:
        acc = _add_scaled(acc, p3, cb, 3, ob, mask)
    if K > 4:
        acc = _add_scaled(acc, p4, cb, 4, ob, mask)
    if K > 5:
        acc = _add_scaled(acc, p5, cb, 5, ob, mask)
    if K > 6:
        acc = _add_scaled(acc, p6, cb, 6, ob, mask)
    if K > 7:
        acc = _add_scaled(acc, p7, cb, 7, ob, mask)
    tl.store(out_ptr + ob, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_bwd_sums_kernel(
    g_ptr, x_ptr, mean_ptr, rstd_ptr, part_ptr,
    C, H, W, Ho, Wo, stride, n_tiles,
    HAS_MAX: tl.constexpr, HAS_AVG: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """part[plane, tile] = (sum g, sum g * xhat_max, sum g * xhat_avg, sum g * x) over the tile,
    xhat_pool = (pool(x) - mean[row, c]) * rstd[row, c] (rows 0: max, 1: avg); absent terms are
    not written.

    g_ptr: (N*C, Ho, Wo). x_ptr: (N*C, H, W). mean_ptr, rstd_ptr: (>= 2, C) accumulation dtype.
    part_ptr: (N*C, n_tiles, 4), accumulation dtype. Grid: (N*C, n_tiles = cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    plane, tile, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    g = tl.load(g_ptr + plane * Ho * Wo + offs, mask=mask, other=0.0).to(ACC)
    xb = x_ptr + plane * H * W
    pb = part_ptr + (plane * n_tiles + tile) * 4
    tl.store(pb, tl.sum(g, axis=0))
    if HAS_MAX:
        y, _ = _max_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        y = tl.where(mask, y, 0.0)  # masked lanes hold -inf
        xhat = (y - tl.load(mean_ptr + c)) * tl.load(rstd_ptr + c)
        tl.store(pb + 1, tl.sum(tl.where(mask, g * xhat, 0.0), axis=0))
    if HAS_AVG:
        y, _ = _avg_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        xhat = (y - tl.load(mean_ptr + C + c)) * tl.load(rstd_ptr + C + c)
        tl.store(pb + 2, tl.sum(tl.where(mask, g * xhat, 0.0), axis=0))
    if HAS_SKIP:
        x = tl.load(xb + offs, mask=mask, other=0.0).to(ACC)
        tl.store(pb + 3, tl.sum(g * x, axis=0))


@triton.jit
def _pool_bwd_prep_kernel(
    g_ptr, x_ptr, coef_ptr, gmax_ptr, arg_ptr, gavg_ptr,
    C, H, W, Ho, Wo, stride,
    HAS_MAX: tl.constexpr, HAS_AVG: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per output pixel, the gradients that reach each pool's output (its BatchNorm backward):

        gmax = A_max * g + B_max * maxpool(x) + D_max,   arg = tap (0..8) of the window's first max
        gavg = (A_avg * g + B_avg * avgpool(x) + D_avg) / count   (already divided by the count)

    coef_ptr: (C, 6) = (A, B, D) of max then avg, accumulation dtype. gmax_ptr, gavg_ptr:
    (N*C, Ho, Wo) accumulation dtype; arg_ptr: (N*C, Ho, Wo) int32. Grid: (N*C, cdiv(Ho*Wo, BLOCK)).
    """
    ACC: tl.constexpr = coef_ptr.dtype.element_ty
    plane, _, offs = _plane_tile(BLOCK)
    c = plane % C
    mask = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    g = tl.load(g_ptr + plane * Ho * Wo + offs, mask=mask, other=0.0).to(ACC)
    xb = x_ptr + plane * H * W
    ob = plane * Ho * Wo + offs
    cb = coef_ptr + c * 6
    if HAS_MAX:
        y, arg = _max_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        gy = tl.load(cb) * g + tl.load(cb + 1) * tl.where(mask, y, 0.0) + tl.load(cb + 2)
        tl.store(gmax_ptr + ob, gy, mask=mask)
        tl.store(arg_ptr + ob, arg, mask=mask)
    if HAS_AVG:
        y, inv = _avg_pool_tile(xb, oh, ow, mask, H, W, stride, ACC, BLOCK)
        gy = tl.load(cb + 3) * g + tl.load(cb + 4) * y + tl.load(cb + 5)
        tl.store(gavg_ptr + ob, gy * inv, mask=mask)


@triton.jit
def _pool_bwd_gather_kernel(
    gmax_ptr, arg_ptr, gavg_ptr, g_ptr, w_ptr, gx_ptr,
    H, W, Ho, Wo, stride,
    HAS_MAX: tl.constexpr, HAS_AVG: tl.constexpr, HAS_SKIP: tl.constexpr, POOLS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_x[plane, h, v] = sum over the 3x3 windows (o, p) that contain (h, v), at tap (i, j):
    gmax[o, p] if arg[o, p] == i*3 + j, plus gavg[o, p]; plus w[2] * g[plane, h, v] (skip,
    stride 1).

    gmax_ptr, gavg_ptr: (N*C, Ho, Wo) accumulation dtype; arg_ptr: int32; g_ptr: (N*C, Ho, Wo);
    w_ptr: (3 + K,) accumulation dtype; gx_ptr: (N*C, H, W). Grid: (N*C, cdiv(H*W, BLOCK)).
    """
    ACC: tl.constexpr = w_ptr.dtype.element_ty
    plane, _, offs = _plane_tile(BLOCK)
    mask = offs < H * W
    ih = offs // W
    iw = offs % W
    acc = tl.zeros([BLOCK], ACC)
    ob = plane * Ho * Wo
    if POOLS:  # HAS_MAX or HAS_AVG
        for ki in tl.static_range(3):
            th = ih + 1 - ki
            ok_h = mask & (th >= 0)
            th = tl.where(th >= 0, th, 0)
            oh = th // stride
            ok_h = ok_h & (th == oh * stride) & (oh < Ho)
            for kj in tl.static_range(3):
                tw = iw + 1 - kj
                ok = ok_h & (tw >= 0)
                tw = tl.where(tw >= 0, tw, 0)
                ow = tw // stride
                ok = ok & (tw == ow * stride) & (ow < Wo)
                at = ob + oh * Wo + ow
                if HAS_MAX:
                    arg = tl.load(arg_ptr + at, mask=ok, other=-1)
                    gm = tl.load(gmax_ptr + at, mask=ok, other=0.0)
                    acc += tl.where(arg == ki * 3 + kj, gm, 0.0)
                if HAS_AVG:
                    acc += tl.load(gavg_ptr + at, mask=ok, other=0.0)
    if HAS_SKIP:  # stride 1: g's plane is x's
        acc += tl.load(w_ptr + 2) * tl.load(g_ptr + ob + offs, mask=mask, other=0.0).to(ACC)
    tl.store(gx_ptr + plane * H * W + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Argument checks (the bindings' checks in csrc/bindings.cpp, as Python exceptions)
# --------------------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(op: str, t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name}: expected a dense (strided) tensor, got layout {t.layout}")
    return t


def _check_activation(op: str, t, name: str) -> torch.Tensor:
    _check_tensor(op, t, name)
    if t.dim() != 4:
        raise ValueError(f"{op}: {name}: expected 4-D (N, C, H, W), got {_describe(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {name}: expected dtype torch.float16, torch.bfloat16, torch.float32 or "
            f"torch.float64, got {_describe(t)}"
        )
    if t.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{op}: {name} is on cpu; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 to run them on the CPU)"
        )
    return t


def _check_same_device(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name}: expected the device of {ref_name} ({ref.device}), got {_describe(t)}")


def _check_list(op: str, ts, name: str) -> list:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, Sequence):
        raise TypeError(f"{op}: {name}: expected a list of tensors, got {type(ts).__name__}")
    return list(ts)


def _check_ints(op: str, vals, name: str) -> List[int]:
    if isinstance(vals, torch.Tensor) or not isinstance(vals, Sequence):
        raise TypeError(f"{op}: {name}: expected a list of ints, got {type(vals).__name__}")
    out = []
    for i, v in enumerate(vals):
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{op}: {name}[{i}]: expected an int, got {type(v).__name__}") from None
    return out


def _stat_input(op: str, t, name: str, shape: Tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """A statistic (mean, rstd, sums): ``shape``, x's or the accumulation dtype, x's device;
    returned contiguous in the accumulation dtype."""
    _check_tensor(op, t, name)
    acc = accumulation_dtype(x.dtype)
    if tuple(t.shape) != shape or t.dtype not in (x.dtype, acc):
        what = str(x.dtype) if x.dtype == acc else f"{x.dtype} or {acc}"
        raise ValueError(f"{op}: {name}: expected shape {list(shape)} and dtype {what}, got {_describe(t)}")
    _check_same_device(op, t, name, x, "x")
    return t.detach().to(acc).contiguous()


def _check_running(op: str, t, name: str, ref: torch.Tensor, ref_name: str,
                   channels: Optional[int] = None) -> Optional[torch.Tensor]:
    """A running statistic (or None): 1-D floating, one value per channel of ``ref`` (or
    ``channels``), on ``ref``'s device."""
    if t is None:
        return None
    _check_tensor(op, t, name)
    n = ref.shape[1] if channels is None else channels
    if t.dim() != 1 or t.shape[0] != n or not t.is_floating_point():
        raise ValueError(f"{op}: {name}: expected 1-D with one floating value per channel ({n}), got {_describe(t)}")
    _check_same_device(op, t, name, ref, ref_name)
    return t


def _check_eps(op: str, eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"{op}: eps: expected a positive value, got {eps}")


def _out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _check_dw_args(op, x, ws, strides, pads, dils, pre, mean, rstd):
    _check_activation(op, x, "x")
    ws = _check_list(op, ws, "ws")
    if len(ws) == 0:
        raise ValueError(f"{op}: ws: expected at least one weight")
    strides = _check_ints(op, strides, "strides")
    pads = _check_ints(op, pads, "pads")
    dils = _check_ints(op, dils, "dils")
    if not (len(strides) == len(pads) == len(dils) == len(ws)):
        raise ValueError(
            f"{op}: strides, pads, dils: expected one entry per weight in ws ({len(ws)}), "
            f"got {len(strides)}, {len(pads)} and {len(dils)}"
        )
    if isinstance(pre, bool) or not hasattr(pre, "__index__") or operator.index(pre) not in (
        _PRE_NONE, _PRE_RELU, _PRE_NORM_RELU
    ):
        raise ValueError(f"{op}: pre: expected 0 (none), 1 (relu) or 2 (normalise then relu), got {pre!r}")
    pre = operator.index(pre)
    N, C, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"{op}: x: expected a non-empty plane, got {_describe(x)}")
    for m, w in enumerate(ws):
        name = f"ws[{m}]"
        _check_tensor(op, w, name)
        if not (w.dim() == 4 and w.shape[0] == C and w.shape[1] == 1 and w.shape[2] == w.shape[3]
                and w.shape[2] >= 1):
            raise ValueError(f"{op}: {name}: expected a depthwise weight ({C}, 1, k, k), got {_describe(w)}")
        if w.dtype != x.dtype:
            raise TypeError(f"{op}: {name}: expected x's dtype {x.dtype}, got {_describe(w)}")
        _check_same_device(op, w, name, x, "x")
        if strides[m] < 1 or pads[m] < 0 or dils[m] < 1:
            raise ValueError(
                f"{op}: strides[{m}], pads[{m}], dils[{m}]: expected stride >= 1, pad >= 0, dilation >= 1, "
                f"got {strides[m]}, {pads[m]}, {dils[m]}"
            )
        k = w.shape[2]
        if _out_size(H, k, strides[m], pads[m], dils[m]) < 1 or _out_size(W, k, strides[m], pads[m], dils[m]) < 1:
            raise ValueError(f"{op}: x: expected a plane that conv {m} maps to a non-empty output, got {_describe(x)}")
    if pre == _PRE_NORM_RELU:
        mean = _stat_input(op, mean, "mean", (C,), x)
        rstd = _stat_input(op, rstd, "rstd", (C,), x)
    else:
        mean = rstd = None
    return ws, strides, pads, dils, pre, mean, rstd


def _check_mix_args(op, x, ps, w, stride, has_skip):
    _check_activation(op, x, "x")
    if isinstance(stride, bool) or not hasattr(stride, "__index__") or operator.index(stride) not in (1, 2):
        raise ValueError(f"{op}: stride: expected 1 or 2, got {stride!r}")
    stride = operator.index(stride)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: x: expected a non-empty plane, got {_describe(x)}")
    if has_skip and stride != 1:
        raise ValueError(
            f"{op}: has_skip: expected stride 1 (identity); at stride 2 the skip is a FactorizedReduce, "
            "pass its output in ps"
        )
    N, C, H, W = x.shape
    ho, wo = _out_size(H, 3, stride, 1, 1), _out_size(W, 3, stride, 1, 1)
    ps = _check_list(op, ps, "ps")
    for j, p in enumerate(ps):
        name = f"ps[{j}]"
        _check_tensor(op, p, name)
        if tuple(p.shape) != (N, C, ho, wo):
            raise ValueError(
                f"{op}: {name}: expected [{N}, {C}, {ho}, {wo}] (the edge's output shape), got {_describe(p)}"
            )
        if p.dtype != x.dtype:
            raise TypeError(f"{op}: {name}: expected x's dtype {x.dtype}, got {_describe(p)}")
        _check_same_device(op, p, name, x, "x")
    _check_tensor(op, w, "w")
    if w.dim() != 1 or w.shape[0] != 3 + len(ps):
        raise ValueError(
            f"{op}: w: expected 1-D with {3 + len(ps)} elements (max, avg, skip, then one per tensor in "
            f"ps), got {_describe(w)}"
        )
    if not w.is_floating_point():
        raise TypeError(f"{op}: w: expected a floating dtype, got {_describe(w)}")
    _check_same_device(op, w, "w", x, "x")
    return ps, ho, wo, stride


# --------------------------------------------------------------------------------------------
# Helpers of the wrappers
# --------------------------------------------------------------------------------------------


def _block(n: int, cap: int = _MAX_BLOCK) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _conv_block(n: int, taps: int) -> int:
    """Pixels per program of a depthwise-conv kernel: its (taps, pixels) tile <= _MAX_CONV_TILE."""
    return max(16, min(_MAX_CONV_TILE // taps, triton.next_power_of_2(max(n, 1))))


def _plane_sum(part: torch.Tensor) -> torch.Tensor:
    """(N, C, T, ...) partials -> (C, ...): over tiles, then over the batch (fixed order)."""
    return part.sum(dim=2).sum(dim=0)


def _moments(part: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) from (N, C, T, 3) tile moments (count, mean, M2)."""
    cnt, mt, m2 = part.unbind(-1)
    mean = _plane_sum(cnt * mt) / total
    d = mt - mean.view(1, -1, 1)
    var = _plane_sum(m2 + cnt * d * d) / total
    return mean, var


def _rstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 / torch.sqrt(var + eps)


def _update_running(rm, rv, mean: torch.Tensor, var: torch.Tensor, count: int, momentum: float) -> None:
    """BatchNorm2d's running-stat update (unbiased variance), computed in the wider of the
    statistics' and the buffers' dtypes, stored in the buffers' dtype."""
    with torch.no_grad():
        if rm is not None:
            dt = torch.promote_types(rm.dtype, mean.dtype)
            rm.copy_(rm.to(dt) * (1.0 - momentum) + mean.to(dt) * momentum)
        if rv is not None:
            dt = torch.promote_types(rv.dtype, var.dtype)
            unbiased = var.to(dt) * (count / (count - 1))
            rv.copy_(rv.to(dt) * (1.0 - momentum) + unbiased * momentum)


def _bn_stats(p: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(N, C, T, 3) tile moments of p (contiguous, 4-D)."""
    N, C, H, W = p.shape
    HW = H * W
    block = _block(HW)
    T = triton.cdiv(HW, block)
    part = torch.empty((N, C, T, 3), dtype=acc, device=p.device)
    _moments_kernel[(N * C, T)](p, part, HW, T, BLOCK=block)
    return part


def _bn_sums(g: torch.Tensor, p: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             acc: torch.dtype) -> torch.Tensor:
    """(N, C, T, 2) tile sums (sum g, sum g * xhat)."""
    N, C, H, W = p.shape
    HW = H * W
    block = _block(HW)
    T = triton.cdiv(HW, block)
    part = torch.empty((N, C, T, 2), dtype=acc, device=p.device)
    _bn_sums_kernel[(N * C, T)](g, p, mean, rstd, part, C, HW, T, BLOCK=block)
    return part


def _affine(g: torch.Tensor, p: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    N, C, H, W = p.shape
    HW = H * W
    out = torch.empty_like(p)
    block = _block(HW)
    _affine_kernel[(N * C, triton.cdiv(HW, block))](g, p, coef, out, C, HW, BLOCK=block)
    return out


def _bn_backward_coefs(w, mean, rstd, sg, sgx, M: int) -> torch.Tensor:
    """(C, 3) = (A, B, D) with grad = A g + B p + D = w * rstd * (g - sg/M - xhat sgx/M)."""
    A = w * rstd
    B = -A * rstd * sgx / M
    D = -A * sg / M + A * rstd * mean * sgx / M
    return torch.stack([A, B, D], dim=1).contiguous()


# --------------------------------------------------------------------------------------------
# Depthwise convs
# --------------------------------------------------------------------------------------------


def cnn_edge_dw_forward(
    x: torch.Tensor,
    ws: Sequence[torch.Tensor],
    strides: Sequence[int],
    pads: Sequence[int],
    dils: Sequence[int],
    pre: int,
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
) -> List[torch.Tensor]:
    """Depthwise convs of one input: ``ys[m] = dwconv(pre(x), ws[m]; strides[m], pads[m], dils[m])``.

    Args:
        x: (N, C, H, W). ws: M >= 1 weights (C, 1, k_m, k_m) with x's dtype.
        strides, pads, dils: M ints each. pre: 0 (x), 1 (relu(x)), 2 (relu((x - mean) * rstd)).
        mean, rstd: (C,) in x's or the accumulation dtype when ``pre == 2``; ignored (may be
            None or empty) otherwise.

    Returns:
        list of M tensors (N, C, Ho_m, Wo_m) in x's dtype.
    """
    op = "cnn_edge_dw_forward"
    ws, strides, pads, dils, pre, mean, rstd = _check_dw_args(
        op, x, ws, strides, pads, dils, pre, mean, rstd
    )
    x = x.detach().contiguous()
    N, C, H, W = x.shape
    acc = accumulation_dtype(x.dtype)
    ys = []
    for w, s, pd, d in zip(ws, strides, pads, dils):
        k = w.shape[2]
        ho, wo = _out_size(H, k, s, pd, d), _out_size(W, k, s, pd, d)
        y = torch.empty((N, C, ho, wo), dtype=x.dtype, device=x.device)
        ys.append(y)
        if y.numel() == 0:
            continue
        wa = w.detach().to(acc).contiguous()
        taps = triton.next_power_of_2(k * k)
        block = _conv_block(ho * wo, taps)
        _dw_fwd_kernel[(N * C, triton.cdiv(ho * wo, block))](
            x, wa, mean if mean is not None else wa, rstd if rstd is not None else wa, y,
            C, H, W, ho, wo, s, pd, d, KS=k, TAPS=taps, PRE=pre, BLOCK=block,
        )
    return ys


def cnn_edge_dw_backward(
    x: torch.Tensor,
    ws: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    strides: Sequence[int],
    pads: Sequence[int],
    dils: Sequence[int],
    pre: int,
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
    need_grad_w: bool = True,
) -> Tuple[torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`cnn_edge_dw_forward` for output gradients ``gs`` (one per conv).

    Returns:
        ``(grad_in, grad_ws, sums)``: grad_in (N, C, H, W) in x's dtype, ``pre'(x) * sum_m
        dwconv_m^T(gs[m])`` (for pre == 2 the gradient w.r.t. the normalised input a = (x - mean)
        * rstd); grad_ws: list of M tensors shaped and typed like ``ws`` (an empty list unless
        ``need_grad_w``); sums: for pre == 2 a
        (2, C) tensor in the accumulation dtype, (sum grad_in, sum grad_in * a) per channel (the
        reductions of the preceding BatchNorm's backward), else None.
    """
    op = "cnn_edge_dw_backward"
    ws, strides, pads, dils, pre, mean, rstd = _check_dw_args(
        op, x, ws, strides, pads, dils, pre, mean, rstd
    )
    gs = _check_list(op, gs, "gs")
    if len(gs) != len(ws):
        raise ValueError(f"{op}: gs: expected one gradient per weight in ws ({len(ws)}), got {len(gs)}")
    N, C, H, W = x.shape
    geoms = []
    for m, (w, g) in enumerate(zip(ws, gs)):
        name = f"gs[{m}]"
        _check_tensor(op, g, name)
        k = w.shape[2]
        ho = _out_size(H, k, strides[m], pads[m], dils[m])
        wo = _out_size(W, k, strides[m], pads[m], dils[m])
        if tuple(g.shape) != (N, C, ho, wo) or g.dtype != x.dtype:
            raise ValueError(
                f"{op}: {name}: expected the shape of conv {m}'s output [{N}, {C}, {ho}, {wo}] with x's "
                f"dtype, got {_describe(g)}"
            )
        _check_same_device(op, g, name, x, "x")
        geoms.append((k, ho, wo))
    x = x.detach().contiguous()
    gs = [g.detach().contiguous() for g in gs]
    acc = accumulation_dtype(x.dtype)
    M = len(ws)
    gx = torch.empty_like(x)
    want_sums = pre == _PRE_NORM_RELU
    if x.numel() == 0:
        gws = [torch.zeros_like(w) for w in ws] if need_grad_w else []
        sums = torch.zeros((2, C), dtype=acc, device=x.device) if want_sums else None
        return gx, gws, sums
    was = [w.detach().to(acc).contiguous() for w in ws]
    dummy = was[0]
    mean_a = mean if mean is not None else dummy
    rstd_a = rstd if rstd is not None else dummy

    # grad_in: one gather per conv, accumulated in the accumulation dtype, rounded once
    block = _conv_block(H * W, max(triton.next_power_of_2(k * k) for k, _, _ in geoms))
    T = triton.cdiv(H * W, block)
    part = torch.empty((N, C, T, 2), dtype=acc, device=x.device) if want_sums else dummy
    if M == 1:
        running = gx
    elif gx.dtype == acc:
        running = gx  # each program reads and writes only its own elements
    else:
        running = torch.empty(x.shape, dtype=acc, device=x.device)
    for m, ((k, ho, wo), wa) in enumerate(zip(geoms, was)):
        _dw_bwd_input_kernel[(N * C, T)](
            gs[m], wa, x, mean_a, rstd_a, running, gx, part,
            C, H, W, ho, wo, strides[m], pads[m], dils[m], T,
            KS=k, TAPS=triton.next_power_of_2(k * k), PRE=pre, ACCUMULATE=m > 0, FINAL=m == M - 1,
            BLOCK=block,
        )
    sums = _plane_sum(part).t().contiguous() if want_sums else None

    # grad_ws: per (plane, tile) tap sums, then over tiles and the batch
    gws = []
    for m, ((k, ho, wo), w) in enumerate(zip(geoms, ws) if need_grad_w else ()):
        taps = triton.next_power_of_2(k * k)
        blk = _conv_block(ho * wo, taps)
        Tm = triton.cdiv(ho * wo, blk)
        wpart = torch.empty((N, C, Tm, taps), dtype=acc, device=x.device)
        _dw_bwd_weight_kernel[(N * C, Tm)](
            x, gs[m], mean_a, rstd_a, wpart,
            C, H, W, ho, wo, strides[m], pads[m], dils[m], Tm,
            KS=k, TAPS=taps, PRE=pre, BLOCK=blk,
        )
        gws.append(_plane_sum(wpart)[:, : k * k].reshape(w.shape).to(w.dtype))
    return gx, gws, sums


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------


def cnn_edge_bn_stats(
    p: torch.Tensor,
    eps: float,
    momentum: float,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch statistics of p (N, C, H, W) per channel: ``(mean, rstd = 1 / sqrt(var + eps))``,
    (C,) each in the accumulation dtype (biased variance). ``running_mean`` / ``running_var``
    ((C,) or None) are updated in place with ``momentum`` (running_var with the unbiased variance).
    """
    op = "cnn_edge_bn_stats"
    _check_activation(op, p, "p")
    N, C, H, W = p.shape
    if N * H * W <= 1:
        raise ValueError(
            f"{op}: p: expected more than one value per channel (BatchNorm in training), got {_describe(p)}"
        )
    _check_eps(op, eps)
    rm = _check_running(op, running_mean, "running_mean", p, "p")
    rv = _check_running(op, running_var, "running_var", p, "p")
    p = p.detach().contiguous()
    acc = accumulation_dtype(p.dtype)
    if C == 0:
        e = torch.empty(0, dtype=acc, device=p.device)
        return e, e.clone()
    mean, var = _moments(_bn_stats(p, acc), N * H * W)
    _update_running(rm, rv, mean, var, N * H * W, momentum)
    return mean, _rstd(var, eps)


def cnn_edge_bn_backward(
    g: torch.Tensor,
    p: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    sums: Optional[torch.Tensor],
) -> torch.Tensor:
    """Affine-free training BatchNorm backward:
    ``grad_p = rstd * (g - sum(g) / M - xhat * sum(g * xhat) / M)`` per channel, xhat = (p - mean)
    * rstd, M = N*H*W. ``sums`` (2, C) = (sum g, sum g * xhat) as :func:`cnn_edge_dw_backward` gives
    them, or None to compute them here. Returns (N, C, H, W) in p's dtype.
    """
    op = "cnn_edge_bn_backward"
    _check_activation(op, p, "p")
    _check_tensor(op, g, "g")
    if g.shape != p.shape:
        raise ValueError(f"{op}: g: expected the shape of p {list(p.shape)}, got {_describe(g)}")
    if g.dtype != p.dtype:
        raise TypeError(f"{op}: g: expected the dtype of p {p.dtype}, got {_describe(g)}")
    _check_same_device(op, g, "g", p, "p")
    N, C, H, W = p.shape
    mean = _stat_input(op, mean, "mean", (C,), p)
    rstd = _stat_input(op, rstd, "rstd", (C,), p)
    acc = accumulation_dtype(p.dtype)
    if sums is not None:
        _check_tensor(op, sums, "sums")
        if tuple(sums.shape) != (2, C) or not sums.is_floating_point():
            raise ValueError(f"{op}: sums: expected (2, C) = (2, {C}) floating, got {_describe(sums)}")
        _check_same_device(op, sums, "sums", p, "p")
    g = g.detach().contiguous()
    p = p.detach().contiguous()
    if p.numel() == 0:
        return torch.empty_like(p)
    if sums is None:
        sg, sgx = _plane_sum(_bn_sums(g, p, mean, rstd, acc)).unbind(-1)
    else:
        sg, sgx = sums.detach().to(acc).unbind(0)
    one = torch.ones((), dtype=acc, device=p.device)
    return _affine(g, p, _bn_backward_coefs(one, mean, rstd, sg, sgx, N * H * W))


# --------------------------------------------------------------------------------------------
# 1x1 convs (torch's matmul; the statistics through the BatchNorm kernels above)
# --------------------------------------------------------------------------------------------


def _check_pw(op: str, u, w) -> None:
    _check_activation(op, u, "u")
    _check_tensor(op, w, "w")
    if not (w.dim() == 4 and w.shape[1] == u.shape[1] and w.shape[2] == 1 and w.shape[3] == 1):
        raise ValueError(f"{op}: w: expected a 1x1 conv weight (C_out, {u.shape[1]}, 1, 1), got {_describe(w)}")
    if w.dtype != u.dtype:
        raise TypeError(f"{op}: w: expected u's dtype {u.dtype}, got {_describe(w)}")
    _check_same_device(op, w, "w", u, "u")


def cnn_edge_pw_forward(
    u: torch.Tensor,
    w: torch.Tensor,
    stats: bool,
    eps: float,
    momentum: float,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """1x1 conv ``p[n] = w u[n]`` (u (N, Ci, H, W), w (Co, Ci, 1, 1)) as a batched matmul.

    With ``stats`` also ``(mean, rstd)`` of p per output channel, as :func:`cnn_edge_bn_stats` gives
    them (running statistics updated the same way); otherwise both are None.
    Returns ``(p, mean, rstd)``, p (N, Co, H, W) in u's dtype.
    """
    op = "cnn_edge_pw_forward"
    _check_pw(op, u, w)
    N, Ci, H, W = u.shape
    co = w.shape[0]
    rm = rv = None
    if stats:
        if N * H * W <= 1:
            raise ValueError(
                f"{op}: u: expected more than one value per channel (BatchNorm in training), got {_describe(u)}"
            )
        _check_eps(op, eps)
        rm = _check_running(op, running_mean, "running_mean", u, "u", co)
        rv = _check_running(op, running_var, "running_var", u, "u", co)
    p = conv1x1(u.contiguous(), w)
    if not stats:
        return p, None, None
    acc = accumulation_dtype(p.dtype)
    if p.numel() == 0:
        e = torch.empty(co, dtype=acc, device=p.device)
        return p, e, e.clone()
    mean, var = _moments(_bn_stats(p, acc), N * H * W)
    _update_running(rm, rv, mean, var, N * H * W, momentum)
    return p, mean, _rstd(var, eps)


def cnn_edge_pw_backward(
    g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, need_grad_w: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of the 1x1 conv: ``(grad_u = w^T g, grad_w = sum_n g[n] u[n]^T)``; grad_w (shaped
    and typed like w) is None unless ``need_grad_w``."""
    op = "cnn_edge_pw_backward"
    _check_pw(op, u, w)
    N, Ci, H, W = u.shape
    co = w.shape[0]
    _check_tensor(op, g, "g")
    if tuple(g.shape) != (N, co, H, W) or g.dtype != u.dtype:
        raise ValueError(
            f"{op}: g: expected the shape of the conv's output [{N}, {co}, {H}, {W}] with u's dtype, "
            f"got {_describe(g)}"
        )
    _check_same_device(op, g, "g", u, "u")
    return conv1x1_backward(g, u, w, need_grad_w)


# --------------------------------------------------------------------------------------------
# The mix
# --------------------------------------------------------------------------------------------


def cnn_edge_mix_forward(
    x: torch.Tensor,
    ps: Sequence[torch.Tensor],
    w: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    eps: float,
    momentum: float,
    running_means: Sequence[Optional[torch.Tensor]],
    running_vars: Sequence[Optional[torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = w[0] BN(maxpool(x)) + w[1] BN(avgpool(x)) + w[2] x + sum_j w[3 + j] BN(ps[j])``.

    Terms present by has_max / has_avg / has_skip (skip only at stride 1); pools 3x3, stride
    ``stride`` (1 or 2), padding 1, avg without the padding in its count; BatchNorms affine-free
    with batch statistics.

    Args:
        x: (N, C, H, W). ps: K tensors (N, C, Ho, Wo) with x's dtype. w: (3 + K,) any floating dtype.
        running_means, running_vars: 2 + K entries each ((C,) tensors or None: max, avg, then ps),
            updated in place with ``momentum``.

    Returns:
        ``(out, mean, rstd)``: out (N, C, Ho, Wo) in x's dtype; mean, rstd (2 + K, C) in the
        accumulation dtype, rows 0 and 1 the pools' (0 and 1 when absent), row 2 + j ps[j]'s.
    """
    op = "cnn_edge_mix_forward"
    ps, ho, wo, stride = _check_mix_args(op, x, ps, w, stride, has_skip)
    _check_eps(op, eps)
    K = len(ps)
    J = 2 + K
    rms = _check_list(op, running_means, "running_means")
    rvs = _check_list(op, running_vars, "running_vars")
    if len(rms) != J or len(rvs) != J:
        raise ValueError(
            f"{op}: running_means, running_vars: expected 2 + len(ps) = {J} entries (None where "
            f"absent), got {len(rms)} and {len(rvs)}"
        )
    rms = [_check_running(op, t, f"running_means[{j}]", x, "x") for j, t in enumerate(rms)]
    rvs = [_check_running(op, t, f"running_vars[{j}]", x, "x") for j, t in enumerate(rvs)]
    N, C, H, W = x.shape
    if N * ho * wo <= 1:
        raise ValueError(
            f"{op}: x: expected more than one output value per channel (BatchNorm in training), got {_describe(x)}"
        )
    x = x.detach().contiguous()
    ps = [p.detach().contiguous() for p in ps]
    acc = accumulation_dtype(x.dtype)
    dev = x.device
    wa = w.detach().to(acc).contiguous()
    out = torch.empty((N, C, ho, wo), dtype=x.dtype, device=dev)
    mean = torch.zeros((J, C), dtype=acc, device=dev)
    rstd = torch.ones((J, C), dtype=acc, device=dev)
    if out.numel() == 0:
        return out, mean, rstd
    M = N * ho * wo
    block = _block(ho * wo)
    T = triton.cdiv(ho * wo, block)

    # pass 1: the statistics of every BatchNorm's input
    if has_max or has_avg:
        part = torch.empty((N, C, T, 6), dtype=acc, device=dev)
        _pool_moments_kernel[(N * C, T)](
            x, part, H, W, ho, wo, stride, T, HAS_MAX=bool(has_max), HAS_AVG=bool(has_avg), BLOCK=block
        )
        for j, present in ((0, has_max), (1, has_avg)):
            if present:
                m, v = _moments(part[..., 3 * j: 3 * j + 3], M)
                mean[j] = m
                rstd[j] = _rstd(v, eps)
                _update_running(rms[j], rvs[j], m, v, M, momentum)
    for j, p in enumerate(ps):
        m, v = _moments(_bn_stats(p, acc), M)
        mean[2 + j] = m
        rstd[2 + j] = _rstd(v, eps)
        _update_running(rms[2 + j], rvs[2 + j], m, v, M, momentum)

    # pass 2: out = D + w_skip x + sum_j a_j y_j, a_j = w_j rstd_j, D = -sum_j a_j mean_j
    zero = torch.zeros((C,), dtype=acc, device=dev)
    a_max = wa[0] * rstd[0] if has_max else zero
    a_avg = wa[1] * rstd[1] if has_avg else zero
    a_ps = wa[3:, None] * rstd[2:]  # (K, C)
    D = -(a_max * mean[0] + a_avg * mean[1] + (a_ps * mean[2:]).sum(0))
    w_skip = (wa[2] if has_skip else wa[2] * 0).expand(C)
    coef = torch.cat([torch.stack([D, w_skip, a_max, a_avg], 1), a_ps.t()], 1).contiguous()  # (C, 4 + K)
    spans = chunks(K) or [(0, 0)]
    running = out if len(spans) == 1 or out.dtype == acc else torch.empty(out.shape, dtype=acc, device=dev)
    for i, (start, stop) in enumerate(spans):
        last = i == len(spans) - 1
        _mix_out_kernel[(N * C, T)](
            out if last else running, running, x, coef, *padded(ps[start:stop], x),
            C, H, W, ho, wo, stride, 4 + K, 4 + start,
            K=stop - start, FIRST=i == 0, HAS_MAX=bool(has_max), HAS_AVG=bool(has_avg),
            HAS_SKIP=bool(has_skip), BLOCK=block,
        )
    return out, mean, rstd


def cnn_edge_mix_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    ps: Sequence[torch.Tensor],
    w: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Tuple[Optional[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Backward of :func:`cnn_edge_mix_forward` (the pools are recomputed from x).

    Args:
        g: (N, C, Ho, Wo) gradient of out, x's dtype. x, ps, w, stride, has_*: as in the forward.
        mean, rstd: (2 + K, C) as the forward returned them (x's or the accumulation dtype).

    Returns:
        ``(grad_x, grad_ps, grad_w)``: grad_x (N, C, H, W) in x's dtype from the pools and the
        skip, None when none of them is present; grad_ps: list of K tensors like ps; grad_w:
        (3 + K,) in w's dtype, zero where a term is absent.
    """
    op = "cnn_edge_mix_backward"
    ps, ho, wo, stride = _check_mix_args(op, x, ps, w, stride, has_skip)
    N, C, H, W = x.shape
    _check_tensor(op, g, "g")
    if tuple(g.shape) != (N, C, ho, wo) or g.dtype != x.dtype:
        raise ValueError(
            f"{op}: g: expected the shape of the edge's output [{N}, {C}, {ho}, {wo}] with x's dtype, "
            f"got {_describe(g)}"
        )
    _check_same_device(op, g, "g", x, "x")
    K = len(ps)
    J = 2 + K
    mean = _stat_input(op, mean, "mean", (J, C), x)
    rstd = _stat_input(op, rstd, "rstd", (J, C), x)
    g = g.detach().contiguous()
    x = x.detach().contiguous()
    ps = [p.detach().contiguous() for p in ps]
    acc = accumulation_dtype(x.dtype)
    dev = x.device
    wa = w.detach().to(acc).contiguous()
    pools = bool(has_max or has_avg)
    gx = torch.empty_like(x) if (pools or has_skip) else None
    if g.numel() == 0:
        if gx is not None:
            gx.zero_()
        return gx, [torch.zeros_like(p) for p in ps], torch.zeros(3 + K, dtype=w.dtype, device=dev)
    M = N * ho * wo
    block = _block(ho * wo)
    T = triton.cdiv(ho * wo, block)

    # pass 1: per-channel sums: sum g, sum g * xhat_j for every BatchNorm, sum g * x
    part = torch.zeros((N, C, T, 4), dtype=acc, device=dev)  # absent terms' columns stay 0
    _mix_bwd_sums_kernel[(N * C, T)](
        g, x, mean, rstd, part, C, H, W, ho, wo, stride, T,
        HAS_MAX=bool(has_max), HAS_AVG=bool(has_avg), HAS_SKIP=bool(has_skip), BLOCK=block,
    )
    sg, sgx_max, sgx_avg, sgx_skip = _plane_sum(part).unbind(1)
    sgx_ps = [_plane_sum(_bn_sums(g, p, mean[2 + j], rstd[2 + j], acc))[:, 1] for j, p in enumerate(ps)]
    grad_w = torch.stack([sgx_max.sum(), sgx_avg.sum(), sgx_skip.sum()] + [t.sum() for t in sgx_ps]).to(w.dtype)

    # pass 2: grad of each BatchNorm's input = A_j g + B_j y_j + D_j; through the pools for x
    grad_ps = [
        _affine(g, p, _bn_backward_coefs(wa[3 + j], mean[2 + j], rstd[2 + j], sg, sgx_ps[j], M))
        for j, p in enumerate(ps)
    ]
    if gx is not None:
        if pools:
            coef = torch.cat([
                _bn_backward_coefs(wa[0], mean[0], rstd[0], sg, sgx_max, M),
                _bn_backward_coefs(wa[1], mean[1], rstd[1], sg, sgx_avg, M),
            ], 1).contiguous()  # (C, 6)
            gmax = torch.empty((N, C, ho, wo), dtype=acc, device=dev) if has_max else coef
            arg = torch.empty((N, C, ho, wo), dtype=torch.int32, device=dev) if has_max else coef
            gavg = torch.empty((N, C, ho, wo), dtype=acc, device=dev) if has_avg else coef
            _pool_bwd_prep_kernel[(N * C, T)](
                g, x, coef, gmax, arg, gavg, C, H, W, ho, wo, stride,
                HAS_MAX=bool(has_max), HAS_AVG=bool(has_avg), BLOCK=block,
            )
        else:
            gmax = arg = gavg = wa
        bx = _block(H * W)
        _pool_bwd_gather_kernel[(N * C, triton.cdiv(H * W, bx))](
            gmax, arg, gavg, g, wa, gx, H, W, ho, wo, stride,
            HAS_MAX=bool(has_max), HAS_AVG=bool(has_avg), HAS_SKIP=bool(has_skip), POOLS=pools,
            BLOCK=bx,
        )
    return gx, grad_ps, grad_w
