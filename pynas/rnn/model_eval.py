"""The DARTS RNN evaluation model: the recurrent cell of a genotype in a word-level language model.

Per time step (docs/darts.md, "Evaluation network", RNN), with the masks m_x, m_h of the sequence (training)::

    [c0 | h0] = [x * m_x, h_prev * m_h] @ W0;   s0 = h_prev + sigmoid(c0) * (tanh(h0) - h_prev)
    node i (1..8), its predecessor j and activation f from the genotype:
        [c | h] = (s_j * m_h) @ W_i;   s_i = s_j + sigmoid(c) * (f(h) - s_j)
    output: the mean of the concat nodes

No BatchNorm (the search cell has one). The model around the cell is the search model's: embedding with word
dropout, locked dropout on its output and on the cell's, the decoder tied to the embedding. Names follow the
original code (``encoder``, ``rnns.0._W0``, ``rnns.0._Ws.i``, ``decoder``), so a state_dict moves between the two.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _autodiff
from ..ops import rnn_path
from .genotypes import Genotype
from .model_search import INITRANGE, LockedDropout, check_cell_args, check_lm_args, lm_forward, lm_nll, mask2d

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda h: h}


class DARTSCell(nn.Module):
    """``DARTSCell(ninp, nhid, dropouth, dropoutx, genotype)``; ``forward(inputs (T, B, ninp), hidden (1, B, nhid))``
    returns ``(hiddens (T, B, nhid), last hidden (1, B, nhid))``."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float, genotype: Genotype):
        super().__init__()
        check_cell_args(ninp, nhid, dropouth, dropoutx)
        if not isinstance(genotype, Genotype):
            raise TypeError(f"genotype: expected an RNN Genotype, got {type(genotype).__name__}")
        self.nhid, self.dropouth, self.dropoutx, self.genotype = nhid, dropouth, dropoutx, genotype
        steps = len(genotype.recurrent)
        self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE))
        self._Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE)) for _ in range(steps)])

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor):
        T, B = inputs.size(0), inputs.size(1)
        x_mask = h_mask = None
        if self.training:
            x_mask = mask2d(B, inputs.size(2), 1.0 - self.dropoutx, inputs)
            h_mask = mask2d(B, hidden.size(2), 1.0 - self.dropouth, inputs)
        h = hidden[0]
        if not torch.compiler.is_compiling() and not _autodiff.under_transform() \
                and not torch.is_autocast_enabled(inputs.device.type):
            # the whole sequence as one fused node (training and eval); under torch.compile, torch.func /
            # forward AD and autocast, the module path below
            impl = rnn_path.TABLE.resolve([inputs, h, self._W0])
            if impl.backend != "reference":
                hiddens = rnn_path.rnn_path_cell(self, inputs, h, x_mask, h_mask, impl)
                return hiddens, hiddens[-1].unsqueeze(0)
        outs = []
        for t in range(T):
            h = self.cell(inputs[t], h, x_mask, h_mask)
            outs.append(h)
        hiddens = torch.stack(outs)
        return hiddens, hiddens[-1].unsqueeze(0)

    def cell(self, x, h_prev, x_mask: Optional[torch.Tensor], h_mask: Optional[torch.Tensor]):
        xh = torch.cat([x * x_mask, h_prev * h_mask], dim=-1) if self.training else torch.cat([x, h_prev], dim=-1)
        c0, h0 = torch.split(xh.mm(self._W0), self.nhid, dim=-1)
        states = [h_prev + c0.sigmoid() * (h0.tanh() - h_prev)]
        for i, (name, j) in enumerate(self.genotype.recurrent):
            s_prev = states[j]
            masked = s_prev * h_mask if self.training else s_prev
            c, hh = torch.split(masked.mm(self._Ws[i]), self.nhid, dim=-1)
            states.append(s_prev + c.sigmoid() * (ACTIVATIONS[name](hh) - s_prev))
        return torch.mean(torch.stack([states[i] for i in self.genotype.concat], -1), -1)


class RNNModel(nn.Module):
    """``RNNModel(ntoken, ninp, nhid, nhidlast, dropout, dropouth, dropoutx, dropouti, dropoute, genotype)``;
    ``forward(input (T, B) ids, hidden, return_h=False)`` returns ``(log_prob (T, B, ntoken), hidden)`` and, with
    ``return_h``, the cell's raw and dropped outputs (one-element lists)."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nhidlast: int, dropout: float, dropouth: float,
                 dropoutx: float, dropouti: float, dropoute: float, genotype: Genotype):
        super().__init__()
        check_lm_args(ntoken, ninp, nhid, nhidlast, dropout, dropouti, dropoute)
        self.lockdrop = LockedDropout()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnns = nn.ModuleList([DARTSCell(ninp, nhid, dropouth, dropoutx, genotype)])
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        with torch.no_grad():
            self.encoder.weight.uniform_(-INITRANGE, INITRANGE)
            self.decoder.bias.fill_(0)
        self.ninp, self.nhid, self.ntoken = ninp, nhid, ntoken
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute

    def init_hidden(self, bsz: int):
        return [next(self.parameters()).new_zeros(1, bsz, self.nhid)]

    def forward(self, input: torch.Tensor, hidden, return_h: bool = False):
        return lm_forward(self, input, hidden, return_h)

    def nll(self, input: torch.Tensor, hidden, target: torch.Tensor, return_h: bool = False):
        """``(mean NLL of target (T * B,), next hidden)`` through the fused decoder loss (see
        :func:`~pynas.rnn.model_search.lm_nll`)."""
        return lm_nll(self, input, hidden, target, return_h)
