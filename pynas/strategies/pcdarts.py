"""PC-DARTS (Xu et al., ICLR 2020; ``yuhuixu1993/PC-DARTS``): partial channel connections and edge normalisation.

Partial channels: on an edge with input x (C channels) only the first C/K channels go through the candidates
(built for C/K channels); the other channels bypass them, unchanged, or through a fixed 2x2 max pool on the
reduction cell's stride-2 edges; the two parts are concatenated and channel-shuffled with K groups, so the
processed channels land at 0, K, 2K, ... (:func:`channel_shuffle`). Edge normalisation: a second arch tensor
per cell type, ``betas`` (one logit per edge); node i is ``sum_j softmax_j(betas of node i)[j] * edge_j`` (the
edge weight scales the whole edge output, bypass included). The genotype ranks the edges of a node by
``softmax(alpha) * beta~`` and keeps two, with DARTS's rule (:func:`pynas.cnn.genotypes.parse_cell`).

Training as in the code's ``train_search.py``: batch 256, SGD lr 0.1 (cosine to 0), momentum 0.9, wd 3e-4,
50 epochs, the first 15 (``warmup_epochs``) without architecture steps, Adam lr 6e-4 with betas (0.5, 0.999)
and wd 1e-3 over alphas and betas together, first order by default (the second-order step applies unchanged).
The valid batch comes from a persistent iterator (the README's and ``V100_python1.0``'s choice; the first code
drew ``next(iter(valid_queue))`` each step).

The fused path: the inner mixed sum is the fused edge (:mod:`pynas.ops.cnn_edge`) at C/K channels, and the
bypass, its pool and the shuffle are one pass (:mod:`pynas.ops.partial_channel`) where that op runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _autodiff
from ..cnn import MixedOp, Network
from ..cnn.genotypes import Genotype, cells, parse_cell
from ..cnn.model_search import CellWeights
from ..cnn.operations import PRIMITIVES
from ..ops.partial_channel import partial_channel, partial_channel_ref
from .base import node_blocks, node_softmax
from .darts import DARTSMethod


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) viewed as (N, groups, C / groups, H, W), the two channel axes swapped, flattened back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class PartialMixedOp(MixedOp):
    """A PC-DARTS edge: a :class:`MixedOp` over C/K channels (its candidates are this module's ``_ops``, as in the
    code) plus the bypass (``mp``: the 2x2 max pool of stride-2 edges) and the shuffle."""

    def __init__(self, C: int, stride: int, k: int = 4, primitives: Sequence[str] = PRIMITIVES):
        if not isinstance(k, int) or k < 1 or C % k:
            raise ValueError(f"partial_channels: expected a divisor of the edge's {C} channels, got {k!r}")
        super().__init__(C // k, stride, primitives)
        self.mp = nn.MaxPool2d(2, 2)
        self.k = k
        self._channels = C

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self._channels:
            raise ValueError(f"x: expected (N, {self._channels}, H, W), got {tuple(x.shape)}")
        if self._stride == 2 and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"x: a stride-2 partial-channel edge needs an even height and width, got "
                             f"{tuple(x.shape)}")
        t = super().forward(x[:, :self._channels // self.k], weights)
        if not _autodiff.under_transform():
            return partial_channel(t, x, self.k, self._stride)  # the op's table picks the backend in force
        return partial_channel_ref(t, x, self.k, self._stride)


class PCDARTSNetwork(Network):
    """The DARTS CNN supernet with PC-DARTS's partial-channel edges (``partial_channels`` = K) and edge
    normalisation (``betas_normal``, ``betas_reduce``: arch tensors outside the state_dict, like the alphas)."""

    def __init__(self, *args, partial_channels: int = 4, **kwargs):
        object.__setattr__(self, "_k", int(partial_channels))  # read by _make_op while the cells are built
        super().__init__(*args, **kwargs)

    def _method_kwargs(self) -> dict:
        return {"partial_channels": self._k}

    def _make_op(self, C: int, stride: int) -> nn.Module:
        return PartialMixedOp(C, stride, self._k, self._primitives)

    def _initialize_alphas(self):
        super()._initialize_alphas()
        k = sum(2 + i for i in range(self._steps))
        self.betas_normal = (1e-3 * torch.randn(k)).requires_grad_(True)
        self.betas_reduce = (1e-3 * torch.randn(k)).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce]

    def edge_weights(self):
        """(normal, reduce): the normalised edge weights beta~ (each node's betas under one softmax)."""
        sizes = node_blocks(self._steps, 2)
        return node_softmax(self.betas_normal, sizes), node_softmax(self.betas_reduce, sizes)

    def cell_weights(self):
        b_normal, b_reduce = self.edge_weights()
        return (CellWeights(F.softmax(self.alphas_normal, dim=-1), edge_scale=b_normal),
                CellWeights(F.softmax(self.alphas_reduce, dim=-1), edge_scale=b_reduce))

    def genotype(self) -> Genotype:
        with torch.no_grad():
            genes = [parse_cell(F.softmax(a.detach(), dim=-1) * b[:, None], self._steps, self._primitives)
                     for a, b in zip((self.alphas_normal, self.alphas_reduce), self.edge_weights())]
        return cells(genes[0], genes[1], self._steps, self._multiplier)


class PCDARTSMethod(DARTSMethod):
    """PC-DARTS on the CNN space: DARTS's steps on :class:`PCDARTSNetwork`, with its warm-up and defaults."""

    name = "pcdarts"
    DEFAULTS = dict(batch_size=256, learning_rate=0.1, learning_rate_min=0.0, arch_learning_rate=6e-4,
                    arch_weight_decay=1e-3, weight_decay=3e-4, epochs=50, warmup_epochs=15)

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.partial_channels < 2:
            raise ValueError(f"partial_channels: expected at least 2 (K = 1 bypasses nothing: use --method darts), "
                             f"got {cfg.partial_channels}")
        if cfg.init_channels % cfg.partial_channels:
            raise ValueError(f"partial_channels: expected a divisor of init_channels ({cfg.init_channels}), got "
                             f"{cfg.partial_channels}")

    def network_class(self):
        return PCDARTSNetwork

    def network_kwargs(self) -> dict:
        return {"partial_channels": self.cfg.partial_channels}
