"""The sublayer-order language model of the sandwich transformer (Press, Smith and Levy, ACL 2020).

A model is a string ``order`` over ``{'s', 'f'}``, read left to right (input to output):

* ``'s'``: causal multi-head self-attention. With width d and h heads (d_head = d / h), for the (B, T, d) input x:
  ``Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v``, split into h heads of d_head; per head
  ``A = softmax(Q K^T / sqrt(d_head) + M) V`` with ``M[i, j] = -inf`` for ``j > i`` (position i sees 0..i),
  attention dropout on the softmax in training; the heads concatenated, then ``A W_o + b_o``.
  Four d x d weight matrices: 4 d^2 weights.
* ``'f'``: feed-forward ``relu(x W_1 + b_1) W_2 + b_2`` with W_1 d x 4d and W_2 4d x d: 8 d^2 weights, the
  weights of two ``'s'``.

Every sublayer is a post-norm residual with a LayerNorm of its own (the sandwich code's ordering):
``h = LayerNorm(h + dropout(sublayer(h)))``. :class:`SublayerLM` embeds tokens (embedding E, vocab x d) and adds
a learned positional embedding (max_len x d), runs the sublayers in string order, and projects with the tied
embedding: ``logits = h E^T + b_out``. There is no final LayerNorm and no dropout on the embeddings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..search.config import check_positive_int

SUBLAYERS = ("s", "f")  # self-attention, feed-forward
FF_MULT = 4  # the feed-forward's hidden width is FF_MULT * d_model


def check_order(order) -> str:
    """Return ``order`` if it is a non-empty str of only ``'s'`` and ``'f'``; else raise ValueError naming it."""
    if not isinstance(order, str) or not order or set(order) - set(SUBLAYERS):
        raise ValueError(f"order: expected a non-empty string of 's' (self-attention) and 'f' (feed-forward) "
                         f"sublayers, got {order!r}")
    return order


def sublayer_weights(order: str, d: int) -> int:
    """The paper's parameter count of ``order`` at width ``d``: 4 d^2 per ``'s'`` plus 8 d^2 per ``'f'`` (weight
    matrices only: no biases, LayerNorms or embeddings)."""
    check_order(order)
    check_positive_int("d", d)
    return (4 * order.count("s") + 8 * order.count("f")) * d * d


def count_parameters(model: nn.Module) -> int:
    """The number of scalars in ``model.parameters()`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """A Linear with Xavier-uniform weights and zero bias (the fairseq initialisation)."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class SelfAttentionSublayer(nn.Module):
    """``'s'``: ``LayerNorm(h + dropout(MHA(h)))`` with causal multi-head attention (module docstring).

    Parameters: ``q``, ``k``, ``v``, ``out`` (Linear d -> d each) and ``norm`` (LayerNorm(d)). The attention is
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout if training else 0)``."""

    kind = "s"

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.d_model, self.heads, self.dropout = d_model, heads, dropout
        self.q, self.k, self.v, self.out = (_linear(d_model, d_model) for _ in range(4))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        H = self.heads

        def split(x):  # (B, T, d) -> (B, H, T, d_head)
            return x.view(B, T, H, d // H).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        a = self.out(a.transpose(1, 2).reshape(B, T, d))
        return self.norm(h + F.dropout(a, self.dropout, self.training))


class FeedForwardSublayer(nn.Module):
    """``'f'``: ``LayerNorm(h + dropout(fc2(relu(fc1(h)))))``; ``fc1`` Linear d -> 4d, ``fc2`` Linear 4d -> d,
    ``norm`` LayerNorm(d)."""

    kind = "f"

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.fc1 = _linear(d_model, FF_MULT * d_model)
        self.fc2 = _linear(FF_MULT * d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + F.dropout(self.fc2(torch.relu(self.fc1(h))), self.dropout, self.training))


class SublayerLM(nn.Module):
    """A causal language model whose sublayers follow ``order`` (module docstring).

    ``forward(tokens)`` maps (B, T) integer ids, 1 <= T <= ``max_len``, to (B, T, vocab_size) logits:
    ``h = embed[tokens] + pos[0:T]``; each sublayer in order; ``logits = h @ embed^T + out_bias``.

    Parameters: ``embed.weight`` (vocab x d, normal with std d^-1/2, tied to the output), ``pos.weight``
    (max_len x d, normal with std d^-1/2), ``layers.i.*`` (the i-th sublayer: :class:`SelfAttentionSublayer` or
    :class:`FeedForwardSublayer`), ``out_bias`` (vocab, zeros).
    """

    def __init__(self, vocab_size: int, order: str, d_model: int = 64, heads: int = 4, dropout: float = 0.1,
                 max_len: int = 64):
        super().__init__()
        self.order = check_order(order)
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("d_model", d_model)
        check_positive_int("heads", heads)
        if d_model % heads:
            raise ValueError(f"heads: expected a divisor of d_model ({d_model}), got {heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_positive_int("max_len", max_len)
        self.vocab_size, self.d_model, self.heads = vocab_size, d_model, heads
        self.dropout, self.max_len = float(dropout), max_len
        std = 1.0 / math.sqrt(d_model)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, 0.0, std)
        self.pos = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.pos.weight, 0.0, std)
        self.layers = nn.ModuleList(
            SelfAttentionSublayer(d_model, heads, self.dropout) if c == "s" else FeedForwardSublayer(d_model,
                                                                                                     self.dropout)
            for c in order)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            dtype = f" {tokens.dtype}" if isinstance(tokens, torch.Tensor) else ""
            raise ValueError(f"tokens: expected a (batch, time) tensor of integer token ids, got {shape}{dtype}")
        T = tokens.size(1)
        if not 1 <= T <= self.max_len:
            raise ValueError(f"tokens: expected a sequence length in [1, max_len = {self.max_len}], got {T}")
        h = self.embed(tokens) + self.pos.weight[:T]
        for layer in self.layers:
            h = layer(h)
        return h @ self.embed.weight.t() + self.out_bias

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
