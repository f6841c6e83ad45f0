"""The DARTS RNN search cell, with the node mix through :func:`pynas.ops.rnn_mix`.

Names and parameters follow the DARTS reference code (``_W0``, ``_Ws.i``, ``bn``), so a state_dict moves
between the two. Per time step (darts-spec.md):

    [c0 | h0] = [x * m_x, h_prev * m_h] @ W0;   s0 = BN(h_prev + sigmoid(c0) * (tanh(h0) - h_prev))
    node i:  [c_j | h_j] = (s_j * m_h) @ W_i for all j < i (one GEMM), c_j = sigmoid(c_j)
             s_i = BN( sum_j sum_{f != none} p[(i, j), f] * (s_j + c_j * (f(h_j) - s_j)) )
    output:  mean(s_1 .. s_8)

The masks are drawn once per sequence (training only). ``weights`` (36 x 5 arch tensor) is set by the
model that owns the cell.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import rnn_mix
from .genotypes import CONCAT, STEPS

INITRANGE = 0.04


def mask2d(batch: int, size: int, keep_prob: float, like: torch.Tensor) -> torch.Tensor:
    """A (batch, size) dropout mask scaled by 1/keep_prob (the reference code's mask2d)."""
    m = torch.empty(batch, size, dtype=like.dtype, device=like.device).bernoulli_(keep_prob)
    return m / keep_prob


class DARTSCellSearch(nn.Module):
    """``DARTSCellSearch(ninp, nhid, dropouth, dropoutx)``; ``forward(inputs (T, B, ninp), hidden (1, B, nhid))``
    returns ``(hiddens (T, B, nhid), last hidden (1, B, nhid))``."""

    def __init__(self, ninp: int, nhid: int, dropouth: float, dropoutx: float):
        super().__init__()
        for name, v in (("ninp", ninp), ("nhid", nhid)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name, v in (("dropouth", dropouth), ("dropoutx", dropoutx)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
        self.nhid = nhid
        self.dropouth = dropouth
        self.dropoutx = dropoutx
        self.genotype = None
        self._W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE))
        self._Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INITRANGE, INITRANGE)) for _ in range(STEPS)])
        self.bn = nn.BatchNorm1d(nhid, affine=False)
        self.weights = None  # the arch tensor, set by the model

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
        outs = []
        probs = F.softmax(self.weights, dim=-1)
        for t in range(T):
            h = self.cell(inputs[t], h, x_mask, h_mask, probs)
            outs.append(h)
        hiddens = torch.stack(outs)
        return hiddens, hiddens[-1].unsqueeze(0)

    def _init_state(self, x, h_prev, x_mask, h_mask):
        xh = torch.cat([x * x_mask, h_prev * h_mask], dim=-1) if self.training else torch.cat([x, h_prev], dim=-1)
        c0, h0 = torch.split(xh.mm(self._W0), self.nhid, dim=-1)
        return h_prev + c0.sigmoid() * (h0.tanh() - h_prev)

    def cell(self, x, h_prev, x_mask, h_mask, probs):
        s0 = self.bn(self._init_state(x, h_prev, x_mask, h_mask))
        states = s0.unsqueeze(0)
        offset = 0
        for i in range(STEPS):
            masked = states * h_mask.unsqueeze(0) if self.training else states
            ch = masked.reshape(-1, self.nhid).mm(self._Ws[i]).view(i + 1, -1, 2 * self.nhid)
            c, hh = torch.split(ch, self.nhid, dim=-1)
            s = rnn_mix(states, c.sigmoid(), hh, probs[offset:offset + i + 1])
            s = self.bn(s)
            states = torch.cat([states, s.unsqueeze(0)], 0)
            offset += i + 1
        return torch.mean(states[-CONCAT:], dim=0)
