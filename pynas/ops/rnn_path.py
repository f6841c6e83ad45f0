"""rnn_path: the DARTS RNN evaluation cell of one genotype (a sampled path) over a whole sequence, as ONE
autograd node.

Per time step t, with the sequence's dropout masks m_x (B, I), m_h (B, H) (training; None in eval mode)::

    [c0 | g0] = [x_t * m_x | h * m_h] @ W0;        s_0 = h + sigmoid(c0) * (tanh(g0) - h)
    node i (0-based), its predecessor j = preds[i] <= i and activation f = acts[i]:
        [c | g] = (s_j * m_h) @ Ws[i];             s_{i+1} = s_j + sigmoid(c) * (f(g) - s_j)
    h_t = mean over k in concat of s_k

``xs``: (T, B, I), ``h0``: (B, H), ``W0``: (I + H, 2H), ``Ws``: steps tensors (H, 2H); returns the hiddens
(T, B, H). The genotype is a runtime argument (ENAS and RSWS swap it per batch): a
:class:`pynas.rnn.genotypes.Genotype` (``recurrent`` [(activation, predecessor)], ``concat``), or its
:class:`PathCode` of small integers (activation codes 1 tanh, 2 relu, 3 sigmoid, 4 identity, the columns of
rnn_mix's probs).

The module path (:class:`pynas.rnn.DARTSCell` on the reference backend) records about ten autograd nodes per
node and step. Here the forward runs the T steps without recording a graph: the input half of the first GEMM
for all steps at once, one GEMM per node, the highway step in a kernel (csrc/cpu/rnn_path.cpp,
csrc/cuda/rnn_path.cu, kernels/rnn_path.py; math in csrc/include/pynas/rnn_path.h). It saves the node outputs
and the GEMM outputs, and the backward walks the steps in reverse with hand-written derivatives; the weight
gradients are one GEMM per weight over all T * B rows. A backward with ``create_graph=True`` (double backward)
differentiates :func:`rnn_path_ref` instead (exact, as rnn_cell does). Under torch.compile and torch.func the
reference runs.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _autodiff, _ext
from . import _dispatch

__all__ = ["rnn_path", "rnn_path_ref", "path_code", "PathCode", "ACT_CODES", "TABLE"]

#: Activation name -> code (the column of rnn_mix's probs; 0, 'none', is not an activation of a path).
ACT_CODES = {"tanh": 1, "relu": 2, "sigmoid": 3, "identity": 4}
_TANH = ACT_CODES["tanh"]
_ACT_FNS = {1: torch.tanh, 2: torch.relu, 3: torch.sigmoid, 4: lambda t: t}


class PathCode(NamedTuple):
    """A genotype as the kernels take it: per node its predecessor (``preds[i]`` in [0, i], 0 being s_0) and
    activation code, and the states averaged into the output (``concat``, indices in [0, steps])."""

    preds: Tuple[int, ...]
    acts: Tuple[int, ...]
    concat: Tuple[int, ...]


def _ints(value, name: str) -> list:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dim() > 2:
            raise TypeError(f"{name}: expected an integer tensor or a list, got {value.dtype} of shape "
                            f"{tuple(value.shape)}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
    return list(value)


def _index(v, name: str, hi: int) -> int:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise ValueError(f"{name}: expected a state index in [0, {hi}], got {v!r}")
    return v


def _act(v, name: str) -> int:
    if isinstance(v, str):
        if v not in ACT_CODES:
            raise ValueError(f"{name}: expected an activation ({', '.join(ACT_CODES)}), got {v!r}")
        return ACT_CODES[v]
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v not in _ACT_FNS:
        raise ValueError(f"{name}: expected an activation name or code 1..4 (tanh, relu, sigmoid, identity), "
                         f"got {v!r}")
    return v


def path_code(genotype, steps: Optional[int] = None) -> PathCode:
    """The :class:`PathCode` of ``genotype``: a PathCode (checked), an object with ``recurrent`` and ``concat``
    (a Genotype), or a pair ``(recurrent, concat)``; ``recurrent`` a list of (activation, predecessor) pairs
    (activation a name or a code) or an integer tensor of such rows. ``steps``: the nodes expected (len(Ws))."""
    if isinstance(genotype, PathCode):
        preds, acts, concat = (_ints(v, f"genotype.{f}") for v, f in zip(genotype, PathCode._fields))
        if len(preds) != len(acts):
            raise ValueError(f"genotype: expected as many acts as preds, got {len(acts)} and {len(preds)}")
        pairs = list(zip(acts, preds))
    else:
        if hasattr(genotype, "recurrent") and hasattr(genotype, "concat"):
            recurrent, concat = genotype.recurrent, genotype.concat
        elif isinstance(genotype, (tuple, list)) and len(genotype) == 2:
            recurrent, concat = genotype
        else:
            raise TypeError(f"genotype: expected a Genotype (recurrent, concat) or a PathCode, got "
                            f"{type(genotype).__name__}")
        pairs = _ints(recurrent, "genotype.recurrent")
        concat = _ints(concat, "genotype.concat")
        for i, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2):
                raise ValueError(f"genotype.recurrent[{i}]: expected an (activation, predecessor) pair, got {p!r}")
    if not pairs:
        raise ValueError("genotype.recurrent: expected at least one node, got none")
    if steps is not None and len(pairs) != steps:
        raise ValueError(f"genotype.recurrent: expected {steps} nodes (one per node weight), got {len(pairs)}")
    n = len(pairs)
    out_acts = tuple(_act(a, f"genotype.recurrent[{i}] activation") for i, (a, _) in enumerate(pairs))
    out_preds = tuple(_index(j, f"genotype.recurrent[{i}] predecessor", i) for i, (_, j) in enumerate(pairs))
    if not concat:
        raise ValueError("genotype.concat: expected at least one state index, got none")
    out_concat = tuple(_index(k, f"genotype.concat[{q}]", n) for q, k in enumerate(concat))
    return PathCode(out_preds, out_acts, out_concat)


def _concat_states(S: torch.Tensor, ts: int, concat: Sequence[int]) -> torch.Tensor:
    """S[concat, ts] (len(concat), B, H): a slice when concat is an ascending range, else a gather."""
    a = concat[0]
    if list(concat) == list(range(a, a + len(concat))):
        return S[a:a + len(concat), ts]
    return S[list(concat), ts]


def rnn_path_ref(xs: torch.Tensor, h0: torch.Tensor, W0: torch.Tensor, Ws: Sequence[torch.Tensor], genotype,
                 x_mask: Optional[torch.Tensor] = None, h_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hiddens (T, B, H) in plain PyTorch ops, written from the cell's semantics (the source of truth; the
    double backward of the fused sequence differentiates this)."""
    code = path_code(genotype, len(Ws))
    H = h0.shape[-1]
    h, outs = h0, []
    for t in range(xs.shape[0]):
        x = xs[t] if x_mask is None else xs[t] * x_mask
        hm = h if h_mask is None else h * h_mask
        c0, g0 = torch.split(torch.cat([x, hm], -1) @ W0, H, dim=-1)
        states = [h + torch.sigmoid(c0) * (torch.tanh(g0) - h)]
        for i, (j, a) in enumerate(zip(code.preds, code.acts)):
            p = states[j]
            c, g = torch.split((p if h_mask is None else p * h_mask) @ Ws[i], H, dim=-1)
            states.append(p + torch.sigmoid(c) * (_ACT_FNS[a](g) - p))
        h = torch.stack([states[k] for k in code.concat]).mean(0)
        outs.append(h)
    return torch.stack(outs)


def rnn_path_forward_impl(kern, xs, h0, x_mask, h_mask, W0, Ws, code: PathCode, save: bool) -> List[torch.Tensor]:
    """The loops of csrc/rnn_path.cpp in Python, around a backend's step kernels (the Triton backend's path; the
    C++ one is the same algorithm). Returns [hiddens] or, with ``save``, [hiddens, xm, S, CH] as the C++ does."""
    T, B, I = xs.shape
    H = h0.shape[-1]
    n = len(Ws) + 1
    W0x, W0h = W0[:I], W0[I:]
    xm = xs * x_mask if x_mask is not None else xs
    XW = torch.mm(xm.reshape(T * B, I), W0x).view(T, B, 2 * H)  # input half of the first GEMM, all steps
    opts = dict(dtype=xs.dtype, device=xs.device)
    Ts = T if save else 1  # without save, one step's states, reused
    S = torch.empty(n, Ts, B, H, **opts)  # node outputs s_0 .. s_steps, node-major
    CH = torch.empty(n, Ts, B, 2 * H, **opts)  # their GEMM outputs [c | g]
    hm = h_mask.contiguous() if h_mask is not None else None
    M = torch.empty(n, B, H, **opts) if hm is not None else None  # s_k * m_h of this step
    out = torch.empty(T, B, H, **opts)
    h = h0.contiguous()
    for t in range(T):
        ts = t if save else 0
        ch0 = CH[0, ts]
        torch.addmm(XW[t], h if hm is None else h * hm, W0h, out=ch0)
        kern.rnn_path_step_forward(ch0, h, _TANH, hm, S[0, ts], None if M is None else M[0])
        for i, (j, a) in enumerate(zip(code.preds, code.acts)):
            ch = CH[i + 1, ts]
            torch.mm(S[j, ts] if M is None else M[j], Ws[i], out=ch)
            kern.rnn_path_step_forward(ch, S[j, ts], a, hm, S[i + 1, ts], None if M is None else M[i + 1])
        torch.mean(_concat_states(S, ts, code.concat), dim=0, out=out[t])
        h = out[t]
    return [out, xm, S, CH] if save else [out]


def rnn_path_backward_impl(kern, grad_out, xs, h0, hiddens, x_mask, h_mask, W0, Ws, code: PathCode,
                           saved) -> List[torch.Tensor]:
    """The backward of :func:`rnn_path_forward_impl`: [d xs, d h0, d W0, d Ws...]."""
    xm, S, CH = saved
    n, T, B, H = S.shape
    I = xm.shape[-1]
    W0x, W0h = W0[:I], W0[I:]
    hm = h_mask.contiguous() if h_mask is not None else None
    Wts = [w.t().contiguous() for w in Ws]
    W0ht = W0h.t().contiguous()
    GCH = torch.empty_like(CH)  # d CH, node-major as CH
    gS = torch.empty(n, B, H, dtype=S.dtype, device=S.device)  # d s_k of the step being walked
    g_h = torch.zeros(B, H, dtype=S.dtype, device=S.device)  # d h_t from step t + 1
    inv = 1.0 / len(code.concat)
    for t in reversed(range(T)):
        g_ht = grad_out[t] + g_h
        gS.zero_()
        for k in code.concat:  # a repeated index counts twice, as in the mean
            gS[k].add_(g_ht, alpha=inv)
        for i in reversed(range(len(Ws))):
            j = code.preds[i]
            gch = GCH[i + 1, t]
            kern.rnn_path_step_backward(gS[i + 1], CH[i + 1, t], S[j, t], code.acts[i], gch, gS[j], True)
            gm = torch.mm(gch, Wts[i])
            if hm is None:
                gS[j].add_(gm)
            else:
                gS[j].addcmul_(gm, hm)
        g0 = GCH[0, t]
        kern.rnn_path_step_backward(gS[0], CH[0, t], hiddens[t - 1] if t > 0 else h0.contiguous(), _TANH, g0, g_h,
                                    False)
        gm = torch.mm(g0, W0ht)
        if hm is None:
            g_h.add_(gm)
        else:
            g_h.addcmul_(gm, hm)
    G0 = GCH[0].view(T * B, 2 * H)
    HP = torch.cat([h0.unsqueeze(0), hiddens[:T - 1]], 0)  # h_{t-1} of every step
    if hm is not None:
        HP = HP * hm
    g_W0 = torch.cat([torch.mm(xm.reshape(T * B, I).t(), G0), torch.mm(HP.reshape(T * B, H).t(), G0)], 0)
    g_xs = torch.mm(G0, W0x.t()).view(T, B, I)
    if x_mask is not None:
        g_xs = g_xs * x_mask
    g_Ws = []
    for i, j in enumerate(code.preds):
        Mj = S[j] if hm is None else S[j] * hm
        g_Ws.append(torch.mm(Mj.reshape(T * B, H).t(), GCH[i + 1].view(T * B, 2 * H)))
    return [g_xs, g_h, g_W0] + g_Ws


class _Kernels(NamedTuple):
    """What an implementation of the fused sequence calls."""

    #: (xs, h0, x_mask, h_mask, W0, Ws, code, save) -> [hiddens] or [hiddens, xm, S, CH]
    forward: Callable
    #: (grad_out, xs, h0, hiddens, x_mask, h_mask, W0, Ws, code, saved) -> [d xs, d h0, d W0, *d Ws]
    backward: Callable


def _extension_kernels() -> _Kernels:
    """csrc/rnn_path.cpp: the loops in C++ (device-generic ATen GEMMs, the extension's step kernels)."""
    C = _ext.get()
    return _Kernels(
        lambda xs, h0, xm, hm, W0, Ws, code, save: C.rnn_path_forward(xs, h0, xm, hm, W0, list(Ws), code.preds,
                                                                       code.acts, code.concat, save),
        lambda g, xs, h0, out, xm, hm, W0, Ws, code, saved: C.rnn_path_backward(
            g, xs, h0, out, xm, hm, W0, list(Ws), code.preds, code.acts, code.concat, list(saved)))


def _triton_kernels() -> _Kernels:
    """The loops in Python around the Triton step kernels (kernels/rnn_path.py)."""
    from .._triton import kernel_module

    K = kernel_module("rnn_path")
    return _Kernels(functools.partial(rnn_path_forward_impl, K), functools.partial(rnn_path_backward_impl, K))


def _extension_needs(tensors) -> List[str]:
    C = _ext.load()
    if C is not None and not hasattr(C, "rnn_path_forward"):
        return ["this build of pynas._C predates rnn_path (rebuild it: pip install --no-build-isolation -e .)"]
    return []


TABLE = _dispatch.register("rnn_path", [
    _dispatch.reference("rnn_path"),
    _dispatch.extension("rnn_path", "cpu", loader=_extension_kernels, needs=_extension_needs),
    _dispatch.extension("rnn_path", "cuda", loader=_extension_kernels, needs=_extension_needs),
    _dispatch.triton("rnn_path", "rnn_path", loader=_triton_kernels),
])


class _RnnPathFunction(torch.autograd.Function):
    """forward(backend, code, xs (T,B,I), h0 (B,H), x_mask (B,I) | None, h_mask (B,H) | None, W0 (I+H, 2H),
    *Ws (H, 2H)) -> hiddens (T, B, H)."""

    @staticmethod
    def forward(ctx, backend, code, xs, h0, x_mask, h_mask, W0, *Ws):
        out, xm, S, CH = TABLE[backend].kernels().forward(xs, h0, x_mask, h_mask, W0, Ws, code, True)
        ctx.save_for_backward(xs, h0, x_mask, h_mask, W0, out, xm, S, CH, *Ws)
        ctx.backend, ctx.code = backend, code
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, h0, x_mask, h_mask, W0, out, xm, S, CH, *Ws = ctx.saved_tensors
        code = ctx.code
        if torch.is_grad_enabled():  # create_graph=True: differentiate the functional reference (exact)
            needs = ctx.needs_input_grad
            g = _autodiff.grad_through(lambda xs_, h0_, W0_, *Ws_: rnn_path_ref(xs_, h0_, W0_, Ws_, code, x_mask,
                                                                                 h_mask),
                                       (xs, h0, W0, *Ws), (needs[2], needs[3], *needs[6:]), grad_out)
        else:
            g = TABLE[ctx.backend].kernels().backward(grad_out.contiguous(), xs, h0, out, x_mask, h_mask, W0, Ws,
                                                      code, (xm, S, CH))
        g_xs, g_h0, g_W0, *g_Ws = g
        return (None, None, g_xs, g_h0, None, None, g_W0, *g_Ws)


def _check_args(xs, h0, W0, Ws, x_mask, h_mask) -> None:
    """rnn_path's inputs, named: xs (T, B, I), h0 (B, H), W0 (I + H, 2H), Ws (H, 2H) each, the masks (B, I) and
    (B, H) or both None; one floating dtype and device."""
    for name, t in (("xs", xs), ("h0", h0), ("W0", W0)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if xs.dim() != 3 or min(xs.shape) < 1:
        raise ValueError(f"xs: expected shape (T, B, I) with T, B, I >= 1, got {tuple(xs.shape)}")
    if not xs.is_floating_point():
        raise TypeError(f"xs: expected a floating dtype, got {xs.dtype}")
    T, B, I = xs.shape
    if h0.dim() != 2 or h0.shape[0] != B or h0.shape[1] < 1:
        raise ValueError(f"h0: expected shape (B, H) with B = {B}, got {tuple(h0.shape)}")
    H = h0.shape[1]
    named = [("h0", h0, (B, H)), ("W0", W0, (I + H, 2 * H))]
    if not Ws:
        raise ValueError("Ws: expected at least one node weight, got none")
    for i, w in enumerate(Ws):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"Ws[{i}]: expected a tensor, got {type(w).__name__}")
        named.append((f"Ws[{i}]", w, (H, 2 * H)))
    if (x_mask is None) != (h_mask is None):
        raise ValueError(f"x_mask, h_mask: expected both (training) or neither (eval), got only "
                         f"{'x_mask' if h_mask is None else 'h_mask'}")
    for name, m, shape in (("x_mask", x_mask, (B, I)), ("h_mask", h_mask, (B, H))):
        if m is not None:
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor or None, got {type(m).__name__}")
            named.append((name, m, shape))
    for name, t, shape in named:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != xs.dtype or t.device != xs.device:
            raise TypeError(f"{name}: expected the dtype and device of xs ({xs.dtype}, {xs.device}), got "
                            f"({t.dtype}, {t.device})")


def rnn_path(xs: torch.Tensor, h0: torch.Tensor, W0: torch.Tensor, Ws: Sequence[torch.Tensor], genotype,
             x_mask: Optional[torch.Tensor] = None, h_mask: Optional[torch.Tensor] = None, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """The hiddens (T, B, H) of the evaluation cell of ``genotype`` over ``xs`` (see the module docstring);
    differentiable w.r.t. ``xs``, ``h0``, ``W0`` and every ``Ws[i]``. Masks: both (training) or neither (eval)."""
    Ws = list(Ws)
    code = path_code(genotype, len(Ws) if Ws else None)
    _check_args(xs, h0, W0, Ws, x_mask, h_mask)
    return _rnn_path(xs, h0, W0, Ws, code, x_mask, h_mask, TABLE.resolve([xs, h0, W0], backend))


def _rnn_path(xs, h0, W0, Ws, code: PathCode, x_mask, h_mask, impl: _dispatch.Implementation) -> torch.Tensor:
    """rnn_path on checked inputs through ``impl`` (a caller that has resolved the backend already)."""
    if impl.backend == "reference" or torch.compiler.is_compiling() or _autodiff.under_transform():
        return rnn_path_ref(xs, h0, W0, Ws, code, x_mask, h_mask)
    xs, h0 = xs.contiguous(), h0.contiguous()
    x_mask = x_mask.contiguous() if x_mask is not None else None
    h_mask = h_mask.contiguous() if h_mask is not None else None
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (xs, h0, W0, *Ws))):
        # no graph to record: the forward alone, keeping one step's states instead of the sequence's
        return impl.kernels().forward(xs, h0, x_mask, h_mask, W0, Ws, code, False)[0]
    return _RnnPathFunction.apply(impl.backend, code, xs, h0, x_mask, h_mask, W0, *Ws)


def rnn_path_cell(cell, inputs: torch.Tensor, h0: torch.Tensor, x_mask: Optional[torch.Tensor],
                  h_mask: Optional[torch.Tensor], impl: _dispatch.Implementation) -> torch.Tensor:
    """The hiddens (T, B, H) of ``cell`` (a :class:`~pynas.rnn.DARTSCell`, its genotype as it is now) over
    ``inputs`` (T, B, I), through ``impl`` (from :data:`TABLE`). A genotype with fewer nodes than the cell has
    weights uses the first ones, as the module path does."""
    steps = len(cell.genotype.recurrent)
    if steps > len(cell._Ws):
        raise ValueError(f"genotype: expected at most {len(cell._Ws)} nodes (the cell's weights), got {steps}")
    Ws = [cell._Ws[i] for i in range(steps)]
    return _rnn_path(inputs, h0, cell._W0, Ws, path_code(cell.genotype, steps), x_mask, h_mask, impl)
