"""The DARTS CNN search network: MixedOp -> Cell -> Network.

Constructors, methods and submodule names are those of the DARTS reference
code (``model_search.py``), so a state_dict moves between the two with
``strict=True``. Each MixedOp mixes its candidates through
:func:`pynas.ops.mixed_sum`, so the backend in force picks the kernels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import cnn_edge, mixed_sum
from . import genotypes
from .edge_plan import EdgePlan
from .operations import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN


class MixedOp(nn.Module):
    """``y = sum_k w_k * op_k(x)`` over the candidates; 'none' is never computed.

    ``forward(x, weights)``: x (N, C, H, W), weights (len(primitives),) softmaxed: a 1-D floating tensor
    on x's device, one weight per candidate ('none' included), else ValueError (on the fused path and the
    module path alike).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._ops = nn.ModuleList()
        self._live: List[int] = []
        for k, primitive in enumerate(primitives):
            op = OPS[primitive](C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)
            if primitive != "none":
                self._live.append(k)
        if not self._live:
            raise ValueError("primitives: a MixedOp needs at least one candidate other than 'none'")
        self._stride = stride
        self._primitives = list(primitives)
        self._plan = None  # built on first use (pynas.ops.cnn_edge)
        # weights[_live] as a slice when the live columns are contiguous (the DARTS case).
        lo, hi = self._live[0], self._live[-1] + 1
        self._live_slice = slice(lo, hi) if self._live == list(range(lo, hi)) else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._check_weights(x, weights)
        backend = self._fused(x, weights)
        if backend is not None:
            return cnn_edge.cnn_edge(self._plan, x, weights, backend)
        outs = [self._ops[k](x) for k in self._live]
        w = weights[self._live_slice] if self._live_slice is not None else weights[self._live]
        return mixed_sum(outs, w)

    def _check_weights(self, x: torch.Tensor, weights) -> None:
        """weights: 1-D, one per candidate, floating, on x's device. Metadata only (runs per edge per step):
        no host sync, nothing a compiled graph would break on."""
        n = len(self._primitives)
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights: expected a tensor of {n} weights, got {type(weights).__name__}")
        if weights.shape != (n,) or not weights.is_floating_point() or weights.device != x.device:
            got = weights.shape[0] if weights.dim() == 1 else weights.numel()
            raise ValueError(
                f"weights: expected {n} weights (a 1-D floating tensor on {x.device}, one per candidate: "
                f"{', '.join(self._primitives)}), got {got} (shape {tuple(weights.shape)}, {weights.dtype}, "
                f"on {weights.device})")

    def _fused(self, x: torch.Tensor, weights: torch.Tensor) -> Optional[str]:
        """The backend that runs this call as one fused edge, or None (training-mode edges only)."""
        if self._plan is None:
            self._plan = EdgePlan(self, self._primitives, self._stride)
        impl = cnn_edge.choose(self._plan, x, weights)
        return None if impl is None else impl.backend


class Cell(nn.Module):
    """A DARTS search cell: 2 inputs, ``steps`` nodes, each the sum of MixedOps of all earlier states."""

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        self._bns = nn.ModuleList()
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, primitives))

    def forward(self, s0, s1, weights):
        # weights (edges, candidates): one row per MixedOp (each row is checked by its MixedOp)
        if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or weights.shape[0] != len(self._ops):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights: expected a 2-D tensor with one row per edge of the cell, "
                             f"{len(self._ops)} rows, got {shape}")
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for _ in range(self._steps):
            s = None
            for j, h in enumerate(states):
                y = self._ops[offset + j](h, weights[offset + j])
                s = y if s is None else s + y
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """The DARTS CNN supernet.

    ``Network(C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3)``.
    The arch tensors ``alphas_normal`` and ``alphas_reduce`` (edges x ops) are
    leaf tensors outside ``parameters()`` and ``state_dict()``, as in the
    reference code; ``.to()``/``.cuda()``/``.double()`` move them in place, so
    an optimizer holding them stays valid.
    """

    def __init__(self, C, num_classes, layers, criterion=None, steps=4, multiplier=4, stem_multiplier=3,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        for name, value in (("C", C), ("num_classes", num_classes), ("layers", layers), ("steps", steps),
                            ("multiplier", multiplier), ("stem_multiplier", stem_multiplier)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if multiplier > steps:
            raise ValueError(f"multiplier: at most steps={steps} nodes can be concatenated, got {multiplier}")
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self._stem_multiplier = stem_multiplier
        self._primitives = list(primitives)

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in (layers // 3, 2 * layers // 3):
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, self._primitives)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()

    # -- architecture parameters -------------------------------------------------
    def _initialize_alphas(self):
        k = sum(2 + i for i in range(self._steps))
        num_ops = len(self._primitives)
        self.alphas_normal = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for a in self._arch_parameters:
            with torch.no_grad():
                a.data = fn(a.data)
            if a.grad is not None:
                a.grad.data = fn(a.grad.data)
        return self

    def new(self) -> "Network":
        """A fresh network of the same configuration, device and dtype, holding a copy of the alphas."""
        ref = next(self.parameters())
        model_new = type(self)(self._C, self._num_classes, self._layers, self._criterion, self._steps,
                               self._multiplier, self._stem_multiplier, self._primitives)
        model_new = model_new.to(device=ref.device, dtype=ref.dtype)
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    # -- forward -----------------------------------------------------------------
    def forward(self, input):
        s0 = s1 = self.stem(input)
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        for cell in self.cells:
            weights = w_reduce if cell.reduction else w_normal
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        logits = self(input)
        return self._criterion(logits, target)

    def genotype(self) -> genotypes.Genotype:
        return genotypes.derive(self.alphas_normal, self.alphas_reduce, self._steps, self._multiplier,
                                self._primitives)
