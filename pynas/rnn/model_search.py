"""The DARTS RNN search cell and model (the reference code's ``DARTSCellSearch`` and ``RNNModelSearch``).

Names and parameters follow the DARTS reference code (``_W0``, ``_Ws.i``, ``bn``), so a state_dict moves
between the two. Per time step (docs/darts.md, "RNN space"):

    [c0 | h0] = [x * m_x, h_prev * m_h] @ W0;   s0 = BN(h_prev + sigmoid(c0) * (tanh(h0) - h_prev))
    node i:  [c_j | h_j] = (s_j * m_h) @ W_i for all j < i (one GEMM), c_j = sigmoid(c_j)
             s_i = BN( sum_j sum_{f != none} p[(i, j), f] * (s_j + c_j * (f(h_j) - s_j)) )
    output:  mean(s_1 .. s_8)

The masks are drawn once per sequence (training only). ``weights`` (36 x 5 arch tensor) is set by the
model that owns the cell. In training mode, on a backend other than ``reference``, the whole sequence is
one fused autograd node (:mod:`pynas.ops.rnn_cell`); otherwise the cell runs module by module, the node mix
through :func:`pynas.ops.rnn_mix` (or, on ``reference``, written as the reference code writes it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _autodiff
from ..ops import _dispatch, rnn_cell
from ..ops.linear_nll import linear_nll
from ..ops.rnn_mix import TABLE as rnn_mix_table
from ..ops.rnn_mix import _rnn_mix
from .genotypes import CONCAT, STEPS

INITRANGE = 0.04


def _global_rows(batch: int):
    """(rows to draw, this rank's slice of them or None): a data-parallel search (pynas.search.distributed) draws
    a batch's dropout masks for the whole global batch, as one process would, and each rank keeps its rows."""
    from ..search.distributed import active

    group = active()
    if group is None:
        return batch, None
    return batch * group.world, slice(group.rank * batch, (group.rank + 1) * batch)


def mask2d(batch: int, size: int, keep_prob: float, like: torch.Tensor) -> torch.Tensor:
    """A (batch, size) dropout mask scaled by 1/keep_prob, drawn as the reference code draws it
    (``floor(rand + keep) / keep`` from the CPU generator, in float32), so a seeded run draws the same masks."""
    rows = _global_rows(batch)
    m = torch.floor(torch.rand(rows[0], size) + keep_prob) / keep_prob
    if rows[1] is not None:  # data-parallel: this rank's rows of the global batch's mask
        m = m[rows[1]]
    if like.device.type == "cuda":  # pinned + non_blocking: no host sync per sequence
        m = m.pin_memory()
    return m.to(device=like.device, dtype=like.dtype, non_blocking=True)


_ACTIVATIONS = (("tanh", torch.tanh), ("relu", torch.relu), ("sigmoid", torch.sigmoid), ("identity", None))


def _mix_reference_form(states, c, h, probs):
    """The node mix exactly as the DARTS reference code computes it (one candidate at a time, summed over
    the node's inputs): the ``reference`` backend, and the eager baseline of the benchmarks."""
    s = torch.zeros_like(states[0])
    for k, (_, fn) in enumerate(_ACTIVATIONS, start=1):
        unweighted = states + c * ((h if fn is None else fn(h)) - states)
        # out of place (the reference adds in place; same numbers), so that torch.func.vmap can batch it
        s = s + torch.sum(probs[:, k].unsqueeze(-1).unsqueeze(-1) * unweighted, dim=0)
    return s


def check_cell_args(ninp, nhid, dropouth, dropoutx) -> None:
    """The recurrent cells' sizes and dropouts (the search and the evaluation cell)."""
    for name, v in (("ninp", ninp), ("nhid", nhid)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    for name, v in (("dropouth", dropouth), ("dropoutx", dropoutx)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")


class DARTSCellSearch(nn.Module):
    """``DARTSCellSearch(ninp, nhid, dropouth, dropoutx)``; ``forward(inputs (T, B, ninp), hidden (1, B, nhid))``
    returns ``(hiddens (T, B, nhid), last hidden (1, B, nhid))``."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float):
        super().__init__()
        check_cell_args(ninp, nhid, dropouth, dropoutx)
        self.nhid = nhid
        self.dropouth = dropouth
        self.dropoutx = dropoutx
        self.genotype = None
        self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE))
        self._Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE)) for _ in range(STEPS)])
        self.bn = nn.BatchNorm1d(nhid, affine=False)
        self.weights = None  # the arch tensor, set by the model
        self.probs_fn = None  # weights -> (edges, candidates) probabilities; None: DARTS's per-edge softmax

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor):
        if self.weights is None:
            raise RuntimeError("weights: the cell has no arch tensor; the model sets cell.weights (36 x 5)")
        T, B = inputs.size(0), inputs.size(1)
        if self.training:
            x_mask = mask2d(B, inputs.size(2), 1.0 - self.dropoutx, inputs)
            h_mask = mask2d(B, hidden.size(2), 1.0 - self.dropouth, inputs)
        else:
            x_mask = h_mask = None
        h = hidden[0]
        probs = F.softmax(self.weights, dim=-1) if self.probs_fn is None else self.probs_fn(self.weights)
        if self.training and self.bn.track_running_stats and self.bn.momentum is not None \
                and not torch.compiler.is_compiling() and not _autodiff.under_transform():
            # under torch.compile: the module path, rnn_mix a custom op; under torch.func / forward AD: the
            # module path through the reference ops
            impl = rnn_cell.TABLE.resolve([inputs, h, probs])
            if impl.backend != "reference":
                hiddens = rnn_cell.rnn_cell(self, inputs, h, x_mask, h_mask, probs, impl)
                return hiddens, hiddens[-1].unsqueeze(0)
        mix = rnn_mix_table.resolve([inputs, h, probs])  # once per sequence, not per node
        outs = []
        for t in range(T):
            h = self.cell(inputs[t], h, x_mask, h_mask, probs, mix=mix)
            outs.append(h)
        hiddens = torch.stack(outs)
        return hiddens, hiddens[-1].unsqueeze(0)

    def _init_state(self, x, h_prev, x_mask, h_mask):
        xh = torch.cat([x * x_mask, h_prev * h_mask], dim=-1) if self.training else torch.cat([x, h_prev], dim=-1)
        c0, h0 = torch.split(xh.mm(self._W0), self.nhid, dim=-1)
        return h_prev + c0.sigmoid() * (h0.tanh() - h_prev)

    def cell(self, x, h_prev, x_mask, h_mask, probs, mix: Optional[_dispatch.Implementation] = None):
        """One time step; ``mix``: the node mix's implementation (resolved from the tensors when None)."""
        if mix is None:
            mix = rnn_mix_table.resolve([x, h_prev, probs])
        s0 = self.bn(self._init_state(x, h_prev, x_mask, h_mask))
        states = s0.unsqueeze(0)
        offset = 0
        for i in range(STEPS):
            masked = states * h_mask.unsqueeze(0) if self.training else states
            ch = masked.reshape(-1, self.nhid).mm(self._Ws[i]).view(i + 1, -1, 2 * self.nhid)
            c, hh = torch.split(ch, self.nhid, dim=-1)
            p = probs[offset:offset + i + 1]
            if mix.backend == "reference":
                s = _mix_reference_form(states, c.sigmoid(), hh, p)
            else:
                s = _rnn_mix(states, c.sigmoid(), hh, p, mix)
            s = self.bn(s)
            states = torch.cat([states, s.unsqueeze(0)], 0)
            offset += i + 1
        return torch.mean(states[-CONCAT:], dim=0)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence: ``forward(x (T, B, D), dropout)`` drops the same units at every
    step (the reference code's LockedDropout; the mask is drawn with ``bernoulli_`` on x's device)."""

    def forward(self, x: torch.Tensor, dropout: float = 0.5) -> torch.Tensor:
        if not self.training or not dropout:
            return x
        rows, mine = _global_rows(x.size(1))
        m = x.new_empty(1, rows, x.size(2)).bernoulli_(1 - dropout) / (1 - dropout)
        if mine is not None:
            m = m[:, mine]
        return m.expand_as(x) * x


def embedded_dropout(embed: nn.Embedding, words: torch.Tensor, dropout: float = 0.1) -> torch.Tensor:
    """Embedding lookup with whole words dropped: each row of the embedding matrix is zeroed with
    probability ``dropout`` (the others scaled by 1 / (1 - dropout)), one draw per call."""
    weight = embed.weight
    if dropout:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - dropout).expand_as(weight) / (1 - dropout)
        weight = mask * weight
    return F.embedding(words, weight, embed.padding_idx, embed.max_norm, embed.norm_type,
                       embed.scale_grad_by_freq, embed.sparse)


def check_lm_args(ntoken, ninp, nhid, nhidlast, dropout, dropouti, dropoute) -> None:
    """The language models' own settings (the search and the evaluation model)."""
    if not isinstance(ntoken, int) or isinstance(ntoken, bool) or ntoken < 1:
        raise ValueError(f"ntoken: expected a positive int, got {ntoken!r}")
    if not (ninp == nhid == nhidlast):
        raise ValueError(f"ninp, nhid, nhidlast: expected equal sizes (the decoder is tied to the embedding), "
                         f"got {ninp}, {nhid}, {nhidlast}")
    for name, v in (("dropout", dropout), ("dropouti", dropouti), ("dropoute", dropoute)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")


def lm_forward(model: nn.Module, input: torch.Tensor, hidden, return_h: bool = False):
    """The language models' forward (``encoder``, ``rnns``, ``decoder``, ``lockdrop`` and the dropouts of
    ``model``): ``(log_prob (T, B, ntoken), hidden)`` and, with ``return_h``, the cells' raw and dropped outputs
    (one-element lists, as the reference returns them)."""
    output, new_hidden, raw_outputs = _lm_body(model, input, hidden)
    log_prob = F.log_softmax(model.decoder(output.view(-1, model.ninp)), dim=-1).view(-1, input.size(1), model.ntoken)
    if return_h:
        return log_prob, new_hidden, raw_outputs, [output]
    return log_prob, new_hidden


def _lm_body(model: nn.Module, input: torch.Tensor, hidden):
    """The language models' forward up to the decoder: (dropped output (T, B, ninp), hidden, raw outputs)."""
    emb = embedded_dropout(model.encoder, input, dropout=model.dropoute if model.training else 0)
    raw_output = model.lockdrop(emb, model.dropouti)
    new_hidden, raw_outputs = [], []
    for layer, rnn in enumerate(model.rnns):
        raw_output, new_h = rnn(raw_output, hidden[layer])
        new_hidden.append(new_h)
        raw_outputs.append(raw_output)
    return model.lockdrop(raw_output, model.dropout), new_hidden, raw_outputs


def lm_nll(model: nn.Module, input: torch.Tensor, hidden, target: torch.Tensor, return_h: bool = False):
    """``(mean NLL of target (T * B,), hidden)`` of the language models' forward (and, with ``return_h``, the
    raw and dropped outputs as :func:`lm_forward` returns them): the decoder, log-softmax and NLL through the
    fused :func:`pynas.ops.linear_nll` (the same value as ``nll_loss(lm_forward(...)[0])``, without the
    (T * B, ntoken) log-probabilities)."""
    output, new_hidden, raw_outputs = _lm_body(model, input, hidden)
    loss = linear_nll(output.view(-1, model.ninp), model.decoder.weight, model.decoder.bias, target)
    if return_h:
        return loss, new_hidden, raw_outputs, [output]
    return loss, new_hidden


class RNNModelSearch(nn.Module):
    """The DARTS RNN search model: ``RNNModelSearch(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx,
    dropouti, dropoute)``, with the reference code's layout.

    Submodules (state_dict keys): ``encoder`` (Embedding), ``rnns.0`` (:class:`DARTSCellSearch`), ``decoder``
    (Linear, its weight tied to the encoder's). ``weights`` is the 36 x 5 arch tensor: not a parameter and not
    in the state_dict, as in the reference. ``forward(input (T, B) ids, hidden)`` returns
    ``(log_prob (T, B, ntoken), hidden)``, and with ``return_h=True`` also the cell's raw outputs and the
    dropped outputs (one-element lists, as the reference returns them).
    """

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int, dropout: float = 0.5,
                 dropouth: float = 0.5, dropoutx: float = 0.5, dropouti: float = 0.5, dropoute: float = 0.1):
        super().__init__()
        check_lm_args(ntoken, ninp, nhid, nhidlast, dropout, dropouti, dropoute)
        self._args = (ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute)
        self.lockdrop = LockedDropout()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnns = nn.ModuleList([DARTSCellSearch(ninp, nhid, dropouth, dropoutx)])
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.ninp, self.nhid, self.nhidlast, self.ntoken = ninp, nhid, nhidlast, ntoken
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self._initialize_arch_parameters()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.encoder.weight.uniform_(-INITRANGE, INITRANGE)
            self.decoder.bias.fill_(0)
            self.decoder.weight.uniform_(-INITRANGE, INITRANGE)

    # -- architecture parameters -------------------------------------------------
    def _initialize_arch_parameters(self) -> None:
        from .genotypes import PRIMITIVES

        k = STEPS * (STEPS + 1) // 2
        self.weights = (1e-3 * torch.randn(k, len(PRIMITIVES))).requires_grad_(True)
        self._arch_parameters = [self.weights]
        for rnn in self.rnns:
            rnn.weights = self.weights

    def arch_parameters(self):
        return self._arch_parameters

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for a in self._arch_parameters:  # .to()/.double()/.cuda() carry the arch tensor along, in place
            with torch.no_grad():
                a.data = fn(a.data)
            if a.grad is not None:
                a.grad.data = fn(a.grad.data)
        return self

    def new(self) -> "RNNModelSearch":
        """A fresh model of the same configuration, device and dtype, holding a copy of the arch tensor."""
        ref = next(self.parameters())
        model_new = type(self)(*self._args).to(device=ref.device, dtype=ref.dtype)
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    clone = new  # the reference's search model calls it clone()

    # -- forward -----------------------------------------------------------------
    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return [weight.new_zeros(1, bsz, self.nhid)]

    def forward(self, input: torch.Tensor, hidden, return_h: bool = False):
        return lm_forward(self, input, hidden, return_h)

    def nll(self, input: torch.Tensor, hidden, target: torch.Tensor, return_h: bool = False):
        """``(mean NLL of target (T * B,), next hidden)`` (see :func:`lm_nll`)."""
        return lm_nll(self, input, hidden, target, return_h)

    def _loss(self, hidden, input, target):
        """``(nll loss, next hidden)`` on a batch (``target`` flattened, (T * B,))."""
        return self.nll(input, hidden, target)

    def genotype(self):
        from .genotypes import derive

        return derive(self.weights, STEPS, CONCAT)


def regularised_loss(model: nn.Module, data: torch.Tensor, targets: torch.Tensor, hidden, alpha: float, beta: float):
    """``(loss, raw NLL, next hidden)`` of a language model's training step: the NLL plus ``alpha`` times the
    activation regularisation (mean square of the dropped outputs) and ``beta`` times the temporal one (mean
    square of consecutive raw outputs' differences)."""
    raw_loss, hidden, rnn_hs, dropped = model.nll(data, hidden, targets, return_h=True)  # the fused decoder loss
    loss = raw_loss
    if alpha > 0:
        loss = loss + alpha * dropped[-1].pow(2).mean()
    if beta > 0:
        loss = loss + beta * (rnn_hs[-1][1:] - rnn_hs[-1][:-1]).pow(2).mean()
    return loss, raw_loss, hidden


@torch.no_grad()
def mean_nll(model: nn.Module, data_source: torch.Tensor, bptt: int) -> float:
    """Mean NLL per token of a language model on ``data_source`` (batchified), in eval mode, in chunks of
    ``bptt`` steps with the hidden state carried; the model's mode is restored."""
    from .data import get_batch

    was = model.training
    model.eval()
    hidden = model.init_hidden(data_source.size(1))
    loss_sum, tokens = 0.0, 0
    for i in range(0, data_source.size(0) - 1, bptt):
        data, targets = get_batch(data_source, i, bptt)
        log_prob, hidden = model(data, hidden)
        loss_sum += float(F.nll_loss(log_prob.view(-1, log_prob.size(2)), targets, reduction="sum"))
        tokens += targets.numel()
    model.train(was)
    return loss_sum / max(tokens, 1)
