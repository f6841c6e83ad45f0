"""The DARTS CNN search network: MixedOp -> Cell -> Network.

Constructors, methods and submodule names are those of the DARTS reference
code (``model_search.py``), so a state_dict moves between the two with
``strict=True``. Each MixedOp mixes its candidates through
:func:`pynas.ops.mixed_sum`, so the backend in force picks the kernels.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

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

    def forward(self, x: torch.Tensor, weights: torch.Tensor, selected: Optional[Sequence[int]] = None,
                straight_through: bool = False) -> torch.Tensor:
        """The weighted sum over every candidate, or with ``selected`` (candidate indices) over those only: the
        others are never computed (a sampled path: GDAS, random search with weight sharing). With
        ``straight_through`` each unselected candidate k adds the scalar ``weights[k]`` (GDAS's hard weights:
        value 0, so the output is unchanged, while the gradient of ``weights[k]`` is the sum of the output's
        gradient, as if op_k(x) were ones)."""
        self._check_weights(x, weights)
        if selected is not None:
            return self._sampled(x, weights, selected, straight_through)
        backend = self._fused(x, weights, self._plan_for(None))
        if backend is not None:
            return cnn_edge.cnn_edge(self._plan, x, weights, backend)
        outs = [self._ops[k](x) for k in self._live]
        w = weights[self._live_slice] if self._live_slice is not None else weights[self._live]
        return mixed_sum(outs, w)

    def _sampled(self, x: torch.Tensor, weights: torch.Tensor, selected: Sequence[int],
                 straight_through: bool) -> torch.Tensor:
        key = self._selection_key(selected)
        live = [k for k in key if self._primitives[k] != "none"]
        if live:
            plan = self._plan_for(key)
            backend = self._fused(x, weights, plan)
            if backend is not None:
                out = cnn_edge.cnn_edge(plan, x, weights, backend)
            else:
                out = mixed_sum([self._ops[k](x) for k in live], weights[live])
        else:
            n, c, h, w = x.shape
            s = self._stride
            out = x.new_zeros(n, c, (h - 1) // s + 1, (w - 1) // s + 1)
        if straight_through:
            rest = [k for k in range(len(self._primitives)) if k not in key]
            if rest:
                out = out + weights[rest].sum()
        return out

    def _selection_key(self, selected) -> tuple:
        n = len(self._primitives)
        try:
            key = tuple(sorted({int(k) for k in selected}))
        except (TypeError, ValueError):
            raise ValueError(f"selected: expected candidate indices in [0, {n}), got {selected!r}") from None
        if any(not 0 <= k < n for k in key):
            raise ValueError(f"selected: expected candidate indices in [0, {n}), got {list(selected)}")
        return key

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

    def _plan_for(self, key: Optional[tuple]) -> EdgePlan:
        """The fused edge's plan over every candidate (``key`` None) or over the candidates in ``key`` (the
        others read as 'none': the same kernels, only the selected candidates computed), built once each."""
        if key is None:
            if self._plan is None:
                self._plan = EdgePlan(self, self._primitives, self._stride)
            return self._plan
        plans = self.__dict__.setdefault("_sub_plans", {})
        plan = plans.get(key)
        if plan is None:
            masked = [p if k in key else "none" for k, p in enumerate(self._primitives)]
            plan = plans[key] = EdgePlan(self, masked, self._stride)
        return plan

    def _fused(self, x: torch.Tensor, weights: torch.Tensor, plan: EdgePlan) -> Optional[str]:
        """The backend that runs this call as one fused edge, or None (training-mode edges only)."""
        impl = cnn_edge.choose(plan, x, weights)
        return None if impl is None else impl.backend


class CellWeights(NamedTuple):
    """What a search method hands a cell for one forward: per edge the candidate weights (edges, candidates); with
    ``selected`` (one tuple of candidate indices per edge) only those candidates are computed, an empty tuple
    skipping the edge ('none'), with ``straight_through`` as :meth:`MixedOp.forward` says; with ``edge_scale``
    (edges,) each node is ``sum_j edge_scale[j] * edge_j`` (PC-DARTS's edge normalisation) instead of a plain
    sum."""

    weights: torch.Tensor
    selected: Optional[Sequence[Sequence[int]]] = None
    straight_through: bool = False
    edge_scale: Optional[torch.Tensor] = None


class Cell(nn.Module):
    """A DARTS search cell: 2 inputs, ``steps`` nodes, each the sum of MixedOps of all earlier states.

    ``make_op(C, stride)`` builds each edge's mixed op (default :class:`MixedOp` over ``primitives``)."""

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                 primitives: Sequence[str] = PRIMITIVES, make_op: Optional[Callable[[int, int], nn.Module]] = None):
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
                self._ops.append(MixedOp(C, stride, primitives) if make_op is None else make_op(C, stride))

    def forward(self, s0, s1, weights):
        """``weights``: a (edges, candidates) tensor, one row per MixedOp (each row checked by its MixedOp), or a
        :class:`CellWeights`."""
        cw = weights if isinstance(weights, CellWeights) else CellWeights(weights)
        w = cw.weights
        n_edges = len(self._ops)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != n_edges:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weights: expected a 2-D tensor with one row per edge of the cell, "
                             f"{n_edges} rows, got {shape}")
        if cw.selected is not None and len(cw.selected) != n_edges:
            raise ValueError(f"selected: expected one tuple of candidates per edge ({n_edges}), got "
                             f"{len(cw.selected)}")
        scale = cw.edge_scale
        if scale is not None and (not isinstance(scale, torch.Tensor) or scale.shape != (n_edges,)):
            raise ValueError(f"edge_scale: expected a tensor of shape ({n_edges},), got "
                             f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}")
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for _ in range(self._steps):
            ys, edges = [], []
            for j, h in enumerate(states):
                e = offset + j
                if cw.selected is None:
                    ys.append(self._ops[e](h, w[e]))
                elif cw.selected[e] or cw.straight_through:
                    ys.append(self._ops[e](h, w[e], cw.selected[e], cw.straight_through))
                else:
                    continue  # an edge without a candidate contributes nothing
                edges.append(e)
            if not ys:  # no edge of the node was selected: the node is zero
                n, c, hh, ww = s1.shape
                st = 2 if self.reduction else 1
                s = s1.new_zeros(n, c, (hh - 1) // st + 1, (ww - 1) // st + 1)
            elif scale is not None:
                s = mixed_sum(ys, scale[edges])
            else:
                s = ys[0]
                for y in ys[1:]:
                    s = s + y
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
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, self._primitives,
                        self._make_op)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()

    #: How each edge's mixed op is built: ``None`` (a :class:`MixedOp` over the primitives), or a subclass's method
    #: ``_make_op(C, stride)`` (PC-DARTS's partial-channel edge).
    _make_op: Optional[Callable[[int, int], nn.Module]] = None

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

    def _method_kwargs(self) -> dict:
        """The keyword arguments a subclass's constructor takes beyond Network's (:meth:`new` passes them)."""
        return {}

    def new(self) -> "Network":
        """A fresh network of the same configuration, device and dtype, holding a copy of the alphas."""
        ref = next(self.parameters())
        model_new = type(self)(self._C, self._num_classes, self._layers, self._criterion, self._steps,
                               self._multiplier, self._stem_multiplier, self._primitives, **self._method_kwargs())
        model_new = model_new.to(device=ref.device, dtype=ref.dtype)
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    # -- forward -----------------------------------------------------------------
    def cell_weights(self):
        """(normal, reduce): what each cell type gets in this forward, a weights tensor or a :class:`CellWeights`.
        DARTS: the softmax of each edge's alphas; a search method overrides this (pynas.strategies)."""
        return F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)

    def forward(self, input):
        s0 = s1 = self.stem(input)
        w_normal, w_reduce = self.cell_weights()
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
