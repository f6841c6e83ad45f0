"""DARTS-style supernets written the ways public DARTS code writes them, for pynas.accelerate to take over.

None of these uses a pynas class: each is its own MixedOp, cell and network, as a port or successor of DARTS
defines them (the original code's forward(x, weights); 'none' last and extra candidates; candidates as bare
nn.Sequentials or as wrapper classes with other attribute names; a ModuleDict of named candidates; alphas as
nn.Parameters in the network, or held by the mixed layer itself; PC-DARTS's partial-channel edge; candidates
pynas does not know; forwards that do more than the weighted sum).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---- candidate building blocks, written as the codebases write them ----------------------------------------


class Nothing(nn.Module):
    """'none' as a codebase of its own writes it."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return torch.zeros_like(x)
        return torch.zeros_like(x[:, :, ::self.stride, ::self.stride])


class Same(nn.Module):
    def forward(self, x):
        return x


class Halve(nn.Module):
    """FactorizedReduce with other attribute names."""

    def __init__(self, c):
        super().__init__()
        self.act = nn.ReLU(inplace=False)
        self.left = nn.Conv2d(c, c // 2, 1, stride=2, bias=False)
        self.right = nn.Conv2d(c, c // 2, 1, stride=2, bias=False)
        self.norm = nn.BatchNorm2d(c, affine=False)

    def forward(self, x):
        x = self.act(x)
        return self.norm(torch.cat([self.left(x), self.right(x[:, :, 1:, 1:])], dim=1))


def sep_seq(c, k, stride, affine=False):
    """A bare Sequential sep conv (DARTS's SepConv without the class)."""
    p = k // 2
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c, affine=affine),
        nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c, affine=affine))


def dil_seq(c, k, stride, d=2, affine=False):
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, d * (k - 1) // 2, dilation=d, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=affine))


class DilBlock(nn.Module):
    """NNI-style DilConv: one attribute ``net``."""

    def __init__(self, c, k, stride, pad, dil):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, pad, dilation=dil, groups=c, bias=False),
                                 nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))

    def forward(self, x):
        return self.net(x)


class SepBlock(nn.Module):
    """NNI-style SepConv: two DilBlocks, the second unstrided."""

    def __init__(self, c, k, stride):
        super().__init__()
        self.first = DilBlock(c, k, stride, k // 2, 1)
        self.second = DilBlock(c, k, 1, k // 2, 1)

    def forward(self, x):
        return self.second(self.first(x))


class PoolBN(nn.Module):
    def __init__(self, kind, c, stride):
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        self.bn = nn.BatchNorm2d(c, affine=False)

    def forward(self, x):
        return self.bn(self.pool(x))


class StdConv(nn.Module):
    """A full k x k ReLU-conv-BN: not a candidate the fused edge computes."""

    def __init__(self, c, k, stride):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, k // 2, bias=False), nn.BatchNorm2d(c, affine=False))

    def forward(self, x):
        return self.op(x)


def skip_op(c, stride):
    return Same() if stride == 1 else Halve(c)


def pool_seq(kind, c, stride):
    pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    return nn.Sequential(pool, nn.BatchNorm2d(c, affine=False))


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


# ---- mixed ops ---------------------------------------------------------------------------------------------


class ReorderedMixedOp(nn.Module):
    """The original code's forward(x, weights), candidates in another order with 'none' last."""

    NAMES = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "max_pool_3x3", "avg_pool_3x3",
             "skip_connect", "none"]

    def __init__(self, c, stride):
        super().__init__()
        self.ops = nn.ModuleList([sep_seq(c, 3, stride), sep_seq(c, 5, stride), dil_seq(c, 3, stride),
                                  dil_seq(c, 5, stride), pool_seq("max", c, stride), pool_seq("avg", c, stride),
                                  skip_op(c, stride), Nothing(stride)])

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class OwnAlphaChoice(nn.Module):
    """A mixed layer that owns its alpha (NNI's LayerChoice style): a ModuleDict of named candidates, an extra
    candidate (sep_conv_7x7), wrapper classes."""

    def __init__(self, c, stride):
        super().__init__()
        self.candidates = nn.ModuleDict({
            "maxpool": PoolBN("max", c, stride), "avgpool": PoolBN("avg", c, stride),
            "skipconnect": skip_op(c, stride), "sepconv3x3": SepBlock(c, 3, stride),
            "sepconv7x7": SepBlock(c, 7, stride), "dilconv3x3": DilBlock(c, 3, stride, 2, 2),
        })
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self.candidates)))

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        out = 0
        for i, op in enumerate(self.candidates.values()):
            out = out + w[i] * op(x)
        return out


class PartialMixedOp(nn.Module):
    """PC-DARTS's MixedOp: the candidates on 1/k of the channels, the rest bypassed, shuffled."""

    def __init__(self, c, stride, k=4):
        super().__init__()
        self.k = k
        self.mp = nn.MaxPool2d(2, 2)
        self._ops = nn.ModuleList()
        for kind in ("none", "max", "avg", "skip", "sep3", "sep5", "dil3", "dil5"):
            cc = c // k
            op = {"none": lambda: Nothing(stride), "max": lambda: pool_seq("max", cc, stride),
                  "avg": lambda: pool_seq("avg", cc, stride), "skip": lambda: skip_op(cc, stride),
                  "sep3": lambda: sep_seq(cc, 3, stride), "sep5": lambda: sep_seq(cc, 5, stride),
                  "dil3": lambda: dil_seq(cc, 3, stride), "dil5": lambda: dil_seq(cc, 5, stride)}[kind]()
            self._ops.append(op)

    def forward(self, x, weights):
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        return channel_shuffle(ans, self.k)


class UnknownOpMixedOp(ReorderedMixedOp):
    """A candidate pynas does not know (a full 3x3 conv) among known ones."""

    def __init__(self, c, stride):
        super().__init__(c, stride)
        self.ops.append(StdConv(c, 3, stride))


class AffineMixedOp(ReorderedMixedOp):
    """Search BatchNorms with affine parameters (some successors' choice)."""

    def __init__(self, c, stride):
        super().__init__(c, stride)
        self.ops[0] = sep_seq(c, 3, stride, affine=True)


class ScaledMixedOp(ReorderedMixedOp):
    """A forward that does more than the weighted sum: an extra learned per-edge factor."""

    def __init__(self, c, stride):
        super().__init__(c, stride)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x, weights):
        return self.gain * sum(w * op(x) for w, op in zip(weights, self.ops))


class BranchingMixedOp(ReorderedMixedOp):
    """GDAS-style: unselected candidates (weight 0) are skipped and contribute the weight itself."""

    def forward(self, x, weights):
        return sum(op(x) * w if w > 0 else w for w, op in zip(weights, self.ops))


# ---- cells and networks ------------------------------------------------------------------------------------


class Preprocess(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=False))

    def forward(self, x):
        return self.op(x)


class ReducePre(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.relu = nn.ReLU()
        self.a = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.b = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=False)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.a(x), self.b(x[:, :, 1:, 1:])], 1))


class SearchCell(nn.Module):
    """A DARTS cell over any mixed op: ``make(c, stride)``; ``own_alpha``: the mixed ops hold their weights;
    ``betas``: PC-DARTS's edge normalisation (weights per edge passed in)."""

    def __init__(self, steps, mult, c_pp, c_p, c, reduction, reduction_prev, make, own_alpha=False):
        super().__init__()
        self.reduction = reduction
        self.pre0 = ReducePre(c_pp, c) if reduction_prev else Preprocess(c_pp, c)
        self.pre1 = Preprocess(c_p, c)
        self.steps, self.mult, self.own_alpha = steps, mult, own_alpha
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                self.edges.append(make(c, 2 if reduction and j < 2 else 1))

    def forward(self, s0, s1, weights=None, betas=None):
        states = [self.pre0(s0), self.pre1(s1)]
        off = 0
        for _ in range(self.steps):
            terms = []
            for j, h in enumerate(states):
                e = self.edges[off + j]
                y = e(h) if self.own_alpha else e(h, weights[off + j])
                terms.append(y if betas is None else betas[off + j] * y)
            off += len(states)
            states.append(sum(terms))
        return torch.cat(states[-self.mult:], dim=1)


class SuperNet(nn.Module):
    """A DARTS supernet: stem, cells (reductions at 1/3 and 2/3), classifier. ``alphas`` are nn.Parameters of the
    network (unless the mixed ops own theirs); ``betas``: PC-DARTS's edge normalisation."""

    def __init__(self, make, n_ops, c=4, layers=3, classes=5, steps=2, mult=2, own_alpha=False, betas=False):
        super().__init__()
        self.steps, self.own_alpha, self.use_betas = steps, own_alpha, betas
        cc = 3 * c
        self.stem = nn.Sequential(nn.Conv2d(3, cc, 3, padding=1, bias=False), nn.BatchNorm2d(cc))
        c_pp, c_p, cur = cc, cc, c
        self.cells = nn.ModuleList()
        red_prev = False
        for i in range(layers):
            red = i in (layers // 3, 2 * layers // 3)
            if red:
                cur *= 2
            self.cells.append(SearchCell(steps, mult, c_pp, c_p, cur, red, red_prev, make, own_alpha))
            red_prev = red
            c_pp, c_p = c_p, mult * cur
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_p, classes)
        k = sum(2 + i for i in range(steps))
        if not own_alpha:
            self.alpha_normal = nn.Parameter(1e-3 * torch.randn(k, n_ops))
            self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(k, n_ops))
        if betas:
            self.beta_normal = nn.Parameter(1e-3 * torch.randn(k))
            self.beta_reduce = nn.Parameter(1e-3 * torch.randn(k))

    def arch_parameters(self):
        if self.own_alpha:
            return [m.alpha for m in self.modules() if isinstance(m, OwnAlphaChoice)]
        out = [self.alpha_normal, self.alpha_reduce]
        return out + ([self.beta_normal, self.beta_reduce] if self.use_betas else [])

    def _betas(self, b):
        parts, at = [], 0
        for i in range(self.steps):
            parts.append(F.softmax(b[at:at + 2 + i], dim=-1))
            at += 2 + i
        return torch.cat(parts)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            w = b = None
            if not self.own_alpha:
                w = F.softmax(self.alpha_reduce if cell.reduction else self.alpha_normal, dim=-1)
            if self.use_betas:
                b = self._betas(self.beta_reduce if cell.reduction else self.beta_normal)
            s0, s1 = s1, cell(s0, s1, w, b)
        return self.head(self.gap(s1).flatten(1))


def reordered(**kw):
    return SuperNet(ReorderedMixedOp, 8, **kw)


def own_alpha(**kw):
    return SuperNet(OwnAlphaChoice, 6, own_alpha=True, **kw)


def partial(**kw):
    kw.setdefault("c", 8)
    return SuperNet(PartialMixedOp, 8, betas=True, **kw)


def with_unknown(**kw):
    return SuperNet(UnknownOpMixedOp, 9, **kw)


def affine(**kw):
    return SuperNet(AffineMixedOp, 8, **kw)


def scaled(**kw):
    return SuperNet(ScaledMixedOp, 8, **kw)


def branching(**kw):
    return SuperNet(BranchingMixedOp, 8, **kw)
