"""The fused DARTS CNN edge: a whole MixedOp as one autograd node.

For an edge with input x (N, C, H, W), stride s and softmax weights w over its candidates::

    out = w_max * BN(maxpool(x)) + w_avg * BN(avgpool(x)) + w_skip * skip(x)
          + sum_{sep, dil} w_k * BN(conv_k(x))            ('none' takes its share of w, never computed)

The four conv candidates read ReLU(x) once (``edge_dw_forward`` runs all their first depthwise convs
in one pass over each (n, c) plane); the 1x1 convs are batched matmuls; the second depthwise conv of a
sep_conv normalises and rectifies its input as it reads it, so BN(p1) and its ReLU are never stored;
``edge_mix_forward`` computes the pools, their BatchNorm statistics, every candidate's final
BatchNorm and the weighted sum in two passes over x, storing no candidate output.

Saved for backward per edge: x, and per sep_conv its u1, p1, u2, p2 (depthwise and 1x1 conv outputs),
per dil_conv its u, p, for a FactorizedReduce its p. The pools, every ReLU and every BatchNorm output
are recomputed in backward. The reference saves about 28 activations per edge; this saves 12.

BatchNorm running statistics (and ``num_batches_tracked``) are updated exactly as the modules would.
The module's parameters are used in place, so the state_dict is the reference one.

The fused path serves CPU float32/float64 in training mode through the C++ kernels ('cpu' backend);
:func:`fusable` says when. Anything else runs the modules one by one (the reference path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _ext

_PRE_RELU = 1
_PRE_NORM_RELU = 2
_EMPTY = torch.empty(0)


@dataclass
class _Conv:
    """One conv candidate of an edge (sep_conv, dil_conv or FactorizedReduce) and where it lives."""

    kind: str  # "sep", "dil", "fr"
    column: int  # its column in the edge's weights
    module: nn.Module
    first: int = -1  # index among the edge's first depthwise convs (sep, dil)


class EdgePlan:
    """What the fused kernels need to know about one MixedOp, built once from its modules."""

    def __init__(self, mixed_op: nn.Module, primitives: Sequence[str], stride: int):
        from .operations import FactorizedReduce, Identity

        self.stride = stride
        self.max_bn: Optional[nn.BatchNorm2d] = None
        self.avg_bn: Optional[nn.BatchNorm2d] = None
        self.skip_column = -1
        self.max_column = self.avg_column = -1
        self.convs: List[_Conv] = []
        self.bns: List[nn.BatchNorm2d] = []
        ok = True
        firsts = 0
        for k, name in enumerate(primitives):
            op = mixed_op._ops[k]
            if name == "none":
                continue
            if name == "max_pool_3x3":
                self.max_column, self.max_bn = k, op[1]
            elif name == "avg_pool_3x3":
                self.avg_column, self.avg_bn = k, op[1]
            elif name == "skip_connect":
                if isinstance(op, Identity):
                    self.skip_column = k
                elif isinstance(op, FactorizedReduce):
                    self.convs.append(_Conv("fr", k, op))
                else:
                    ok = False
            elif name.startswith("sep_conv_"):
                self.convs.append(_Conv("sep", k, op, firsts))
                firsts += 1
            elif name.startswith("dil_conv_"):
                self.convs.append(_Conv("dil", k, op, firsts))
                firsts += 1
            else:
                ok = False
        # the order edge_mix_forward takes the candidates in: max, avg, skip, then the convs
        cols = [self.max_column, self.avg_column, self.skip_column] + [c.column for c in self.convs]
        self.index = torch.tensor([max(c, 0) for c in cols], dtype=torch.long)
        self.strides: List[int] = []
        self.pads: List[int] = []
        self.dils: List[int] = []
        for c in self.convs:
            if c.kind == "fr":
                self.bns.append(c.module.bn)
                continue
            seq = c.module.op
            dw = seq[1]
            self.strides.append(dw.stride[0])
            self.pads.append(dw.padding[0])
            self.dils.append(dw.dilation[0])
            self.bns.extend([seq[3], seq[7]] if c.kind == "sep" else [seq[3]])
            ok = ok and dw.stride[0] == dw.stride[1] and dw.padding[0] == dw.padding[1]
        all_bns = [b for b in (self.max_bn, self.avg_bn) if b is not None] + self.bns
        self.all_bns = all_bns
        self.supported = ok and all(not b.affine for b in all_bns)

    def ready(self) -> bool:
        """True when every BatchNorm is in training mode with a momentum (what the kernels implement)."""
        first = self.all_bns[0] if self.all_bns else None
        for b in self.all_bns:
            if not b.training or b.momentum is None or b.momentum != first.momentum or b.eps != first.eps:
                return False
        return True


def fusable(plan: EdgePlan, x: torch.Tensor) -> bool:
    return (
        plan.supported
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and plan.ready()
    )


def _first_dw(c: _Conv) -> torch.Tensor:
    return c.module.op[1].weight


def _params(plan: EdgePlan) -> List[torch.Tensor]:
    """The edge's parameters in the order _EdgeFunction takes them."""
    out = []
    for c in plan.convs:
        if c.kind == "fr":
            out += [c.module.conv_1.weight, c.module.conv_2.weight]
        elif c.kind == "sep":
            seq = c.module.op
            out += [seq[1].weight, seq[2].weight, seq[5].weight, seq[6].weight]
        else:
            seq = c.module.op
            out += [seq[1].weight, seq[2].weight]
    return out


def _running(bn: Optional[nn.BatchNorm2d]):
    if bn is None or not bn.track_running_stats:
        return None, None
    return bn.running_mean, bn.running_var


def _pw(k, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """1x1 conv of u (N, Ci, H, W) with w (Co, Ci, 1, 1)."""
    return k.edge_pw_forward(u, w, False, 1.0, 0.0, None, None)[0]


def _pw_backward(k, w: torch.Tensor, u: torch.Tensor, gp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return k.edge_pw_backward(gp.contiguous(), u, w)


def _fr_inputs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.relu(x[:, :, ::2, ::2]), torch.relu(x[:, :, 1::2, 1::2])


class _EdgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: EdgePlan, x: torch.Tensor, weights: torch.Tensor, *params: torch.Tensor):
        k = _ext.get()
        x = x.contiguous()
        wr = weights.detach().index_select(0, plan.index)
        firsts = []
        i = 0
        layout = []  # per conv: index of its first parameter in params
        for c in plan.convs:
            layout.append(i)
            if c.kind != "fr":
                firsts.append(params[i])
            i += 2 if c.kind != "sep" else 4
        us = k.edge_dw_forward(x, firsts, plan.strides, plan.pads, plan.dils, _PRE_RELU, _EMPTY, _EMPTY) if firsts else []
        ps, saved = [], []
        bn_i = 0
        for c, at in zip(plan.convs, layout):
            if c.kind == "fr":
                if x.shape[2] % 2 or x.shape[3] % 2:
                    raise ValueError(
                        f"x: a stride-2 skip_connect (FactorizedReduce) needs an even height and width, got {tuple(x.shape)}")
                a, b = _fr_inputs(x)
                ps.append(torch.cat([_pw(k, params[at], a), _pw(k, params[at + 1], b)], 1))
                bn_i += 1
            elif c.kind == "dil":
                u = us[c.first]
                ps.append(_pw(k, params[at + 1], u))
                saved += [u]
                bn_i += 1
            else:
                u1 = us[c.first]
                bn = plan.bns[bn_i]
                rm, rv = _running(bn)
                p1, m1, r1 = k.edge_pw_forward(u1, params[at + 1], True, bn.eps, bn.momentum, rm, rv)
                u2 = k.edge_dw_forward(p1, [params[at + 2]], [1], [plan.pads[c.first]], [1], _PRE_NORM_RELU, m1, r1)[0]
                ps.append(_pw(k, params[at + 3], u2))
                saved += [u1, p1, m1, r1, u2]
                bn_i += 2
        final_bns = [plan.max_bn, plan.avg_bn]
        bn_i = 0
        for c in plan.convs:
            bn_i += 2 if c.kind == "sep" else 1
            final_bns.append(plan.bns[bn_i - 1])
        rms, rvs = zip(*[_running(b) for b in final_bns])
        ref_bn = next(b for b in final_bns if b is not None)
        out, mean, rstd = k.edge_mix_forward(
            x, ps, wr, plan.stride, plan.max_column >= 0, plan.avg_column >= 0, plan.skip_column >= 0,
            ref_bn.eps, ref_bn.momentum, list(rms), list(rvs))
        counters = [b.num_batches_tracked for b in plan.all_bns if b.track_running_stats]
        if counters:
            torch._foreach_add_(counters, 1)
        ctx.plan = plan
        ctx.layout = layout
        ctx.save_for_backward(x, weights, wr, mean, rstd, *params, *ps, *saved)
        ctx.n_params = len(params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        k = _ext.get()
        plan: EdgePlan = ctx.plan
        x, weights, wr, mean, rstd, *rest = ctx.saved_tensors
        params = rest[: ctx.n_params]
        ps = rest[ctx.n_params: ctx.n_params + len(plan.convs)]
        saved = rest[ctx.n_params + len(plan.convs):]
        g = grad_out.contiguous()
        gx_mix, gps, gwr = k.edge_mix_backward(
            g, x, list(ps), wr, plan.stride, plan.max_column >= 0, plan.avg_column >= 0, plan.skip_column >= 0,
            mean, rstd)
        gparams: List[Optional[torch.Tensor]] = [None] * len(params)
        firsts, first_gs = [], []
        fr_grads = []
        s = 0
        for c, at, gp in zip(plan.convs, ctx.layout, gps):
            if c.kind == "fr":
                fr_grads.append((at, gp))
            elif c.kind == "dil":
                u = saved[s]
                s += 1
                gu, gparams[at + 1] = _pw_backward(k, params[at + 1], u, gp)
                firsts.append(params[at])
                first_gs.append(gu)
            else:
                u1, p1, m1, r1, u2 = saved[s: s + 5]
                s += 5
                gu2, gparams[at + 3] = _pw_backward(k, params[at + 3], u2, gp)
                ga, (gdw2,), sums = k.edge_dw_backward(
                    p1, [params[at + 2]], [gu2], [1], [plan.pads[c.first]], [1], _PRE_NORM_RELU, m1, r1)
                gparams[at + 2] = gdw2
                gp1 = k.edge_bn_backward(ga, p1, m1, r1, sums)
                gu1, gparams[at + 1] = _pw_backward(k, params[at + 1], u1, gp1)
                firsts.append(params[at])
                first_gs.append(gu1)
        gx = gx_mix
        if firsts:
            gx_conv, gfirst, _ = k.edge_dw_backward(
                x, firsts, first_gs, plan.strides, plan.pads, plan.dils, _PRE_RELU, _EMPTY, _EMPTY)
            for c, at, gw in zip([c for c in plan.convs if c.kind != "fr"], [a for c, a in zip(plan.convs, ctx.layout) if c.kind != "fr"], gfirst):
                gparams[at] = gw
            gx = gx_conv if gx is None else gx.add_(gx_conv)
        for at, gp in fr_grads:
            if gx is None:
                gx = torch.zeros_like(x)
            a, b = _fr_inputs(x)
            half = gp.shape[1] // 2
            ga, gparams[at] = _pw_backward(k, params[at], a, gp[:, :half])
            gb, gparams[at + 1] = _pw_backward(k, params[at + 1], b, gp[:, half:])
            gx[:, :, ::2, ::2] += ga * (a > 0)
            gx[:, :, 1::2, 1::2] += gb * (b > 0)
        gweights = torch.zeros_like(weights).index_add_(0, plan.index, gwr.to(weights.dtype))
        return (None, gx, gweights, *gparams)


def edge_forward(plan: EdgePlan, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MixedOp's output through the fused kernels (call only when :func:`fusable`)."""
    params = _params(plan)
    for p in params:
        if p.dtype != x.dtype or p.device != x.device:
            raise TypeError(f"x: dtype {x.dtype} on {x.device} does not match the edge's parameters "
                            f"({p.dtype} on {p.device}); move the module with .to()")
    return _EdgeFunction.apply(plan, x, weights, *params)
