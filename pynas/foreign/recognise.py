"""Recognising another codebase's DARTS candidates by what their layers are, and the fused edge's plan over them.

A candidate module is read as the sequence of its leaf layers in registration order (``nn.Sequential``s,
wrapper classes and attribute names do not matter) and matched against the shapes the fused edge
(:mod:`pynas.ops.cnn_edge`) computes:

=====================  ==========================================================================================
max / avg pool         ``MaxPool2d(3, s, 1)`` or ``AvgPool2d(3, s, 1, count_include_pad=False)``, then a BatchNorm
skip (stride 1)        no layer, ``nn.Identity``, or a parameterless module whose output is its input (probe)
zero ('none')          a parameterless module whose output is zeros of the strided shape (probe)
factorized reduce      ReLU, two 1x1 stride-2 convs of C/2 outputs each, BatchNorm(C)
dil conv               ReLU, depthwise k x k conv (stride s, padding d(k-1)/2, dilation d), 1x1 conv, BatchNorm
sep conv               the dil conv with dilation 1, then ReLU, depthwise k x k (stride 1), 1x1 conv, BatchNorm
=====================  ==========================================================================================

Every conv bias-free with zero padding mode, C channels in and out; every BatchNorm ``BatchNorm2d(C)`` without
affine parameters, tracking running statistics with a momentum (the search BatchNorms of DARTS). What a layer
list means is only a hypothesis here: :mod:`pynas.foreign.accelerate` proves it on a probe input before anything
runs fused. Nothing here copies a tensor: the plan reads the modules' own parameters and buffers at each call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops.cnn_edge import BatchNormPlan, ConvSpec, EdgeSpec

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
#: Parameterless layers that are never a candidate's whole computation on their own (read by their type).
_KNOWN_LEAVES = (nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


@dataclass
class Candidate:
    """One candidate of a mixed op as recognised: ``kind`` is 'max', 'avg', 'skip', 'zero', 'fr', 'sep', 'dil' or
    None (not a shape the fused edge computes: ``reason`` says why), with the modules the plan reads."""

    index: int
    key: str  # its name in the container (the index for a ModuleList)
    module: nn.Module
    kind: Optional[str] = None
    reason: Optional[str] = None
    stride: Optional[int] = None
    channels: Optional[int] = None
    conv: Optional[ConvSpec] = None
    weights: List[nn.Conv2d] = field(default_factory=list)  # the convs, in the ConvSpec's parameter order
    bns: List[nn.BatchNorm2d] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The candidate's DARTS name ('sep_conv_3x3', 'none', ...), or '?' when not recognised."""
        if self.kind is None:
            return "?"
        if self.kind in ("max", "avg"):
            return f"{self.kind}_pool_3x3"
        if self.kind == "zero":
            return "none"
        if self.kind == "skip":
            return "skip_connect"
        if self.kind == "fr":
            return "skip_connect (factorized reduce)"
        k, d = self.conv.k, self.conv.dil
        if self.kind == "sep":
            return f"sep_conv_{k}x{k}"
        return f"dil_conv_{k}x{k}" + ("" if d == 2 else f" (dilation {d})")


def leaves(module: nn.Module) -> List[nn.Module]:
    """The module's leaf layers in registration order (the module itself when it has no children)."""
    out = [m for m in module.modules() if not any(True for _ in m.children())]
    return out


def _type_list(layers: Sequence[nn.Module]) -> str:
    return ", ".join(type(m).__name__ for m in layers) or "no layer"


def _bn_reason(bn: nn.Module, c: Optional[int]) -> Optional[str]:
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} where the fused edge takes a BatchNorm2d"
    if bn.affine:
        return "an affine BatchNorm (the fused edge implements DARTS's search BatchNorms, affine=False)"
    if not bn.track_running_stats or bn.momentum is None:
        return "a BatchNorm without running statistics or with a cumulative average (momentum=None)"
    if c is not None and bn.num_features != c:
        return f"a BatchNorm over {bn.num_features} channels where the edge has {c}"
    return None


def _plain_conv(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} where the fused edge takes a Conv2d"
    if conv.bias is not None:
        return "a convolution with a bias"
    if conv.padding_mode != "zeros":
        return f"a convolution with padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"a convolution with padding={conv.padding!r}"
    return None


def _square(t) -> Optional[int]:
    return t[0] if t[0] == t[1] else None


def _depthwise(conv: nn.Conv2d, stride: Optional[int]) -> Tuple[Optional[str], int, int, int, int]:
    """(reason, k, stride, pad, dilation) of a depthwise conv the kernels take."""
    why = _plain_conv(conv)
    if why:
        return why, 0, 0, 0, 0
    c = conv.in_channels
    if conv.groups != c or conv.out_channels != c:
        return (f"a {conv.kernel_size[0]}x{conv.kernel_size[1]} convolution with groups={conv.groups} over {c} "
                f"channels (the fused edge takes depthwise ones)"), 0, 0, 0, 0
    k, s, p, d = (_square(conv.kernel_size), _square(conv.stride), _square(conv.padding), _square(conv.dilation))
    if None in (k, s, p, d):
        return "a depthwise convolution with a non-square kernel, stride, padding or dilation", 0, 0, 0, 0
    if k % 2 == 0 or k > 9:
        return f"a {k}x{k} depthwise convolution (the fused edge takes odd kernels up to 9x9)", 0, 0, 0, 0
    if p != d * (k - 1) // 2:
        return (f"a {k}x{k} depthwise convolution with padding {p} at dilation {d} (the fused edge keeps the size: "
                f"padding {d * (k - 1) // 2})"), 0, 0, 0, 0
    if s not in (1, 2) or (stride is not None and s != stride):
        return f"a depthwise convolution of stride {s} where the edge has stride {stride}", 0, 0, 0, 0
    return None, k, s, p, d


def _pointwise(conv: nn.Conv2d, c: int, stride: int = 1, out: Optional[int] = None) -> Optional[str]:
    why = _plain_conv(conv)
    if why:
        return why
    out = c if out is None else out
    if (tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (stride, stride) or tuple(conv.padding) != (0, 0)
            or conv.groups != 1 or conv.in_channels != c or conv.out_channels != out):
        return (f"a convolution {conv.in_channels}->{conv.out_channels} with kernel {tuple(conv.kernel_size)}, "
                f"stride {tuple(conv.stride)}, padding {tuple(conv.padding)}, groups {conv.groups} where a 1x1 "
                f"stride-{stride} {c}->{out} convolution belongs")
    return None


def _relu_reason(m: nn.Module) -> Optional[str]:
    if type(m) is not nn.ReLU:
        return f"{type(m).__name__} where the fused edge applies a ReLU"
    return None


def classify(index: int, key: str, module: nn.Module) -> Candidate:
    """What ``module`` is as a candidate, from its layers alone (a parameterless opaque module is left for the
    probe: kind 'opaque')."""
    cand = Candidate(index, key, module)
    layers = leaves(module)
    types = [type(m) for m in layers]
    if not layers or types == [nn.Identity]:
        cand.kind, cand.stride = "skip", 1
        return cand
    if len(layers) == 1 and not isinstance(layers[0], _KNOWN_LEAVES):
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            cand.reason = f"{type(layers[0]).__name__}: a layer pynas does not know"
        else:
            cand.kind = "opaque"  # identity or zero: the probe decides
        return cand
    if types[0] in _POOLS:
        return _pool(cand, layers)
    if types[0] is nn.ReLU and len(layers) == 4 and types[1] is nn.Conv2d and types[2] is nn.Conv2d \
            and tuple(layers[1].stride) == (2, 2) and tuple(layers[1].kernel_size) == (1, 1):
        return _factorized(cand, layers)
    if types[0] is nn.ReLU and len(layers) in (4, 8):
        return _dw_chain(cand, layers)
    cand.reason = f"layers [{_type_list(layers)}]: not a candidate shape the fused edge computes"
    return cand


def _pool(cand: Candidate, layers) -> Candidate:
    pool = layers[0]
    if len(layers) != 2:
        cand.reason = (f"layers [{_type_list(layers)}]: the fused edge normalises every pool with one BatchNorm"
                       if len(layers) == 1 else f"layers [{_type_list(layers)}]: a pool then more than a BatchNorm")
        return cand
    k, s, p = (pool.kernel_size, pool.stride, pool.padding)
    k, s, p = [(v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p)]
    if k != (3, 3) or p != (1, 1) or s[0] != s[1] or s[0] not in (1, 2) or pool.ceil_mode:
        cand.reason = (f"a {type(pool).__name__} with kernel {k}, stride {s}, padding {p}, ceil_mode "
                       f"{pool.ceil_mode} (the fused edge pools 3x3, padding 1, stride 1 or 2)")
        return cand
    if isinstance(pool, nn.MaxPool2d):
        if _square(pool.dilation if isinstance(pool.dilation, tuple) else (pool.dilation, pool.dilation)) != 1 \
                or pool.return_indices:
            cand.reason = "a MaxPool2d with dilation or return_indices"
            return cand
        cand.kind = "max"
    else:
        if pool.count_include_pad or pool.divisor_override is not None:
            cand.reason = ("an AvgPool2d that counts the padding (the fused edge's average excludes it, DARTS's "
                           "count_include_pad=False)")
            return cand
        cand.kind = "avg"
    why = _bn_reason(layers[1], None)
    if why:
        cand.kind, cand.reason = None, why
        return cand
    cand.stride, cand.channels, cand.bns = s[0], layers[1].num_features, [layers[1]]
    return cand


def _factorized(cand: Candidate, layers) -> Candidate:
    relu, a, b, bn = layers
    c = a.in_channels
    half = a.out_channels
    why = _relu_reason(relu) or _pointwise(a, c, 2, half) or _pointwise(b, c, 2, half) or _bn_reason(bn, c)
    if why is None and 2 * half != c:
        why = f"a factorized reduce {c}->{2 * half} channels (the fused edge keeps the channel count)"
    if why:
        cand.reason = why
        return cand
    cand.kind, cand.stride, cand.channels = "fr", 2, c
    cand.weights, cand.bns = [a, b], [bn]
    return cand


def _dw_chain(cand: Candidate, layers) -> Candidate:
    """ReLU, dw, pw, BN (dil) or that twice with the second unstrided and undilated (sep)."""
    relu, dw, pw, bn = layers[:4]
    why = _relu_reason(relu)
    if why is None and not isinstance(dw, nn.Conv2d):
        why = f"{type(dw).__name__} after the ReLU"
    if why is None:
        why, k, s, p, d = _depthwise(dw, None)
    if why is None:
        c = dw.in_channels
        why = _pointwise(pw, c) or _bn_reason(bn, c)
    if why is None and len(layers) == 8:
        relu2, dw2, pw2, bn2 = layers[4:]
        why = _relu_reason(relu2)
        if why is None and d != 1:
            why = f"a separable convolution with dilation {d} (the fused edge's sep conv is undilated)"
        if why is None:
            why2, k2, s2, p2, d2 = _depthwise(dw2, 1)
            why = why2 or (None if (k2, p2, d2) == (k, p, 1) and dw2.in_channels == c else
                           "a separable convolution whose two depthwise convolutions differ in kernel or padding")
        if why is None:
            why = _pointwise(pw2, c) or _bn_reason(bn2, c)
    if why:
        cand.reason = why
        return cand
    cand.stride, cand.channels = s, c
    if len(layers) == 8:
        cand.kind, cand.conv = "sep", ConvSpec("sep", cand.index, k, p, 1)
        cand.weights, cand.bns = [dw, pw, layers[5], layers[6]], [bn, layers[7]]
    else:
        cand.kind, cand.conv = "dil", ConvSpec("dil", cand.index, k, p, d)
        cand.weights, cand.bns = [dw, pw], [bn]
    return cand


class ForeignPlan(BatchNormPlan):
    """The fused edge's plan (:class:`pynas.ops.cnn_edge.Plan`) over recognised candidates: the spec, and the
    candidates' own convs and BatchNorms, read at each call (so ``.to()``, ``load_state_dict`` and optimizers that
    replace nothing keep working)."""

    def __init__(self, cands: Sequence[Candidate], stride: int):
        cols = {"max": -1, "avg": -1, "skip": -1}
        convs, self._convs, pool_bns, conv_bns = [], [], [], []
        for c in cands:
            if c.kind in cols:
                cols[c.kind] = c.index
                pool_bns += c.bns
            elif c.kind in ("sep", "dil", "fr"):
                convs.append(c.conv if c.kind != "fr" else ConvSpec("fr", c.index))
                self._convs += c.weights
                conv_bns += c.bns
        self.bns: List[nn.BatchNorm2d] = pool_bns + conv_bns
        first = self.bns[0] if self.bns else None
        self.spec = EdgeSpec(stride, cols["max"], cols["avg"], cols["skip"], tuple(convs),
                             float(first.eps) if first else 1e-5,
                             float(first.momentum) if first is not None else 0.1)
        self.encoded = self.spec.encode()
        self.supported = all(b.eps == self.spec.eps and b.momentum == self.spec.momentum for b in self.bns)

    def params(self) -> List[torch.Tensor]:
        return [m.weight for m in self._convs]
