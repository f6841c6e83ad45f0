"""The DARTS CNN space's plan of a MixedOp for the fused edge (:mod:`pynas.ops.cnn_edge`): which candidate
sits in which weight column, the conv shapes, and the module tensors the kernels read and update in place.

The plan reads the modules of :mod:`pynas.cnn.operations` by their class and layer positions; a MixedOp with
anything else (an affine BatchNorm, an unknown candidate, a conv the kernels do not take) gets
``supported = False`` and runs module by module.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..ops.cnn_edge import BatchNormPlan, ConvSpec, EdgeSpec
from .operations import DilConv, FactorizedReduce, Identity, SepConv


class EdgePlan(BatchNormPlan):
    """A MixedOp's :class:`EdgeSpec` and the modules behind it, built once from the MixedOp."""

    def __init__(self, mixed_op: nn.Module, primitives: Sequence[str], stride: int):
        self.max_bn: Optional[nn.BatchNorm2d] = None
        self.avg_bn: Optional[nn.BatchNorm2d] = None
        cols = {"max": -1, "avg": -1, "skip": -1}
        convs: List[ConvSpec] = []
        self.conv_modules: List[nn.Module] = []
        ok = True
        for k, name in enumerate(primitives):
            op = mixed_op._ops[k]
            if name == "none":
                continue
            if name == "max_pool_3x3":
                cols["max"], self.max_bn = k, op[1]
            elif name == "avg_pool_3x3":
                cols["avg"], self.avg_bn = k, op[1]
            elif name == "skip_connect" and isinstance(op, Identity):
                cols["skip"] = k
            elif name == "skip_connect" and isinstance(op, FactorizedReduce):
                convs.append(ConvSpec("fr", k))
                self.conv_modules.append(op)
            elif isinstance(op, (SepConv, DilConv)):
                dw = op.op[1]
                ok = ok and dw.stride == (stride, stride) and dw.padding[0] == dw.padding[1] \
                    and dw.dilation[0] == dw.dilation[1] and dw.kernel_size[0] == dw.kernel_size[1] \
                    and dw.kernel_size[0] <= 9
                convs.append(ConvSpec("sep" if isinstance(op, SepConv) else "dil", k, dw.kernel_size[0],
                                      dw.padding[0], dw.dilation[0]))
                self.conv_modules.append(op)
            else:
                ok = False
        self.bns: List[nn.BatchNorm2d] = [b for b in (self.max_bn, self.avg_bn) if b is not None]
        for c, m in zip(convs, self.conv_modules):
            self.bns += [m.bn] if c.kind == "fr" else ([m.op[3], m.op[7]] if c.kind == "sep" else [m.op[3]])
        self.supported = ok and all(not b.affine and b.track_running_stats for b in self.bns)
        first = self.bns[0] if self.bns else None
        self.spec = EdgeSpec(stride, cols["max"], cols["avg"], cols["skip"], tuple(convs),
                             float(first.eps) if first else 1e-5,
                             float(first.momentum) if first and first.momentum is not None else 0.1)
        self.encoded = self.spec.encode()

    @property
    def _weight_owners(self) -> List[nn.Module]:
        """The conv modules whose weights :meth:`params` returns, in its order (found once: indexing Sequentials and
        module attribute lookups cost tens of microseconds per edge call). Cached by hand, not with
        functools.cached_property, whose lock torch.compile cannot trace."""
        owners = self.__dict__.get("_owners")
        if owners is None:
            owners = []
            for c, m in zip(self.spec.convs, self.conv_modules):
                if c.kind == "fr":
                    owners += [m.conv_1, m.conv_2]
                elif c.kind == "sep":
                    owners += [m.op[1], m.op[2], m.op[5], m.op[6]]
                else:
                    owners += [m.op[1], m.op[2]]
            self.__dict__["_owners"] = owners
        return owners

    def params(self) -> List[torch.Tensor]:
        # each module's registered weight, read at every call (a weight assigned anew is taken)
        return [m._parameters["weight"] for m in self._weight_owners]
