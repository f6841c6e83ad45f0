"""The training-mode ESS search cell (pynas/strategies/ess.py) over a whole sequence as ONE autograd node.

Per time step the module path runs two inter-cell DAGs (f: ``h^_(t-1)``, g: ``x^_t``; m + 1 sources, K mixed
nodes, each DAG with its own BatchNorm) and then the DARTS intra cell on ``(x^_t, h^_(t-1))``, recording a graph
of a few hundred autograd nodes per step. Here the forward runs the T steps without recording one and saves only
what the backward needs; the backward walks the steps in reverse with hand-written derivatives (BatchNorm backward
from the saved batch statistics, the mix's backward kernel, the GEMM transposes).

Where the GEMMs go. A DAG node's GEMM ``[c_j | h_j] = (s_j * mask_j) @ W_k`` splits into its sources (j <= m)
and its intermediate predecessors. A source is an input x (masked by x_mask) or a cell output h (masked by
h_mask), and the product of one source with one W_k is the same at every step that reads it, so each x and
each h meets the 2K DAG matrices once: the inputs (and the window's x) in one GEMM for the whole sequence, each
new h_t in one GEMM ``(B, H) @ (H, 4KH)`` as it is made (per step m + 1 times fewer source rows than one GEMM
per node over all its predecessors). Per step and node only the intermediate predecessors get a GEMM. In the backward the same split gives one GEMM per
step for the gradient of h_t through its products, and one per sequence for the x's and for every DAG weight.
The intra cell is the DARTS cell: each step calls the backend's kernels of :mod:`pynas.ops.rnn_cell` over that
one step (the C++ loop of csrc/rnn_cell.cpp for cpu and cuda, its Python driver around the Triton mix kernels
for triton), forward and backward.

BatchNorm running statistics and ``num_batches_tracked`` of the three BatchNorms (``cell.bn``, ``cell.f.bn``,
``cell.g.bn``) change exactly as the module path changes them (the same calls in the same order per
BatchNorm: K per step for f and for g, steps + 1 for the intra cell).

``Function``: forward(probs of alpha, beta_f and beta_g, already softmaxed; the softmax stays in autograd)
-> hiddens (T, B, H); the carried window (2m, B, H) is sliced from the hiddens, the inputs and the old window
outside it, in autograd. A backward with ``create_graph=True`` differentiates :func:`ess_cell_ref` (the same
math in plain PyTorch, batch-statistics BatchNorm) on the saved inputs, so higher derivatives are exact, as for
:mod:`pynas.ops.rnn_cell`.

Used by :class:`~pynas.strategies.ess.ESSCellSearch` in training mode when the backend is not ``reference``;
eval mode, the reference backend, ``torch.compile`` and torch.func take the module path.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .. import _autodiff
from . import _dispatch
from .rnn_cell import TABLE as RNN_CELL_TABLE
from .rnn_cell import _bn_backward, _bn_forward
from .rnn_cell import rnn_cell_ref
from .rnn_mix import TABLE as RNN_MIX_TABLE
from .rnn_mix import rnn_mix_ref

__all__ = ["TABLE", "ess_cell", "ess_cell_ref", "ess_cell_forward_impl", "ess_cell_backward_impl"]


def _stat_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _edges(m: int, nodes: int) -> int:
    return sum(m + 1 + k for k in range(nodes))


def _dag_forward(kern, t, m, nodes, S, CH, U, MEAN, INVSTD, sources, probs, Ws, h_mask, bn):
    """One inter-cell DAG at step t: ``S[t, :m+1]`` holds its sources, ``sources(k, ch)`` writes their products
    with W_k, [sigmoid(c) ; h], into ch (2, m + 1, B, H). Writes the nodes into S[t, m+1:] (their BatchNorm
    inputs into U[t], the batch statistics into MEAN[t], INVSTD[t]) and returns their mean."""
    B, H = S.shape[2], S.shape[3]
    off = 0
    for k in range(nodes):
        n = m + 1 + k
        ch = CH[t, :, off:off + n]  # (2, n, B, H): [sigmoid(c) | h] of every edge into node k
        sources(k, ch[:, :m + 1])
        if k:
            prod = torch.mm((S[t, m + 1:n] * h_mask).view(k * B, H), Ws[k]).view(k, B, 2, H)
            ch[:, m + 1:].copy_(prod.permute(2, 0, 1, 3))
            ch[0, m + 1:].sigmoid_()
        U[t, k] = kern.mix.rnn_mix_forward(S[t, :n], ch[0], ch[1], probs[off:off + n])
        s, MEAN[t, k], INVSTD[t, k] = _bn_forward(U[t, k], *bn)
        S[t, n] = s
        off += n
    return S[t, m + 1:].mean(0)


def ess_cell_forward_impl(kern, m, nodes, bn_args, xs, window, x_mask, h_mask, probs, probs_f, probs_g,
                          W0, Ws, Wf, Wg):
    """The forward loop around a backend's kernels ``kern`` (:class:`_Kernels`). ``bn_args``: per BatchNorm
    (intra cell, f, g) ``(running_mean, running_var, momentum, eps)``, the running statistics updated in place.
    Returns ``(hiddens (T, B, H), saved tensors)``."""
    T, B, H = xs.shape
    K, steps, R = nodes, len(Ws), T + m
    opts = dict(dtype=xs.dtype, device=xs.device)
    sdt = dict(dtype=_stat_dtype(xs.dtype), device=xs.device)
    (running_mean, running_var, momentum, eps), bn_f, bn_g = bn_args
    saved_pi: List[torch.Tensor] = []  # the intra cell's saved tensors, step by step
    # every x and h of the sequence and the window, newest first: XR[r] = x_(T-1-r), HR[r] = h_(T-1-r)
    XR = torch.cat([xs.flip(0), window[m:]])
    HR = torch.empty(R, B, H, **opts)
    HR[T:] = window[:m]
    Wcat = torch.cat(list(Wf) + list(Wg), 1)  # (H, 4KH): [Wf_0 .. Wf_(K-1) | Wg_0 .. Wg_(K-1)]
    # products of the sources with every DAG matrix, [sigmoid(c) | h] per (DAG, node): (R, B, 2, K, 2, H)
    XP = torch.mm((XR * x_mask).view(R * B, H), Wcat).view(R, B, 2, K, 2, H)
    XP[..., 0, :].sigmoid_()
    HP = torch.zeros(R, B, 2, K, 2, H, **opts)
    HP[T:] = torch.mm((window[:m] * h_mask).view(m * B, H), Wcat).view(m, B, 2, K, 2, H)
    HP[T:, ..., 0, :].sigmoid_()

    ndag, E = m + 1 + K, _edges(m, K)
    SF = torch.empty(T, ndag, B, H, **opts)  # f's sources and nodes (BatchNorm outputs)
    SG = torch.empty(T, ndag, B, H, **opts)
    UF = torch.empty(T, K, B, H, **opts)  # their BatchNorm inputs
    UG = torch.empty(T, K, B, H, **opts)
    CHF = torch.empty(T, 2, E, B, H, **opts)  # sigmoid(c) and h of every edge
    CHG = torch.empty(T, 2, E, B, H, **opts)
    MEANF, INVF, MEANG, INVG = (torch.empty(T, K, H, **sdt) for _ in range(4))
    out = torch.empty(T, B, H, **opts)

    def prods(P, r0, r1, d, k):  # (rows, B, 2, H) -> (2, rows, B, H)
        return P[r0:r1, :, d, k].permute(2, 0, 1, 3)

    for t in range(T):
        r = T - t  # row of h_(t-1) and x_(t-1)
        SF[t, 0] = HR[r]
        SF[t, 1:m + 1] = XR[r:r + m]
        SG[t, 0] = XR[r - 1]
        SG[t, 1:m + 1] = HR[r:r + m]

        def f_sources(k, ch):
            ch[:, :1].copy_(prods(HP, r, r + 1, 0, k))
            ch[:, 1:].copy_(prods(XP, r, r + m, 0, k))

        def g_sources(k, ch):
            ch[:, :1].copy_(prods(XP, r - 1, r, 1, k))
            ch[:, 1:].copy_(prods(HP, r, r + m, 1, k))

        h_hat = _dag_forward(kern, t, m, K, SF, CHF, UF, MEANF, INVF, f_sources, probs_f, Wf, h_mask, bn_f)
        x_hat = _dag_forward(kern, t, m, K, SG, CHG, UG, MEANG, INVG, g_sources, probs_g, Wg, h_mask, bn_g)
        # the intra cell on (x^_t, h^_(t-1)): pynas.ops.rnn_cell's kernels over one step
        res = kern.cell.forward(steps, momentum, eps, x_hat.unsqueeze(0), h_hat, x_mask, h_mask, probs,
                                running_mean, running_var, W0, Ws)
        out[t] = res[0][0]
        saved_pi += res[1:]
        HR[r - 1] = out[t]
        if t < T - 1:  # h_t is a source of the next m steps: its products once
            p = HP[r - 1]
            torch.mm(out[t] * h_mask, Wcat, out=p.view(B, -1))
            p[..., 0, :].sigmoid_()
    return out, [XR, HR, SF, SG, UF, UG, CHF, CHG, MEANF, INVF, MEANG, INVG] + saved_pi


_N_SAVED_DAG = 12  # the DAGs' part of the saved tensors (then the intra cell's, step by step)


def _dag_backward(kern, t, m, nodes, g_mean, S, CH, U, MEAN, INVSTD, probs, Ws, g_Ws, g_probs, h_mask, eps,
                  src_grads, gS, gCH):
    """The backward of :func:`_dag_forward` at step t for d(mean of the nodes) = ``g_mean``; accumulates into
    g_Ws (the intermediate predecessors' part) and g_probs, calls ``src_grads(k, d [c | h] of the sources
    (m + 1, B, 2H))`` per node and returns d sources (m + 1, B, H) through the mix. ``gS`` (m + 1 + nodes, B, H),
    ``gCH`` (m + nodes, B, 2H): work buffers."""
    B, H = S.shape[2], S.shape[3]
    gS[:m + 1].zero_()
    gS[m + 1:] = g_mean / nodes
    off = _edges(m, nodes)
    for k in reversed(range(nodes)):
        n = m + 1 + k
        off -= n
        g_u = _bn_backward(gS[n], U[t, k], MEAN[t, k], INVSTD[t, k], eps)
        c, hh = CH[t, 0, off:off + n], CH[t, 1, off:off + n]
        dS, dC, dHH, dP = kern.rnn_mix_backward(g_u, S[t, :n], c, hh, probs[off:off + n])
        g_probs[off:off + n] += dP
        gch = gCH[:n]
        torch.ops.aten.sigmoid_backward(dC, c, grad_input=gch[..., :H])
        gch[..., H:] = dHH
        gS[:n] += dS
        if k:
            g2 = gch[m + 1:].reshape(k * B, 2 * H)
            g_Ws[k].addmm_((S[t, m + 1:n] * h_mask).view(k * B, H).t(), g2)
            gS[m + 1:n].addcmul_(torch.mm(g2, Ws[k].t()).view(k, B, H), h_mask)
        src_grads(k, gch[:m + 1])
    return gS[:m + 1]


def ess_cell_backward_impl(kern, m, nodes, eps, grad_out, x_mask, h_mask, probs, probs_f, probs_g, W0, Ws, Wf, Wg,
                           saved):
    """The backward of :func:`ess_cell_forward_impl`. ``eps``: per BatchNorm (intra cell, f, g). Returns
    ``[d xs, d window, d probs, d probs_f, d probs_g, d W0, *d Ws, *d Wf, *d Wg]``."""
    XR, HR, SF, SG, UF, UG, CHF, CHG, MEANF, INVF, MEANG, INVG = saved[:_N_SAVED_DAG]
    saved_pi = saved[_N_SAVED_DAG:]
    n_pi = len(saved_pi) // grad_out.shape[0]
    eps_pi, eps_f, eps_g = eps
    T, B, H = grad_out.shape
    K, R = nodes, T + m
    opts = dict(dtype=SF.dtype, device=SF.device)
    Wcat = torch.cat(list(Wf) + list(Wg), 1)
    gHR = torch.zeros(R, B, H, **opts)  # d h_(T-1-r): the incoming gradient, then what later steps add
    gHR[:T] = grad_out.flip(0)
    gXR = torch.zeros(R, B, H, **opts)
    gHP = torch.zeros(R, B, 2, K, 2 * H, **opts)  # d (source products), before the sigmoid
    gXP = torch.zeros(R, B, 2, K, 2 * H, **opts)
    g_pf, g_pg = torch.zeros_like(probs_f), torch.zeros_like(probs_g)
    g_pi = [torch.zeros_like(probs), torch.zeros_like(W0)] + [torch.zeros_like(w) for w in Ws]
    g_Wf = [torch.zeros_like(w) for w in Wf]
    g_Wg = [torch.zeros_like(w) for w in Wg]
    gS = torch.empty(m + 1 + K, B, H, **opts)
    gCH = torch.empty(m + K, B, 2 * H, **opts)
    for t in reversed(range(T)):
        r = T - t
        g_h = gHR[r - 1]  # every later use of h_t is done: complete it with the gradient through its products
        if t < T - 1:
            g_h.addcmul_(torch.mm(gHP[r - 1].view(B, -1), Wcat.t()), h_mask)
        # the intra cell: d x^_t (x_mask applied), d h^_(t-1), d probs, d W0, d Ws
        g_xhat, g_hhat, *g = kern.cell.backward(g_h.unsqueeze(0), x_mask, h_mask, probs, W0, Ws,
                                                saved_pi[t * n_pi:(t + 1) * n_pi], eps_pi, True)
        torch._foreach_add_(g_pi, g)

        # g: sources x_t (row r - 1 of the x's), h_(t-1) .. h_(t-m) (rows r .. r + m - 1)
        def g_src(k, gch):
            gXP[r - 1, :, 1, k] += gch[0]
            gHP[r:r + m, :, 1, k] += gch[1:]

        gs = _dag_backward(kern.mix, t, m, K, g_xhat[0], SG, CHG, UG, MEANG, INVG, probs_g, Wg, g_Wg, g_pg,
                           h_mask, eps_g, g_src, gS, gCH)
        gXR[r - 1] += gs[0]
        gHR[r:r + m] += gs[1:]

        # f: sources h_(t-1) (row r of the h's), x_(t-1) .. x_(t-m) (rows r .. r + m - 1)
        def f_src(k, gch):
            gHP[r, :, 0, k] += gch[0]
            gXP[r:r + m, :, 0, k] += gch[1:]

        gs = _dag_backward(kern.mix, t, m, K, g_hhat, SF, CHF, UF, MEANF, INVF, probs_f, Wf, g_Wf, g_pf, h_mask,
                           eps_f, f_src, gS, gCH)
        gHR[r] += gs[0]
        gXR[r:r + m] += gs[1:]
    # the window's h through their products; every x through its products; the DAG matrices' source part
    gHR[T:].addcmul_(torch.mm(gHP[T:].view(m * B, -1), Wcat.t()).view(m, B, H), h_mask)
    gXR.addcmul_(torch.mm(gXP.view(R * B, -1), Wcat.t()).view(R, B, H), x_mask)
    g_Wcat = torch.mm((XR * x_mask).view(R * B, H).t(), gXP.view(R * B, -1))
    g_Wcat.addmm_((HR * h_mask).view(R * B, H).t(), gHP.view(R * B, -1))
    for k in range(K):
        g_Wf[k] += g_Wcat[:, 2 * H * k:2 * H * (k + 1)]
        g_Wg[k] += g_Wcat[:, 2 * H * (K + k):2 * H * (K + k + 1)]
    g_xs = gXR[:T].flip(0)
    g_window = torch.cat([gHR[T:], gXR[T:]])
    g_probs, g_W0, *g_Ws = g_pi
    return [g_xs, g_window, g_probs, g_pf, g_pg, g_W0] + g_Ws + g_Wf + g_Wg


def _bn_ref(u, eps):
    return F.batch_norm(u, None, None, training=True, eps=eps)


def _dag_ref(sources, probs, Ws, masks, m, eps):
    H = sources[0].shape[-1]
    states, off = list(sources), 0
    for W in Ws:
        n = len(states)
        st = torch.stack(states)
        c, hh = torch.split((st * masks[:n]).reshape(-1, H).mm(W).view(n, -1, 2 * H), H, dim=-1)
        states.append(_bn_ref(rnn_mix_ref(st, c.sigmoid(), hh, probs[off:off + n]), eps))
        off += n
    return torch.stack(states[m + 1:]).mean(0)


def ess_cell_ref(m, nodes, eps, xs, window, x_mask, h_mask, probs, probs_f, probs_g, W0, Ws, Wf, Wg):
    """The hiddens (T, B, H) of the training-mode ESS search cell in plain PyTorch ops (the module path's math,
    functionally): batch-statistics BatchNorm that leaves the running statistics alone; ``eps`` per BatchNorm
    (intra cell, f, g). The double backward of the fused sequence differentiates this."""
    eps_pi, eps_f, eps_g = eps
    masks_f = torch.stack([h_mask] + [x_mask] * m + [h_mask] * nodes)
    masks_g = torch.stack([x_mask] + [h_mask] * (m + nodes))
    hs, xw = list(window[:m]), list(window[m:])
    outs = []
    for t in range(xs.shape[0]):
        x = xs[t]
        h_hat = _dag_ref([hs[0]] + xw, probs_f, Wf, masks_f, m, eps_f)
        x_hat = _dag_ref([x] + hs, probs_g, Wg, masks_g, m, eps_g)
        h = rnn_cell_ref(len(Ws), eps_pi, x_hat.unsqueeze(0), h_hat, x_mask, h_mask, probs, W0, Ws)[0]
        outs.append(h)
        hs, xw = [h] + hs[:-1], [x] + xw[:-1]
    return torch.stack(outs)


class _Kernels(NamedTuple):
    """What an implementation of the fused ESS sequence calls: its backend's kernels of the node mix
    (:mod:`pynas.ops.rnn_mix`, for the inter-cell DAGs) and of the DARTS cell (:mod:`pynas.ops.rnn_cell`, run one
    step at a time for the intra cell)."""

    mix: Any
    cell: Any


def _loader(backend: str) -> Callable[[], _Kernels]:
    return lambda: _Kernels(RNN_MIX_TABLE[backend].kernels(), RNN_CELL_TABLE[backend].kernels())


TABLE = _dispatch.register("ess_cell", [
    _dispatch.reference("ess_cell"),
    _dispatch.extension("ess_cell", "cpu", loader=_loader("cpu")),
    _dispatch.extension("ess_cell", "cuda", loader=_loader("cuda")),
    _dispatch.triton("ess_cell", "rnn_mix", loader=_loader("triton")),
])

# Function inputs before the tensors: backend, m, nodes, bn_args.
_N_CONST = 4


class _EssCellFunction(torch.autograd.Function):
    """forward(backend, m, nodes, bn_args, xs (T, B, H), window (2m, B, H), x_mask (B, H), h_mask (B, H),
    probs (36, 5), probs_f, probs_g (dag_edges, 5), W0 (2H, 2H), *weights: Ws (steps), Wf (nodes), Wg (nodes),
    each (H, 2H)) -> hiddens (T, B, H). ``bn_args``: per BatchNorm (intra cell, f, g) ``(running_mean,
    running_var, momentum, eps)``; the running statistics are updated in place."""

    @staticmethod
    def forward(ctx, backend, m, nodes, bn_args, xs, window, x_mask, h_mask, probs, probs_f, probs_g, W0, *weights):
        steps = len(weights) - 2 * nodes
        Ws, Wf, Wg = weights[:steps], weights[steps:steps + nodes], weights[steps + nodes:]
        out, saved = ess_cell_forward_impl(TABLE[backend].kernels(), m, nodes, bn_args, xs, window, x_mask, h_mask,
                                           probs, probs_f, probs_g, W0, Ws, Wf, Wg)
        ctx.save_for_backward(xs, window, x_mask, h_mask, probs, probs_f, probs_g, W0, *weights, *saved)
        ctx.backend, ctx.m, ctx.nodes, ctx.steps = backend, m, nodes, steps
        ctx.eps = tuple(a[3] for a in bn_args)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, window, x_mask, h_mask, probs, probs_f, probs_g, W0, *rest = ctx.saved_tensors
        m, nodes, steps, eps = ctx.m, ctx.nodes, ctx.steps, ctx.eps
        nw = steps + 2 * nodes
        weights, saved = rest[:nw], rest[nw:]
        none = (None,) * _N_CONST
        if torch.is_grad_enabled():  # create_graph=True: differentiate the functional reference (exact)
            needs = ctx.needs_input_grad[_N_CONST:]

            def fn(xs_, window_, p_, pf_, pg_, W0_, *w_):
                return ess_cell_ref(m, nodes, eps, xs_, window_, x_mask, h_mask, p_, pf_, pg_, W0_, w_[:steps],
                                    w_[steps:steps + nodes], w_[steps + nodes:])

            g = _autodiff.grad_through(fn, (xs, window, probs, probs_f, probs_g, W0, *weights),
                                       (needs[0], needs[1], *needs[4:]), grad_out)
        else:
            g = ess_cell_backward_impl(TABLE[ctx.backend].kernels(), m, nodes, eps, grad_out.contiguous(), x_mask,
                                       h_mask, probs, probs_f, probs_g, W0, weights[:steps],
                                       weights[steps:steps + nodes], weights[steps + nodes:], saved)
        g_xs, g_window, *g_rest = g
        return (*none, g_xs, g_window, None, None, *g_rest)


def ess_cell(cell, inputs: torch.Tensor, window: torch.Tensor, x_mask: torch.Tensor, h_mask: torch.Tensor,
             probs: torch.Tensor, probs_f: torch.Tensor, probs_g: torch.Tensor,
             impl: _dispatch.Implementation) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(hiddens (T, B, H), window (2m, B, H))`` of ``cell`` (a training-mode ESSCellSearch whose three
    BatchNorms track running statistics with a momentum) over ``inputs`` (T, B, H) from ``window``, through
    ``impl`` (from :data:`TABLE`); ``probs``, ``probs_f``, ``probs_g``: the softmaxed alpha, beta_f, beta_g."""
    m, nodes = cell.m, cell.nodes
    bns = (cell.bn, cell.f.bn, cell.g.bn)
    bn_args = tuple((bn.running_mean, bn.running_var, bn.momentum, bn.eps) for bn in bns)
    weights: List[torch.Tensor] = list(cell._Ws) + list(cell.f._Ws) + list(cell.g._Ws)
    inputs, window = inputs.contiguous(), window.contiguous()
    hiddens = _EssCellFunction.apply(impl.backend, m, nodes, bn_args, inputs, window, x_mask.contiguous(),
                                     h_mask.contiguous(), probs.contiguous(), probs_f.contiguous(),
                                     probs_g.contiguous(), cell._W0, *weights)
    T = inputs.shape[0]
    with torch.no_grad():
        cell.bn.num_batches_tracked.add_(T * (len(cell._Ws) + 1))
        cell.f.bn.num_batches_tracked.add_(T * nodes)
        cell.g.bn.num_batches_tracked.add_(T * nodes)
    k = min(T, m)  # the new window: the last m outputs and inputs, newest first, the old window behind them
    state = torch.cat([hiddens[T - k:].flip(0), window[:m - k], inputs[T - k:].flip(0), window[m:2 * m - k]])
    return hiddens, state
