"""A DARTS supernet written the way ports of the original code write it, for :func:`pynas.accelerate` to take
over: the benchmark ``cnn_search_foreign`` (``pynas bench``) and the README's example.

Its mixed op is not pynas's: a ``ModuleList`` named ``ops`` over plain-PyTorch candidates (the modules of
:mod:`pynas.cnn.operations`, which compute through no pynas kernel) in another order than DARTS's, 'none'
last, and the original code's forward, ``sum(w * op(x) for w, op in zip(weights, self.ops))``. The cells,
stem and classifier are DARTS's (:class:`pynas.cnn.Network`'s, plain PyTorch as well).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..cnn import Network
from ..cnn.operations import OPS

#: The candidates in this port's column order ('none' last).
PORT_PRIMITIVES = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "max_pool_3x3", "avg_pool_3x3",
                   "skip_connect", "none"]


class PortMixedOp(nn.Module):
    """``forward(x, weights) = sum_k weights[k] * op_k(x)``, every candidate computed ('none' included)."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PORT_PRIMITIVES):
        super().__init__()
        self.ops = nn.ModuleList()
        for name in primitives:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class PortNetwork(Network):
    """The DARTS CNN supernet over :class:`PortMixedOp` edges (``Network``'s constructor and arch tensors, the
    alphas' columns in :data:`PORT_PRIMITIVES` order)."""

    def __init__(self, C, num_classes, layers, criterion=None, steps=4, multiplier=4, stem_multiplier=3,
                 primitives: Sequence[str] = PORT_PRIMITIVES):
        super().__init__(C, num_classes, layers, criterion, steps, multiplier, stem_multiplier, primitives)

    def _make_op(self, C: int, stride: int) -> nn.Module:
        return PortMixedOp(C, stride, self._primitives)
