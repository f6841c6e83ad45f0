"""The fused DARTS CNN edge: a whole MixedOp as one autograd node.

For an edge with input x (N, C, H, W), stride s and softmax weights w over its candidates::

    out = w_max * BN(maxpool(x)) + w_avg * BN(avgpool(x)) + w_skip * skip(x)
          + sum_{sep, dil} w_k * BN(conv_k(x))            ('none' takes its share of w, never computed)

The four conv candidates read ReLU(x) once (``cnn_edge_dw_forward`` runs all their first depthwise convs
in one pass over each (n, c) plane); the 1x1 convs gather the BatchNorm statistics of their output in
the pass that produces it (``cnn_edge_pw_forward``; on GPUs they are cuBLAS matmuls); the second depthwise
conv of a sep_conv normalises and rectifies its input as it reads it, so BN(p1) and its ReLU are never
stored; ``cnn_edge_mix_forward`` computes the pools, their BatchNorm statistics, every candidate's final
BatchNorm and the weighted sum, storing no candidate output. Backward skips every weight gradient when
no parameter needs one (the finite-difference passes of the second-order step).

Saved for backward per edge: x, and per sep_conv its u1, p1, u2, p2 (depthwise and 1x1 conv outputs),
per dil_conv its u, p, for a FactorizedReduce its p. The pools, every ReLU and every BatchNorm output
are recomputed in backward. The reference saves about 28 activations per edge; this saves 12.

BatchNorm running statistics (and ``num_batches_tracked``) are updated exactly as the modules would.
The module's parameters are used in place, so the state_dict is the reference one.

Backends: 'cpu' (C++, float32/float64), 'cuda' and 'triton' (GPU; Triton also on the CPU under
TRITON_INTERPRET=1), each a :class:`_Kernels` of the same functions, chosen by the op's :data:`TABLE`. :func:`fusable` says when an
edge runs fused: training-mode BatchNorms with a momentum, known candidates. Anything else runs the
modules one by one (the reference path).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _autodiff, _ext
from .._triton import kernel_module
from . import _dispatch
from ._checks import check_cnn_edge_args
from ._conv1x1 import conv1x1, conv1x1_backward

_PRE_RELU = 1
_PRE_NORM_RELU = 2
_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class ConvSpec:
    """One conv candidate of an edge: kind 'sep', 'dil' or 'fr' (FactorizedReduce), its column in the
    edge's weights, and (sep, dil) its depthwise conv's kernel, padding and dilation."""

    kind: str
    column: int
    k: int = 1
    pad: int = 0
    dil: int = 1

    @property
    def n_params(self) -> int:
        return 4 if self.kind == "sep" else 2


@dataclass(frozen=True)
class EdgeSpec:
    """Everything the fused kernels need to know about a MixedOp, as plain data (a string for custom ops).

    Columns are -1 for absent candidates. The parameters of the convs follow ``convs`` in order (sep:
    dw1, pw1, dw2, pw2; dil: dw, pw; fr: conv_1, conv_2); the BatchNorms are the max pool's and the avg
    pool's (when present), then per conv its BNs (sep: 2, others: 1).
    """

    stride: int
    max_column: int
    avg_column: int
    skip_column: int
    convs: Tuple[ConvSpec, ...]
    eps: float
    momentum: float

    def encode(self) -> str:
        convs = ",".join(f"{c.kind}:{c.column}:{c.k}:{c.pad}:{c.dil}" for c in self.convs)
        return (f"s={self.stride};max={self.max_column};avg={self.avg_column};skip={self.skip_column};"
                f"convs={convs};eps={self.eps!r};momentum={self.momentum!r}")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def decode(text: str) -> "EdgeSpec":
        f = dict(item.split("=", 1) for item in text.split(";"))
        convs = []
        for c in filter(None, f["convs"].split(",")):
            kind, col, k, pad, dil = c.split(":")
            convs.append(ConvSpec(kind, int(col), int(k), int(pad), int(dil)))
        return EdgeSpec(int(f["s"]), int(f["max"]), int(f["avg"]), int(f["skip"]), tuple(convs),
                        float(f["eps"]), float(f["momentum"]))

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """Columns of the weights in the order cnn_edge_mix_forward takes them: max, avg, skip, convs."""
        cols = [self.max_column, self.avg_column, self.skip_column] + [c.column for c in self.convs]
        return torch.tensor([max(c, 0) for c in cols], dtype=torch.long)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`index` on ``device``, copied there once (no copy per call)."""
        if device.type == "cpu":
            return self.index
        cache = self.__dict__.setdefault("_index_by_device", {})
        if device not in cache:
            cache[device] = self.index.to(device)
        return cache[device]

    @functools.cached_property
    def conv_args(self) -> Tuple[List[int], List[int], List[int]]:
        """(kinds, pads, dils) of the convs as the one-call kernels take them (kind 0 sep, 1 dil, 2 fr)."""
        kinds = [{"sep": 0, "dil": 1, "fr": 2}[c.kind] for c in self.convs]
        return kinds, [c.pad for c in self.convs], [c.dil for c in self.convs]

    @functools.cached_property
    def dw_convs(self) -> Tuple[ConvSpec, ...]:
        return tuple(c for c in self.convs if c.kind != "fr")

    def out_shape(self, x_shape) -> Tuple[int, int, int, int]:
        n, c, h, w = x_shape
        return (n, c, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1)


class Plan(Protocol):
    """What the fused edge needs of a MixedOp: its :class:`EdgeSpec` and the tensors behind it. A search
    space builds one per MixedOp from its modules (the DARTS CNN space: :class:`pynas.cnn.edge_plan.EdgePlan`)."""

    spec: EdgeSpec
    encoded: str  # spec.encode(), kept
    supported: bool  # the modules are what the kernels implement (known candidates, BatchNorms without affine)

    def ready(self) -> bool:
        """Every BatchNorm in training mode with the spec's momentum and eps, now."""

    def params(self) -> List[torch.Tensor]:
        """The conv weights, in the order of ``spec.convs``."""

    def running(self) -> List[torch.Tensor]:
        """running_mean, running_var of every BatchNorm, in spec order."""

    def counters(self) -> List[torch.Tensor]:
        """num_batches_tracked of every BatchNorm, in spec order."""


class BatchNormPlan:
    """What a :class:`Plan` over BatchNorm modules shares (``spec`` and ``bns``, the BatchNorms in spec order, set by
    the subclass): :meth:`ready`, :meth:`running` and :meth:`counters` read the modules at each call."""

    spec: EdgeSpec
    bns: List[torch.nn.BatchNorm2d]

    def ready(self) -> bool:
        """Every BatchNorm in training mode with the spec's momentum and eps (what the kernels implement)."""
        for b in self.bns:
            if not b.training or b.momentum != self.spec.momentum or b.eps != self.spec.eps:
                return False
        return True

    def running(self) -> List[torch.Tensor]:
        """running_mean, running_var of every BatchNorm, in spec order (read from the modules' registered buffers at
        each call: a buffer assigned anew is taken; no module attribute lookup, which costs microseconds each)."""
        out = []
        for b in self.bns:
            buffers = b._buffers
            out += [buffers["running_mean"], buffers["running_var"]]
        return out

    def counters(self) -> List[torch.Tensor]:
        return [b._buffers["num_batches_tracked"] for b in self.bns]


def _plan_fusable(plan: Plan) -> bool:
    """Whether the edge's modules are what the kernels implement, as they are now (training-mode BatchNorms with
    the spec's momentum and eps), outside torch.func transforms and forward AD (the modules compose with them)."""
    if not plan.supported or not plan.ready():
        return False
    return torch.compiler.is_compiling() or not _autodiff.under_transform()


def fusable(plan: Plan, x: torch.Tensor, backend: str = "cpu") -> bool:
    """Whether ``backend`` runs this edge fused for input ``x`` (else the modules run one by one)."""
    impl = TABLE.implementations.get(backend)
    return backend != "reference" and impl is not None and _plan_fusable(plan) and not impl.not_supported_reasons([x])


def choose(plan: Plan, x: torch.Tensor, weights: torch.Tensor) -> Optional[_dispatch.Implementation]:
    """The implementation that runs this call fused under the backend in force, or None (the modules)."""
    if not _plan_fusable(plan):
        return None
    impl = TABLE.resolve([x, weights], strict=False)
    return None if impl is None or impl.backend == "reference" else impl


def _fr_inputs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.relu(x[:, :, ::2, ::2]), torch.relu(x[:, :, 1::2, 1::2])


def _pw(k, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """1x1 conv of u (N, Ci, H, W) with w (Co, Ci, 1, 1)."""
    return k.pw_forward(u, w, False, 1.0, 0.0, None, None)[0]


def cnn_edge_forward_impl(spec: EdgeSpec, k, x: torch.Tensor, weights: torch.Tensor, params: Sequence[torch.Tensor],
                      running: Sequence[torch.Tensor], counters: Sequence[torch.Tensor]):
    """The forward: returns (out, wr, mean, rstd, ps, saved); updates running statistics and counters."""
    if k.edge_forward is not None:
        return k.edge_forward(x, weights, list(params), list(running), list(counters), spec.index_on(weights.device),
                              spec.stride, spec.max_column >= 0, spec.avg_column >= 0, spec.skip_column >= 0,
                              *spec.conv_args, spec.eps, spec.momentum)
    x = x.contiguous()
    wr = weights.detach().index_select(0, spec.index_on(weights.device))
    at, firsts = 0, []
    starts = []
    for c in spec.convs:
        starts.append(at)
        if c.kind != "fr":
            firsts.append(params[at])
        at += c.n_params
    dws = spec.dw_convs
    us = k.dw_forward(x, firsts, [spec.stride] * len(dws), [c.pad for c in dws], [c.dil for c in dws],
                           _PRE_RELU, _EMPTY, _EMPTY) if firsts else []
    ps, saved = [], []
    # running = (mean, var) per BatchNorm: the pools' first, then per conv its own (sep: 2, others: 1)
    pairs = [(running[i], running[i + 1]) for i in range(0, len(running), 2)]
    pools = [pairs.pop(0) if col >= 0 else (None, None) for col in (spec.max_column, spec.avg_column)]
    finals = []
    d = 0
    for c, at in zip(spec.convs, starts):
        if c.kind == "fr":
            a, b = _fr_inputs(x)
            ps.append(torch.cat([_pw(k, params[at], a), _pw(k, params[at + 1], b)], 1))
        elif c.kind == "dil":
            u = us[d]
            d += 1
            ps.append(_pw(k, params[at + 1], u))
            saved.append(u)
        else:
            u1 = us[d]
            d += 1
            rm, rv = pairs.pop(0)
            p1, m1, r1 = k.pw_forward(u1, params[at + 1], True, spec.eps, spec.momentum, rm, rv)
            u2 = k.dw_forward(p1, [params[at + 2]], [1], [c.pad], [1], _PRE_NORM_RELU, m1, r1)[0]
            ps.append(_pw(k, params[at + 3], u2))
            saved += [u1, p1, m1, r1, u2]
        finals.append(pairs.pop(0))
    rms = [p[0] for p in pools + finals]
    rvs = [p[1] for p in pools + finals]
    out, mean, rstd = k.mix_forward(x, ps, wr, spec.stride, spec.max_column >= 0, spec.avg_column >= 0,
                                         spec.skip_column >= 0, spec.eps, spec.momentum, rms, rvs)
    if counters:
        torch._foreach_add_(list(counters), 1)
    return out, wr, mean, rstd, ps, saved


def cnn_edge_backward_impl(spec: EdgeSpec, k, g: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                       wr: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, params: Sequence[torch.Tensor],
                       ps: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], need_w: bool):
    """The backward: returns (grad_x, grad_weights, grad_params (None each when not need_w))."""
    if k.edge_backward is not None:
        return k.edge_backward(g, x, weights, wr, mean, rstd, list(params), list(ps), list(saved),
                               spec.index_on(weights.device), spec.stride, spec.max_column >= 0,
                               spec.avg_column >= 0, spec.skip_column >= 0, *spec.conv_args, need_w)
    g = g.contiguous()
    x = x.contiguous()
    gx_mix, gps, gwr = k.mix_backward(g, x, list(ps), wr, spec.stride, spec.max_column >= 0,
                                           spec.avg_column >= 0, spec.skip_column >= 0, mean, rstd)
    gparams: List[Optional[torch.Tensor]] = [None] * len(params)
    first_at, first_gs, fr = [], [], []
    at, s = 0, 0
    for c, gp in zip(spec.convs, gps):
        if c.kind == "fr":
            fr.append((at, gp))
        elif c.kind == "dil":
            gu, gparams[at + 1] = k.pw_backward(gp, saved[s], params[at + 1], need_w)
            s += 1
            first_at.append(at)
            first_gs.append(gu)
        else:
            u1, p1, m1, r1, u2 = saved[s: s + 5]
            s += 5
            gu2, gparams[at + 3] = k.pw_backward(gp, u2, params[at + 3], need_w)
            ga, gdw2, sums = k.dw_backward(p1, [params[at + 2]], [gu2], [1], [c.pad], [1], _PRE_NORM_RELU,
                                                m1, r1, need_grad_w=need_w)
            if need_w:
                gparams[at + 2] = gdw2[0]
            gp1 = k.bn_backward(ga, p1, m1, r1, sums)
            gu1, gparams[at + 1] = k.pw_backward(gp1, u1, params[at + 1], need_w)
            first_at.append(at)
            first_gs.append(gu1)
        at += c.n_params
    gx = gx_mix
    if first_at:
        dws = spec.dw_convs
        gx_conv, gfirst, _ = k.dw_backward(x, [params[a] for a in first_at], first_gs, [spec.stride] * len(dws),
                                                [c.pad for c in dws], [c.dil for c in dws], _PRE_RELU, _EMPTY,
                                                _EMPTY, need_grad_w=need_w)
        if need_w:
            for a, gw in zip(first_at, gfirst):
                gparams[a] = gw
        gx = gx_conv if gx is None else gx.add_(gx_conv)
    for a, gp in fr:
        if gx is None:
            gx = torch.zeros_like(x)
        xa, xb = _fr_inputs(x)
        half = gp.shape[1] // 2
        ga, gparams[a] = k.pw_backward(gp[:, :half].contiguous(), xa, params[a], need_w)
        gb, gparams[a + 1] = k.pw_backward(gp[:, half:].contiguous(), xb, params[a + 1], need_w)
        gx[:, :, ::2, ::2] += ga * (xa > 0)
        gx[:, :, 1::2, 1::2] += gb * (xb > 0)
    gweights = torch.zeros_like(weights).index_add_(0, spec.index_on(weights.device), gwr.to(weights.dtype))
    return gx, gweights, gparams


def cnn_edge_ref(spec: EdgeSpec, x: torch.Tensor, weights: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fused edge's output in plain PyTorch ops (the modules' math, functionally): batch-statistics
    BatchNorm that leaves the running statistics alone. The double backward of the fused edge
    differentiates this."""
    c_in = x.shape[1]

    def bn(t):
        return F.batch_norm(t, None, None, training=True, eps=spec.eps)

    terms = []
    if spec.max_column >= 0:
        terms.append(weights[spec.max_column] * bn(F.max_pool2d(x, 3, spec.stride, 1)))
    if spec.avg_column >= 0:
        terms.append(weights[spec.avg_column] * bn(F.avg_pool2d(x, 3, spec.stride, 1, count_include_pad=False)))
    if spec.skip_column >= 0:
        terms.append(weights[spec.skip_column] * x)
    at = 0
    r = torch.relu(x)
    for c in spec.convs:
        if c.kind == "fr":
            y = torch.cat([F.conv2d(r, params[at], stride=2), F.conv2d(r[:, :, 1:, 1:], params[at + 1], stride=2)], 1)
        else:
            y = F.conv2d(r, params[at], stride=spec.stride, padding=c.pad, dilation=c.dil, groups=c_in)
            y = F.conv2d(y, params[at + 1])
            if c.kind == "sep":
                y = torch.relu(bn(y))
                y = F.conv2d(F.conv2d(y, params[at + 2], padding=c.pad, groups=c_in), params[at + 3])
        terms.append(weights[c.column] * bn(y))
        at += c.n_params
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


class _Kernels(NamedTuple):
    """What an implementation of the fused edge calls (the API of the C++ kernels in csrc/cpu/cnn_edge.cpp)."""

    dw_forward: Callable
    dw_backward: Callable
    bn_stats: Callable
    bn_backward: Callable
    mix_forward: Callable
    mix_backward: Callable
    pw_forward: Callable
    pw_backward: Callable
    #: The whole forward / backward in one call (the C++ extension's ``cnn_edge_forward`` / ``cnn_edge_backward``:
    #: the calls above in the same order), or None: then :func:`cnn_edge_forward_impl` and
    #: :func:`cnn_edge_backward_impl` make the calls from Python.
    edge_forward: Optional[Callable] = None
    edge_backward: Optional[Callable] = None


def _pw_forward_matmul(bn_stats, u, w, stats, eps, momentum, running_mean, running_var):
    """The 1x1 conv through a batched matmul, then (with ``stats``) its output's BatchNorm statistics."""
    p = conv1x1(u, w)
    if not stats:
        return p, None, None
    mean, rstd = bn_stats(p, eps, momentum, running_mean, running_var)
    return p, mean, rstd


def _module_kernels(m, matmul_pw: bool) -> _Kernels:
    pw_forward = functools.partial(_pw_forward_matmul, m.cnn_edge_bn_stats) if matmul_pw else m.cnn_edge_pw_forward
    pw_backward = conv1x1_backward if matmul_pw else m.cnn_edge_pw_backward
    whole = not matmul_pw and hasattr(m, "cnn_edge_forward")  # the CPU extension (not an older build)
    return _Kernels(m.cnn_edge_dw_forward, m.cnn_edge_dw_backward, m.cnn_edge_bn_stats, m.cnn_edge_bn_backward,
                    m.cnn_edge_mix_forward, m.cnn_edge_mix_backward, pw_forward, pw_backward,
                    m.cnn_edge_forward if whole else None, m.cnn_edge_backward if whole else None)


def _needs_4d(tensors: Sequence[torch.Tensor]) -> List[str]:
    x = tensors[0]
    return [] if x.dim() == 4 else [f"x: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}"]


def _triton_needs(tensors: Sequence[torch.Tensor]) -> List[str]:
    x = tensors[0]
    if x.device.type == "cpu" and x.dtype not in _dispatch.WIDE_FLOATS:
        return [f"dtype {x.dtype} is not supported by backend 'triton' on CPU tensors (float32, float64)"]
    return _needs_4d(tensors)


_LAYOUT = "x 4-D (N, C, H, W), made contiguous"
#: The 1x1 convs: the C++ kernels on the CPU (with the BatchNorm statistics in the same pass), cuBLAS on a GPU.
TABLE = _dispatch.register("cnn_edge", [
    _dispatch.reference("cnn_edge"),
    _dispatch.extension("cnn_edge", "cpu", _dispatch.WIDE_FLOATS, lambda: _module_kernels(_ext.get(), False),
                        _LAYOUT, _needs_4d),
    _dispatch.extension("cnn_edge", "cuda", _dispatch.FLOATS, lambda: _module_kernels(_ext.get(), True),
                        _LAYOUT, _needs_4d),
    _dispatch.triton("cnn_edge", "cnn_edge", _dispatch.FLOATS, lambda: _module_kernels(kernel_module("cnn_edge"), False),
                     _LAYOUT + "; on CPU tensors float32, float64 only", _triton_needs),
])


def _kernels(backend: str) -> _Kernels:
    return TABLE[backend].kernels()


class _CnnEdgeFunction(torch.autograd.Function):
    """The eager path: one autograd node per edge, the saved tensors those of the docstring above."""

    @staticmethod
    def forward(ctx, plan: Plan, backend: str, x: torch.Tensor, weights: torch.Tensor, *params: torch.Tensor):
        spec = plan.spec
        out, wr, mean, rstd, ps, saved = cnn_edge_forward_impl(spec, _kernels(backend), x, weights, params,
                                                           plan.running(), plan.counters())
        ctx.spec = spec
        ctx.backend = backend
        ctx.n = (len(params), len(ps))
        ctx.save_for_backward(x, weights, wr, mean, rstd, *params, *ps, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, wr, mean, rstd, *rest = ctx.saved_tensors
        n_params, n_ps = ctx.n
        params, ps, saved = rest[:n_params], rest[n_params:n_params + n_ps], rest[n_params + n_ps:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the functional reference (exact)
            spec = ctx.spec
            return (None, None, *_autodiff.grad_through(lambda x_, w_, *p_: cnn_edge_ref(spec, x_, w_, p_),
                                                        (x, weights, *params), ctx.needs_input_grad[2:], grad_out))
        need_w = any(ctx.needs_input_grad[4:])
        gx, gweights, gparams = cnn_edge_backward_impl(ctx.spec, _kernels(ctx.backend), grad_out, x, weights, wr, mean,
                                                   rstd, params, ps, saved, need_w)
        return (None, None, gx if ctx.needs_input_grad[2] else None,
                gweights if ctx.needs_input_grad[3] else None, *gparams)


# ---- the custom ops: what torch.compile sees -------------------------------------------------------------


def _saved_shapes(spec: EdgeSpec, x: torch.Tensor):
    out = spec.out_shape(x.shape)
    c = x.shape[1]
    shapes = []
    for conv in spec.convs:
        if conv.kind == "dil":
            shapes.append(out)
        elif conv.kind == "sep":
            shapes += [out, out, (c,), (c,), out]
    return out, shapes


@torch.library.custom_op("pynas::cnn_edge", mutates_args=())
def _cnn_edge_op(x: torch.Tensor, weights: torch.Tensor, params: List[torch.Tensor], running: List[torch.Tensor],
                 spec: str, backend: str) -> List[torch.Tensor]:
    """[out, wr, mean, rstd, *ps, *saved, *new_running]: the fused edge's forward, what its backward needs,
    and the updated running statistics (functional: the caller copies them into the buffers)."""
    new_running = [r.clone() for r in running]
    out, wr, mean, rstd, ps, saved = cnn_edge_forward_impl(EdgeSpec.decode(spec), _kernels(backend), x, weights,
                                                       params, new_running, ())
    return [out, wr, mean, rstd, *ps, *saved, *new_running]


@_cnn_edge_op.register_fake
def _(x, weights, params, running, spec, backend):
    sp = EdgeSpec.decode(spec)
    out, shapes = _saved_shapes(sp, x)
    j = 2 + len(sp.convs)
    return ([x.new_empty(out), weights.new_empty(3 + len(sp.convs)), x.new_empty(j, x.shape[1]),
             x.new_empty(j, x.shape[1])] + [x.new_empty(out) for _ in sp.convs] + [x.new_empty(s) for s in shapes]
            + [torch.empty_like(r) for r in running])


@torch.library.custom_op("pynas::cnn_edge_backward", mutates_args=())
def _cnn_edge_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, extras: List[torch.Tensor],
                          params: List[torch.Tensor], spec: str, backend: str, need_w: bool) -> List[torch.Tensor]:
    """[grad_x, grad_weights, *grad_params] (grad_params empty when not need_w)."""
    sp = EdgeSpec.decode(spec)
    wr, mean, rstd = extras[:3]
    ps, saved = extras[3:3 + len(sp.convs)], extras[3 + len(sp.convs):]
    gx, gweights, gparams = cnn_edge_backward_impl(sp, _kernels(backend), grad_out, x, weights, wr, mean, rstd, params,
                                               ps, saved, need_w)
    return [gx, gweights] + (list(gparams) if need_w else [])


@_cnn_edge_backward_op.register_fake
def _(grad_out, x, weights, extras, params, spec, backend, need_w):
    return [torch.empty_like(x), torch.empty_like(weights)] + ([torch.empty_like(p) for p in params] if need_w else [])


def _setup_context(ctx, inputs, output):
    x, weights, params, running, spec, backend = inputs
    ctx.spec, ctx.backend, ctx.n_params, ctx.n_running = spec, backend, len(params), len(running)
    ctx.save_for_backward(x, weights, *params, *output[1:len(output) - len(running)])


def _backward(ctx, grads):
    x, weights, *rest = ctx.saved_tensors
    params, extras = rest[:ctx.n_params], rest[ctx.n_params:]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the functional reference (exact)
        spec = EdgeSpec.decode(ctx.spec)
        g = _autodiff.grad_through(lambda x_, w_, *p_: cnn_edge_ref(spec, x_, w_, p_), (x, weights, *params),
                                   [t.requires_grad for t in (x, weights, *params)], grads[0])
        return g[0], g[1], g[2:], [None] * ctx.n_running, None, None
    need_w = bool(ctx.needs_input_grad[2])
    res = torch.ops.pynas.cnn_edge_backward(grads[0], x, weights, list(extras), list(params), ctx.spec, ctx.backend,
                                            need_w)
    gparams = list(res[2:]) if need_w else [None] * ctx.n_params
    return res[0], res[1], gparams, [None] * ctx.n_running, None, None


torch.library.register_autograd("pynas::cnn_edge", _backward, setup_context=_setup_context)


def cnn_edge(plan: Plan, x: torch.Tensor, weights: torch.Tensor, backend: str = "cpu") -> torch.Tensor:
    """The MixedOp's output through the fused kernels (call only when :func:`fusable`)."""
    params = plan.params()
    check_cnn_edge_args(x, params, any(c.kind == "fr" for c in plan.spec.convs) and plan.spec.stride == 2)
    if torch.compiler.is_compiling():
        running = plan.running()
        res = torch.ops.pynas.cnn_edge(x, weights, params, running, plan.encoded, backend)
        with torch.no_grad():
            torch._foreach_copy_(running, res[len(res) - len(running):])
            torch._foreach_add_(plan.counters(), 1)
        return res[0]
    return _CnnEdgeFunction.apply(plan, backend, x, weights, *params)
