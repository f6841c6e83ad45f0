"""ESS (Li et al., ACL 2020): the extended search space of the RNN side, intra-cell and inter-cell searched jointly.

The paper's text was not available; this is pynas's interpretation of its abstract and of the simplified form it
reports, ``f(h_[0,t-1]; x_[1,t-1]) = f'(h_(t-1); x_[t-m,t-1])`` and ``g(x_[1,t]; h_[0,t-1]) = g'(x_t; h_[t-m,t-1])``.

The intra-cell function pi is the DARTS RNN cell (alpha, 36 x 5) unchanged, except that it reads x^_t and
h^_(t-1) in place of x_t and h_(t-1). Two inter-cell functions make them:

    h^_(t-1) = f(h_(t-1), x_(t-1), ..., x_(t-m))        (sources in this order: input nodes 0 .. m)
    x^_t     = g(x_t, h_(t-1), ..., h_(t-m))
    h_t      = pi(x^_t, h^_(t-1))

Sources before the start of the text are zeros. The embedding size equals the hidden size H (the decoder is tied
to the embedding), so every source is H wide.

Each inter-cell function is a small DAG: m + 1 input nodes (its sources), K intermediate nodes (``nodes``; the
defaults are m = 3, K = 3). Intermediate node k (0-based) reads every earlier node j = 0 .. m + k through a
mixed edge over the DARTS RNN candidates ``none, tanh, relu, sigmoid, identity``, in the DARTS node form with one
weight matrix W_k (H x 2H) shared by its predecessors::

    [c_j | h_j] = (s_j * mask_j) @ W_k  (one GEMM over every j),   c_j = sigmoid(c_j)
    s_k = BN( sum_j sum_o softmax(beta_(k,j))_o * (s_j + c_j * (o(h_j) - s_j)) )      ('none' adds nothing)
    output: mean(s_(m+1) .. s_(m+K))

The mix is :func:`pynas.ops.rnn_mix` through its dispatch table, as :class:`~pynas.rnn.DARTSCellSearch` mixes
its own nodes. BN is a BatchNorm1d without affine parameters, one per DAG shared by its nodes (the DARTS search
cell likewise shares one BatchNorm over its nodes); the evaluation cell has none. The arch tensors ``beta_f`` and
``beta_g`` are (sum_(k=1..K) (m + k)) x 5 each (rows: node by node, then predecessor by predecessor), initialised
like alpha (1e-3 * randn); ``arch_parameters()`` is ``[alpha, beta_f, beta_g]`` and DARTS's RNN architect
(:class:`pynas.strategies.darts.RNNArchitect`, first or second order) steps the three together.

Dropout masks (drawn once per sequence in training, as in DARTS: x_mask (B, H) then h_mask (B, H)): x_mask on the
input sources (x_t in g; x_(t-1) .. x_(t-m) in f) in their DAG's GEMMs and on x^_t in pi's first GEMM; h_mask on
the hidden sources (h_(t-1) in f; h_(t-1) .. h_(t-m) in g), on every intermediate node of both DAGs, on h^_(t-1)
in pi's first GEMM and on pi's nodes. The evaluation cell uses the same masks in the same places.

The recurrent state (what ``init_hidden`` returns and the loop carries, detached, across batches) is one tensor
per layer, as for DARTS, here (2m, B, H): ``[h_(t-1), ..., h_(t-m), x_(t-1), ..., x_(t-m)]``, newest first. The
training-mode sequence, on a backend other than ``reference``, is one autograd node (:mod:`pynas.ops.ess_cell`);
otherwise (eval mode, the reference backend, torch.compile, torch.func) it runs module by module, the node mix
through :func:`pynas.ops.rnn_mix`.

Genotype (:class:`ESSGenotype`): the DARTS RNN genotype (``recurrent``, ``concat``) plus ``inter`` =
(m, f, g), where f and g list one ``(op, j)`` per intermediate node: DARTS's rule in each DAG on its own (a
node keeps the predecessor whose best non-'none' probability is largest, and on it the best non-'none' op; ties
keep the earlier index). JSON: ``{"recurrent": [...], "concat": [...], "inter": {"m": 3, "f": [[op, j], ...],
"g": [[op, j], ...]}}``; :func:`pynas.rnn.genotypes.from_json` reads it (and returns an :class:`ESSGenotype`),
:func:`pynas.rnn.genotypes.to_json` writes it. The evaluation model (:class:`ESSModel`, for ``pynas train rnn``)
is the same cell with only the chosen edges and no BatchNorm; its weights have the search model's names and
shapes (``rnns.0._W0``, ``rnns.0._Ws.i``, ``rnns.0.f._Ws.k``, ``rnns.0.g._Ws.k``).
"""
from __future__ import annotations

from collections import namedtuple
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _autodiff
from ..ops import ess_cell
from ..ops.rnn_mix import TABLE as rnn_mix_table
from ..ops.rnn_mix import _rnn_mix
from ..rnn import genotypes as rnn_genotypes
from ..rnn.genotypes import PRIMITIVES, Genotype
from ..rnn.model_eval import ACTIVATIONS, DARTSCell, RNNModel
from ..rnn.model_search import INITRANGE, DARTSCellSearch, RNNModelSearch, _mix_reference_form, mask2d

__all__ = ["InterGenotype", "ESSGenotype", "dag_edges", "parse_dag", "derive", "to_json", "from_json",
           "ESSCellSearch", "ESSRNNModel", "ESSCell", "ESSModel", "DEFAULT_M", "DEFAULT_NODES"]

#: The history window m and the intermediate nodes K of each inter-cell DAG.
DEFAULT_M = 3
DEFAULT_NODES = 3

#: The inter-cell part of a genotype: the window ``m`` and, for f and g, one ``(op, j)`` per intermediate node.
InterGenotype = namedtuple("InterGenotype", "m f g")
#: An ESS genotype: the DARTS RNN genotype's fields plus ``inter`` (an :class:`InterGenotype`).
ESSGenotype = namedtuple("ESSGenotype", "recurrent concat inter")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_inter_args(m, nodes) -> None:
    for name, v in (("m", m), ("nodes", nodes)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def dag_edges(m: int, nodes: int) -> int:
    """Rows of an inter-cell arch tensor: intermediate node k (0-based) has m + 1 + k incoming edges."""
    return sum(m + 1 + k for k in range(nodes))


# -- derivation and genotypes ----------------------------------------------------------------------------------


def parse_dag(probs: torch.Tensor, m: int, nodes: int,
              primitives: Sequence[str] = PRIMITIVES) -> List[Tuple[str, int]]:
    """The genes of an inter-cell DAG from its softmaxed arch weights ((:func:`dag_edges`, ops)): per node the
    predecessor whose best non-'none' weight is largest, and on it the best non-'none' op (ties: the earlier)."""
    check_inter_args(m, nodes)
    W = probs.detach().to("cpu", torch.float64).tolist()
    expected = dag_edges(m, nodes)
    if len(W) != expected or any(len(row) != len(primitives) for row in W):
        raise ValueError(f"probs: expected shape ({expected}, {len(primitives)}), got {tuple(probs.shape)}")
    none = primitives.index("none") if "none" in primitives else -1
    genes: List[Tuple[str, int]] = []
    start = 0
    for k in range(nodes):
        rows = W[start:start + m + 1 + k]
        best = [max(w for o, w in enumerate(row) if o != none) for row in rows]
        j = max(range(len(rows)), key=lambda e: (best[e], -e))
        op = max((o for o in range(len(primitives)) if o != none), key=lambda o: (rows[j][o], -o))
        genes.append((primitives[op], j))
        start += len(rows)
    return genes


def derive(alpha: torch.Tensor, beta_f: torch.Tensor, beta_g: torch.Tensor, m: int, nodes: int) -> ESSGenotype:
    """The ESS genotype of the arch tensors: DARTS's rule on alpha, and on each inter-cell DAG separately."""
    intra = rnn_genotypes.derive(alpha, rnn_genotypes.STEPS, rnn_genotypes.CONCAT)
    f = parse_dag(torch.softmax(beta_f.detach(), dim=-1), m, nodes)
    g = parse_dag(torch.softmax(beta_g.detach(), dim=-1), m, nodes)
    return ESSGenotype(recurrent=intra.recurrent, concat=intra.concat, inter=InterGenotype(m=m, f=f, g=g))


def intra_genotype(genotype: ESSGenotype) -> Genotype:
    """The DARTS part of an ESS genotype (the intra cell pi)."""
    return Genotype(recurrent=list(genotype.recurrent), concat=list(genotype.concat))


def inter_to_dict(inter: InterGenotype) -> dict:
    """The JSON object of the ``inter`` part."""
    return {"m": int(inter.m), "f": [[op, int(j)] for op, j in inter.f], "g": [[op, int(j)] for op, j in inter.g]}


def inter_from_dict(data) -> InterGenotype:
    """Parse the ``inter`` part; each error names the field (``inter.m``, ``inter.f``, ``inter.g``)."""
    if not isinstance(data, dict) or set(data) != {"m", "f", "g"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"text: inter must be an object with keys m, f, g, got {got!r}")
    m = data["m"]
    if not _is_int(m) or m < 1:
        raise ValueError(f"text: inter.m must be a positive int (the history window), got {m!r}")
    parts = {}
    for name in ("f", "g"):
        genes = data[name]
        if not isinstance(genes, list) or not genes:
            raise ValueError(f"text: inter.{name} must be a non-empty list of [op, input] pairs, got {genes!r}")
        out = []
        for k, item in enumerate(genes):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"text: inter.{name} entries must be [op, input] pairs, got {item!r}")
            op, j = item
            if op not in PRIMITIVES or op == "none":
                raise ValueError(f"text: inter.{name}: unknown op {op!r} (node {k})")
            if not _is_int(j) or not 0 <= j <= m + k:
                raise ValueError(f"text: inter.{name}: node {k} can take a state 0..{m + k} (m + 1 inputs, then the "
                                 f"earlier nodes), got input {j!r}")
            out.append((op, j))
        parts[name] = out
    return InterGenotype(m=m, f=parts["f"], g=parts["g"])


def with_inter(genotype: Genotype, inter) -> ESSGenotype:
    """A DARTS genotype and a decoded ``inter`` object: the ESS genotype (what :func:`rnn_genotypes.from_json`
    returns for a JSON object with an ``inter`` key)."""
    return ESSGenotype(recurrent=list(genotype.recurrent), concat=list(genotype.concat), inter=inter_from_dict(inter))


def to_json(genotype: ESSGenotype) -> str:
    if not isinstance(genotype, ESSGenotype):
        raise TypeError(f"genotype: expected an ESSGenotype, got {type(genotype).__name__}")
    return rnn_genotypes.to_json(genotype)


def from_json(text) -> ESSGenotype:
    """Parse an ESS genotype (a JSON string or decoded dict); a genotype without ``inter`` is refused."""
    genotype = rnn_genotypes.from_json(text)
    if not isinstance(genotype, ESSGenotype):
        raise ValueError("text: expected an ESS genotype, with an 'inter' part")
    return genotype


# -- the search cell and model ---------------------------------------------------------------------------------


def _uniform_weights(nhid: int, n: int) -> nn.ParameterList:
    return nn.ParameterList(
        [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE)) for _ in range(n)])


class InterDAGSearch(nn.Module):
    """One inter-cell DAG of the search cell: ``_Ws`` (``nodes`` matrices H x 2H) and ``bn`` (no affine).

    ``forward(sources (m+1, B, H), masks (m+1+nodes, B, H) or None, probs (dag_edges, 5), mix)`` returns the mean
    of the intermediate nodes (B, H); ``mix`` is the node mix's implementation."""

    def __init__(self, nhid: int, m: int, nodes: int):
        super().__init__()
        self.nhid, self.m, self.nodes = nhid, m, nodes
        self._Ws = _uniform_weights(nhid, nodes)
        self.bn = nn.BatchNorm1d(nhid, affine=False)

    def forward(self, sources: torch.Tensor, masks: Optional[torch.Tensor], probs: torch.Tensor, mix):
        states = sources
        offset = 0
        for k in range(self.nodes):
            n = states.size(0)
            masked = states * masks[:n] if masks is not None else states
            ch = masked.reshape(-1, self.nhid).mm(self._Ws[k]).view(n, -1, 2 * self.nhid)
            c, hh = torch.split(ch, self.nhid, dim=-1)
            p = probs[offset:offset + n]
            if mix.backend == "reference":
                s = _mix_reference_form(states, c.sigmoid(), hh, p)
            else:
                s = _rnn_mix(states, c.sigmoid(), hh, p, mix)
            states = torch.cat([states, self.bn(s).unsqueeze(0)], 0)
            offset += n
        return torch.mean(states[self.m + 1:], dim=0)


def _check_state(hidden: torch.Tensor, m: int, batch: int, nhid: int) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape) != (2 * m, batch, nhid):
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden: expected the window (2m, B, H) = ({2 * m}, {batch}, {nhid}) "
                         f"[h_(t-1) .. h_(t-m), x_(t-1) .. x_(t-m)], got {got}")


def _source_masks(x_mask, h_mask, m: int, nodes: int):
    """The per-node masks of f and g ((m + 1 + nodes, B, H) each)."""
    f = torch.stack([h_mask] + [x_mask] * m + [h_mask] * nodes)
    g = torch.stack([x_mask] + [h_mask] * (m + nodes))
    return f, g


class ESSCellSearch(DARTSCellSearch):
    """The ESS search cell: ``ESSCellSearch(ninp, nhid, dropouth, dropoutx, m=3, nodes=3)``, the DARTS search cell
    (``_W0``, ``_Ws.i``, ``bn``) plus the inter-cell DAGs ``f`` and ``g`` (:class:`InterDAGSearch`).

    ``forward(inputs (T, B, H), hidden (2m, B, H))`` returns ``(hiddens (T, B, H), window (2m, B, H))``; the arch
    tensors ``weights`` (alpha), ``beta_f`` and ``beta_g`` are set by the model."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, m: int = DEFAULT_M,
                 nodes: int = DEFAULT_NODES):
        super().__init__(ninp, nhid, dropouth, dropoutx)
        check_inter_args(m, nodes)
        if ninp != nhid:
            raise ValueError(f"ninp, nhid: expected equal sizes (the inter-cell DAGs mix inputs and hidden states), "
                             f"got {ninp}, {nhid}")
        self.m, self.nodes = m, nodes
        self.f = InterDAGSearch(nhid, m, nodes)
        self.g = InterDAGSearch(nhid, m, nodes)
        self.beta_f = self.beta_g = None

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor):
        if self.weights is None or self.beta_f is None or self.beta_g is None:
            raise RuntimeError("weights: the cell has no arch tensors; the model sets cell.weights (36 x 5), "
                               "cell.beta_f and cell.beta_g")
        T, B = inputs.size(0), inputs.size(1)
        _check_state(hidden, self.m, B, self.nhid)
        if self.training:
            x_mask = mask2d(B, inputs.size(2), 1.0 - self.dropoutx, inputs)
            h_mask = mask2d(B, self.nhid, 1.0 - self.dropouth, inputs)
            masks_f, masks_g = _source_masks(x_mask, h_mask, self.m, self.nodes)
        else:
            x_mask = h_mask = masks_f = masks_g = None
        probs = F.softmax(self.weights, dim=-1) if self.probs_fn is None else self.probs_fn(self.weights)
        probs_f = F.softmax(self.beta_f, dim=-1)
        probs_g = F.softmax(self.beta_g, dim=-1)
        if self.training and all(bn.track_running_stats and bn.momentum is not None
                                 for bn in (self.bn, self.f.bn, self.g.bn)) \
                and not torch.compiler.is_compiling() and not _autodiff.under_transform():
            # the whole sequence as one autograd node (pynas.ops.ess_cell); as DARTSCellSearch, the module
            # path under torch.compile and torch.func / forward AD
            impl = ess_cell.TABLE.resolve([inputs, hidden, probs, probs_f, probs_g])
            if impl.backend != "reference":
                return ess_cell.ess_cell(self, inputs, hidden, x_mask, h_mask, probs, probs_f, probs_g, impl)
        mix = rnn_mix_table.resolve([inputs, hidden, probs])  # once per sequence
        hs, xs = list(hidden[:self.m]), list(hidden[self.m:])  # newest first
        outs = []
        for t in range(T):
            x = inputs[t]
            h_hat = self.f(torch.stack([hs[0]] + xs), masks_f, probs_f, mix)
            x_hat = self.g(torch.stack([x] + hs), masks_g, probs_g, mix)
            h = self.cell(x_hat, h_hat, x_mask, h_mask, probs, mix=mix)
            outs.append(h)
            hs, xs = [h] + hs[:-1], [x] + xs[:-1]
        return torch.stack(outs), torch.stack(hs + xs)


class ESSRNNModel(RNNModelSearch):
    """The ESS search model: :class:`~pynas.rnn.RNNModelSearch` with :class:`ESSCellSearch` under ``rnns.0``;
    ``ESSRNNModel(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute, m=3, nodes=3)``.

    ``arch_parameters()`` is ``[alpha (36 x 5), beta_f, beta_g (dag_edges(m, nodes) x 5)]``; ``init_hidden(B)`` is
    ``[zeros (2m, B, H)]``; ``genotype()`` an :class:`ESSGenotype`."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int, dropout: float = 0.5,
                 dropouth: float = 0.5, dropoutx: float = 0.5, dropouti: float = 0.5, dropoute: float = 0.1, *,
                 m: int = DEFAULT_M, nodes: int = DEFAULT_NODES):
        check_inter_args(m, nodes)
        super().__init__(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute)
        self.m, self.nodes = m, nodes
        cell = ESSCellSearch(ninp, nhid, dropouth, dropoutx, m, nodes)  # replaces the DARTS cell
        self.rnns = nn.ModuleList([cell])
        edges = dag_edges(m, nodes)
        self.beta_f = (1e-3 * torch.randn(edges, len(PRIMITIVES))).requires_grad_(True)
        self.beta_g = (1e-3 * torch.randn(edges, len(PRIMITIVES))).requires_grad_(True)
        self._arch_parameters = [self.weights, self.beta_f, self.beta_g]
        cell.weights, cell.beta_f, cell.beta_g = self.weights, self.beta_f, self.beta_g

    def new(self) -> "ESSRNNModel":
        """A fresh model of the same configuration, device and dtype, holding a copy of the arch tensors."""
        ref = next(self.parameters())
        model_new = type(self)(*self._args, m=self.m, nodes=self.nodes).to(device=ref.device, dtype=ref.dtype)
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    clone = new

    def init_hidden(self, bsz: int):
        return [next(self.parameters()).new_zeros(2 * self.m, bsz, self.nhid)]

    def genotype(self) -> ESSGenotype:
        return derive(self.weights, self.beta_f, self.beta_g, self.m, self.nodes)


# -- the evaluation cell and model -----------------------------------------------------------------------------


class InterDAG(nn.Module):
    """One derived inter-cell DAG: ``_Ws`` (one H x 2H matrix per intermediate node, as in the search DAG).

    ``forward(sources [m + 1 tensors (B, H)], masks [m + 1 + nodes tensors (B, H)] or None)``: node k is
    ``s_j + sigmoid(c) * (op(h) - s_j)`` with ``[c | h] = (s_j * mask_j) @ W_k`` for its gene ``(op, j)``; returns
    the mean of the intermediate nodes."""

    def __init__(self, nhid: int, m: int, genes: Sequence[Tuple[str, int]]):
        super().__init__()
        self.nhid, self.m, self.genes = nhid, m, [tuple(g) for g in genes]
        self._Ws = _uniform_weights(nhid, len(self.genes))

    def forward(self, sources, masks):
        states = list(sources)
        for k, (op, j) in enumerate(self.genes):
            s = states[j]
            masked = s * masks[j] if masks is not None else s
            c, hh = torch.split(masked.mm(self._Ws[k]), self.nhid, dim=-1)
            states.append(s + c.sigmoid() * (ACTIVATIONS[op](hh) - s))
        return torch.mean(torch.stack(states[self.m + 1:]), dim=0)


class ESSCell(DARTSCell):
    """The ESS evaluation cell: ``ESSCell(ninp, nhid, dropouth, dropoutx, genotype: ESSGenotype)``, the DARTS
    evaluation cell (``_W0``, ``_Ws.i``) plus the derived DAGs ``f`` and ``g``; ``forward`` as
    :class:`ESSCellSearch`'s."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, genotype: ESSGenotype):
        if not isinstance(genotype, ESSGenotype):
            raise TypeError(f"genotype: expected an ESSGenotype, got {type(genotype).__name__}")
        super().__init__(ninp, nhid, dropouth, dropoutx, intra_genotype(genotype))
        if ninp != nhid:
            raise ValueError(f"ninp, nhid: expected equal sizes (the inter-cell DAGs mix inputs and hidden states), "
                             f"got {ninp}, {nhid}")
        self.genotype = genotype
        self.m = genotype.inter.m
        self.f = InterDAG(nhid, self.m, genotype.inter.f)
        self.g = InterDAG(nhid, self.m, genotype.inter.g)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor):
        T, B = inputs.size(0), inputs.size(1)
        m = self.m
        _check_state(hidden, m, B, self.nhid)
        x_mask = h_mask = masks_f = masks_g = None
        if self.training:
            x_mask = mask2d(B, inputs.size(2), 1.0 - self.dropoutx, inputs)
            h_mask = mask2d(B, self.nhid, 1.0 - self.dropouth, inputs)
            masks_f = [h_mask] + [x_mask] * m + [h_mask] * len(self.f.genes)
            masks_g = [x_mask] + [h_mask] * (m + len(self.g.genes))
        hs, xs = list(hidden[:m]), list(hidden[m:])
        outs = []
        for t in range(T):
            x = inputs[t]
            h_hat = self.f([hs[0]] + xs, masks_f)
            x_hat = self.g([x] + hs, masks_g)
            h = self.cell(x_hat, h_hat, x_mask, h_mask)
            outs.append(h)
            hs, xs = [h] + hs[:-1], [x] + xs[:-1]
        return torch.stack(outs), torch.stack(hs + xs)


class ESSModel(RNNModel):
    """The ESS evaluation language model: :class:`~pynas.rnn.model_eval.RNNModel` with :class:`ESSCell` under
    ``rnns.0``; ``ESSModel(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute,
    genotype)``; ``init_hidden(B)`` is ``[zeros (2m, B, H)]``."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int, dropout: float, dropouth: float,
                 dropoutx: float, dropouti: float, dropoute: float, genotype: ESSGenotype):
        if not isinstance(genotype, ESSGenotype):
            raise TypeError(f"genotype: expected an ESSGenotype, got {type(genotype).__name__}")
        super().__init__(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute,
                         intra_genotype(genotype))
        self.m = genotype.inter.m
        self.rnns = nn.ModuleList([ESSCell(ninp, nhid, dropouth, dropoutx, genotype)])  # replaces the DARTS cell

    def init_hidden(self, bsz: int):
        return [next(self.parameters()).new_zeros(2 * self.m, bsz, self.nhid)]
