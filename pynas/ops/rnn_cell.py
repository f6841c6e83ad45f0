"""The training-mode DARTS RNN search cell over a whole sequence as ONE autograd node.

The module path builds an autograd graph of about 90 nodes per time step (3000 for a 35-step
sequence) and saves every intermediate; the eager reference builds about 280 per step. Here the
forward runs the T steps without recording a graph (each node: one GEMM for all its inputs, the sigmoid,
the fused node mix :func:`pynas.ops.rnn_mix`'s kernel, one BatchNorm call), saves only what the
backward needs, and the backward walks the steps in reverse with hand-written derivatives (BatchNorm
backward from the saved batch statistics, the mix's backward kernel, the GEMM transposes). The input
half of the first GEMM, its weight gradient and the gradient of the inputs are computed for all steps
at once (three GEMMs per sequence instead of 3T). BatchNorm running statistics and
``num_batches_tracked`` are updated as the module would update them (steps + 1 calls per time step).

Used by :class:`~pynas.rnn.DARTSCellSearch` in training mode when the backend is not ``reference``;
eval mode and the reference backend take the module path.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import _autodiff, _ext
from . import _dispatch
from .rnn_mix import TABLE as RNN_MIX_TABLE
from .rnn_mix import rnn_mix_ref


def _bn_forward(u, running_mean, running_var, momentum, eps):
    """Training BatchNorm1d (affine=False) of u (B, H): (x_hat, saved mean, saved inverse std)."""
    return torch.native_batch_norm(u, None, None, running_mean, running_var, True, momentum, eps)


def _bn_backward(grad, u, mean, invstd, eps):
    return torch.ops.aten.native_batch_norm_backward(grad, u, None, None, None, mean, invstd, True, eps,
                                                     [True, False, False])[0]


def rnn_cell_forward_impl(kern, steps, momentum, eps, xs, h0, x_mask, h_mask, probs, running_mean, running_var,
                      W0, Ws):
    """The loops of csrc/rnn_cell.cpp in Python, around a backend's rnn_mix kernels (the Triton backend's
    path; the C++ one is the same algorithm). Returns [hiddens, saved...] as the C++ function does."""
    T, B, I = xs.shape
    H = h0.shape[-1]
    n = steps + 1
    W0x, W0h = W0[:I], W0[I:]
    xm = xs * x_mask  # (T, B, I): the masked inputs of every step
    XW = torch.mm(xm.view(T * B, I), W0x).view(T, B, 2 * H)  # input half of the first GEMM, all steps
    opts = dict(dtype=xs.dtype, device=xs.device)
    S = torch.empty(T, n, B, H, **opts)  # node outputs s_0..s_steps (BatchNorm outputs)
    U = torch.empty(T, n, B, H, **opts)  # their BatchNorm inputs
    MEAN = torch.empty(T, n, H, dtype=torch.float32 if xs.dtype in (torch.float16, torch.bfloat16)
                       else xs.dtype, device=xs.device)
    INVSTD = torch.empty_like(MEAN)
    E = steps * (steps + 1) // 2
    C = torch.empty(T, E, B, H, **opts)  # sigmoid(c) of every edge
    HH = torch.empty(T, E, B, H, **opts)  # h of every edge (before its activation)
    C0 = torch.empty(T, B, H, **opts)
    H0 = torch.empty(T, B, H, **opts)
    HPREV = torch.empty(T, B, H, **opts)
    out = torch.empty(T, B, H, **opts)
    h = h0
    for t in range(T):
        HPREV[t] = h
        ch0 = torch.addmm(XW[t], h * h_mask, W0h)
        torch.sigmoid(ch0[:, :H], out=C0[t])
        torch.tanh(ch0[:, H:], out=H0[t])
        torch.lerp(h, H0[t], C0[t], out=U[t, 0])
        s, MEAN[t, 0], INVSTD[t, 0] = _bn_forward(U[t, 0], running_mean, running_var, momentum, eps)
        S[t, 0] = s
        off = 0
        for i in range(steps):
            J = i + 1
            st = S[t, :J]
            ch = torch.mm((st * h_mask).view(J * B, H), Ws[i]).view(J, B, 2 * H)
            c = C[t, off:off + J]
            torch.sigmoid(ch[..., :H], out=c)
            hh = HH[t, off:off + J]
            hh.copy_(ch[..., H:])
            U[t, J] = kern.rnn_mix_forward(st, c, hh, probs[off:off + J])
            s, MEAN[t, J], INVSTD[t, J] = _bn_forward(U[t, J], running_mean, running_var, momentum, eps)
            S[t, J] = s
            off += J
        torch.mean(S[t, n - steps:], dim=0, out=out[t])  # the mean of the last CONCAT (= steps) nodes
        h = out[t]
    return [out, xm, S, U, MEAN, INVSTD, C, HH, C0, H0, HPREV]


def rnn_cell_backward_impl(kern, grad_out, x_mask, h_mask, probs, W0, Ws, saved, eps, need_w=True):
    """The backward of :func:`rnn_cell_forward_impl`: [d xs, d h0, d probs, d W0, d Ws...] (the weights' None
    unless ``need_w``)."""
    xm, S, U, MEAN, INVSTD, C, HH, C0, H0, HPREV = saved
    steps = len(Ws)
    T, n, B, H = S.shape
    I = xm.shape[-1]
    W0x, W0h = W0[:I], W0[I:]
    g_probs = torch.zeros_like(probs)
    g_Ws: List[Optional[torch.Tensor]] = [torch.zeros_like(w) if need_w else None for w in Ws]
    g_W0h = torch.zeros_like(W0h) if need_w else None
    G0 = torch.empty(T, B, 2 * H, dtype=S.dtype, device=S.device)  # d (first GEMM's output), all steps
    gS = torch.empty(n, B, H, dtype=S.dtype, device=S.device)
    gCH = torch.empty(steps, B, 2 * H, dtype=S.dtype, device=S.device)
    g_h = torch.zeros(B, H, dtype=S.dtype, device=S.device)  # d h_t from step t + 1
    E = steps * (steps + 1) // 2
    inv_concat = 1.0 / steps
    for t in reversed(range(T)):
        g_ht = grad_out[t] + g_h
        gS.zero_()
        gS[n - steps:] += g_ht * inv_concat
        off = E
        for i in reversed(range(steps)):
            J = i + 1
            off -= J
            g_u = _bn_backward(gS[J], U[t, J], MEAN[t, J], INVSTD[t, J], eps)
            st, c, hh = S[t, :J], C[t, off:off + J], HH[t, off:off + J]
            dS, dC, dHH, dP = kern.rnn_mix_backward(g_u, st, c, hh, probs[off:off + J])
            g_probs[off:off + J] += dP
            gch = gCH[:J]
            torch.ops.aten.sigmoid_backward(dC, c, grad_input=gch[..., :H])
            gch[..., H:] = dHH
            masked = (st * h_mask).view(J * B, H)
            g2 = gch.view(J * B, 2 * H)
            if need_w:
                g_Ws[i].addmm_(masked.t(), g2)
            gM = torch.mm(g2, Ws[i].t()).view(J, B, H)
            gS[:J] += dS
            gS[:J].addcmul_(gM, h_mask)
        # s_0 = BN(h + c0 * (h0 - h)),  [c0 | h0] = [x m_x | h m_h] @ W0 through sigmoid / tanh
        g_u0 = _bn_backward(gS[0], U[t, 0], MEAN[t, 0], INVSTD[t, 0], eps)
        c0, hh0, hp = C0[t], H0[t], HPREV[t]
        g0 = G0[t]
        torch.ops.aten.sigmoid_backward(g_u0 * (hh0 - hp), c0, grad_input=g0[:, :H])
        torch.ops.aten.tanh_backward(g_u0 * c0, hh0, grad_input=g0[:, H:])
        if need_w:
            g_W0h.addmm_((hp * h_mask).t(), g0)
        g_h = g_u0 - g_u0 * c0
        g_h.addcmul_(torch.mm(g0, W0h.t()), h_mask)
    G = G0.view(T * B, 2 * H)
    g_W0 = torch.cat([torch.mm(xm.view(T * B, I).t(), G), g_W0h], 0) if need_w else None
    g_xs = torch.mm(G, W0x.t()).view(T, B, I) * x_mask
    return [g_xs, g_h, g_probs, g_W0] + g_Ws


def rnn_cell_ref(steps, eps, xs, h0, x_mask, h_mask, probs, W0, Ws):
    """The hiddens (T, B, H) of the cell over xs in plain PyTorch ops (the module path's math, functionally):
    batch-statistics BatchNorm that leaves the running statistics alone. The double backward of the fused
    sequence differentiates this."""
    H = h0.shape[-1]

    def bn(u):
        return F.batch_norm(u, None, None, training=True, eps=eps)

    h, outs = h0, []
    for t in range(xs.shape[0]):
        c0, hh0 = torch.split(torch.cat([xs[t] * x_mask, h * h_mask], -1).mm(W0), H, dim=-1)
        states = [bn(h + c0.sigmoid() * (hh0.tanh() - h))]
        off = 0
        for i in range(steps):
            st = torch.stack(states)
            c, hh = torch.split((st * h_mask).reshape(-1, H).mm(Ws[i]).view(i + 1, -1, 2 * H), H, dim=-1)
            states.append(bn(rnn_mix_ref(st, c.sigmoid(), hh, probs[off:off + i + 1])))
            off += i + 1
        h = torch.stack(states[-steps:]).mean(0)
        outs.append(h)
    return torch.stack(outs)


class _Kernels(NamedTuple):
    """What an implementation of the fused sequence calls."""

    #: (steps, momentum, eps, xs, h0, x_mask, h_mask, probs, running_mean, running_var, W0, Ws) -> [out, *saved]
    forward: Callable
    #: (grad_out, x_mask, h_mask, probs, W0, Ws, saved, eps, need_w) -> [d xs, d h0, d probs, d W0, *d Ws]
    #: (d W0 and d Ws None unless need_w)
    backward: Callable


def _extension_kernels() -> _Kernels:
    """csrc/rnn_cell.cpp: the loops in C++ (device-generic ATen calls, the extension's rnn_mix kernels)."""
    C = _ext.get()
    return _Kernels(
        lambda steps, momentum, eps, xs, h0, xm, hm, probs, rm, rv, W0, Ws: C.rnn_cell_forward(
            xs, h0, xm, hm, probs, rm, rv, W0, list(Ws), momentum, eps),
        lambda g, xm, hm, probs, W0, Ws, saved, eps, need_w: C.rnn_cell_backward(g, xm, hm, probs, W0, list(Ws),
                                                                                  list(saved), eps, need_w))


def _triton_kernels() -> _Kernels:
    """The loops in Python around the Triton rnn_mix kernels."""
    mix = RNN_MIX_TABLE["triton"].kernels()
    return _Kernels(functools.partial(rnn_cell_forward_impl, mix), functools.partial(rnn_cell_backward_impl, mix))


TABLE = _dispatch.register("rnn_cell", [
    _dispatch.reference("rnn_cell"),
    _dispatch.extension("rnn_cell", "cpu", loader=_extension_kernels),
    _dispatch.extension("rnn_cell", "cuda", loader=_extension_kernels),
    _dispatch.triton("rnn_cell", "rnn_mix", loader=_triton_kernels),
])


class _RnnCellFunction(torch.autograd.Function):
    """forward(backend, steps, momentum, eps, xs (T,B,I), h0 (B,H), x_mask (B,I), h_mask (B,H), probs (E,5),
    running_mean, running_var, W0 (I+H, 2H), *Ws (H, 2H)) -> hiddens (T, B, H)."""

    @staticmethod
    def forward(ctx, backend, steps, momentum, eps, xs, h0, x_mask, h_mask, probs, running_mean, running_var,
                W0, *Ws):
        res = TABLE[backend].kernels().forward(steps, momentum, eps, xs, h0, x_mask, h_mask, probs, running_mean,
                                     running_var, W0, Ws)
        out, saved = res[0], res[1:]
        ctx.save_for_backward(xs, h0, x_mask, h_mask, probs, W0, *saved, *Ws)
        ctx.backend, ctx.steps, ctx.eps, ctx.nsaved = backend, steps, eps, len(saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, h0, x_mask, h_mask, probs, W0, *rest = ctx.saved_tensors
        saved, Ws = rest[:ctx.nsaved], rest[ctx.nsaved:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the functional reference (exact)
            steps, eps = ctx.steps, ctx.eps
            needs = ctx.needs_input_grad
            g = _autodiff.grad_through(lambda xs_, h0_, p_, W0_, *Ws_: rnn_cell_ref(steps, eps, xs_, h0_, x_mask,
                                                                                     h_mask, p_, W0_, Ws_),
                                       (xs, h0, probs, W0, *Ws), (needs[4], needs[5], needs[8], *needs[11:]),
                                       grad_out)
            g_xs, g_h0, g_probs, g_W0, *g_Ws = g
            return (None, None, None, None, g_xs, g_h0, None, None, g_probs, None, None, g_W0, *g_Ws)
        grad_out = grad_out.contiguous()
        need_w = any(ctx.needs_input_grad[11:])  # off in the architecture-only passes (weights frozen)
        g = TABLE[ctx.backend].kernels().backward(grad_out, x_mask, h_mask, probs, W0, Ws, saved, ctx.eps, need_w)
        g_xs, g_h0, g_probs, g_W0, *g_Ws = g
        return (None, None, None, None, g_xs, g_h0, None, None, g_probs, None, None, g_W0, *g_Ws)


def rnn_cell(cell, inputs: torch.Tensor, h0: torch.Tensor, x_mask: torch.Tensor, h_mask: torch.Tensor,
             probs: torch.Tensor, impl: _dispatch.Implementation) -> torch.Tensor:
    """The hiddens (T, B, H) of ``cell`` (a training-mode DARTSCellSearch) over ``inputs`` (T, B, I), through
    ``impl`` (from :data:`TABLE`)."""
    bn = cell.bn
    momentum = bn.momentum  # the cell takes the module path when it is None (cumulative averages)
    Ws = [w for w in cell._Ws]
    out = _RnnCellFunction.apply(impl.backend, len(Ws), momentum, bn.eps, inputs.contiguous(), h0.contiguous(),
                              x_mask, h_mask, probs.contiguous(), bn.running_mean, bn.running_var, cell._W0, *Ws)
    with torch.no_grad():
        bn.num_batches_tracked.add_(inputs.shape[0] * (len(Ws) + 1))
    return out
