"""The DARTS CNN evaluation network: the cells of a genotype stacked and trained from scratch.

A cell of the derived network keeps two inputs per node, each through one operation of the genotype (with
affine BatchNorms, unlike the search), and sums them; its output concatenates the ``concat`` states. During
training, drop path zeroes the output of every operation that is not an identity with probability
``drop_path_prob`` per sample (scaling the kept ones by 1 / (1 - p)); the training loop ramps the probability
linearly over the epochs. An auxiliary classifier reads the output of the second reduction cell; its loss is
added to the main one with a weight (training only).

The convolutions of its separable and dilated convs run through :mod:`pynas.ops.sep_conv` (the fused edge's
kernels) under a backend other than ``reference``. Module names are the original evaluation code's (``stem``, ``cells.N.preprocess0/1``, ``cells.N._ops.K``,
``auxiliary_head``, ``global_pooling``, ``classifier``), so a state_dict moves between the two.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .genotypes import Genotype
from ..ops import sep_conv
from .operations import OPS, DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob``; scale the kept ones by 1 / (1 - drop_prob)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """One cell of the derived network: for node i, ``op(2i)(states[j(2i)]) + op(2i+1)(states[j(2i+1)])``."""

    def __init__(self, genes: Sequence[Tuple[str, int]], concat: Sequence[int], C_prev_prev: int, C_prev: int,
                 C: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        self.reduction = reduction
        self._steps = len(genes) // 2
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self._indices = [j for _, j in genes]
        self._ops = nn.ModuleList()
        for name, j in genes:
            stride = 2 if reduction and j < 2 else 1
            self._ops.append(OPS[name](C, stride, True))
        # the separable and dilated convs whose convolutions run through pynas.ops.sep_conv
        self._sep = [isinstance(op, (SepConv, DilConv)) and sep_conv.fusable_module(op) for op in self._ops]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        impl = sep_conv.choose(states[0]) if any(self._sep) else None
        for i in range(self._steps):
            total = None
            for e in (2 * i, 2 * i + 1):
                op, x = self._ops[e], states[self._indices[e]]
                h = sep_conv.run_module(op, x, impl) if impl is not None and self._sep[e] else op(x)
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier on an 8x8 feature map (the output of the second reduction cell at 32x32)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.shape[0], -1))


class EvalNetwork(nn.Module):
    """The DARTS evaluation network for 32x32 images (``NetworkCIFAR`` of the original code).

    ``forward`` returns ``(logits, logits_aux)``; ``logits_aux`` is None unless the network has the auxiliary
    head and is in training mode. ``drop_path_prob`` is set by the training loop before each epoch.
    """

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype,
                 stem_multiplier: int = 3):
        super().__init__()
        for name, v in (("C", C), ("num_classes", num_classes), ("layers", layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if C % 2:
            raise ValueError(f"C: expected an even channel count (a factorized reduce halves it), got {C}")
        if not isinstance(genotype, Genotype):
            raise TypeError(f"genotype: expected a Genotype, got {type(genotype).__name__}")
        self._layers = layers
        self._auxiliary = bool(auxiliary)
        self.drop_path_prob = 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        self._aux_after = 2 * layers // 3
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            genes, concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
                (genotype.normal, genotype.normal_concat)
            cell = EvalCell(genes, concat, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self._aux_after:
                C_aux = C_prev
        if self._auxiliary:
            self.auxiliary_head = AuxiliaryHead(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self._aux_after and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.shape[0], -1)), logits_aux


def count_parameters(model: nn.Module) -> int:
    """Weights of the network as the original code reports them: every parameter outside the auxiliary head."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name)
