"""I-DARTS (Jiang et al., EMNLP 2019): one softmax per node over every (input, candidate) pair entering it.

DARTS normalises each edge on its own; I-DARTS normalises a node's whole block of arch logits at once, 'none'
included (as the author's code does), so the edges into a node compete:
``a[k | j, i] = exp(w[k, j, i]) / sum_{j' < i} sum_k' exp(w[k', j', i])``. The node is the same mixed sum as in
DARTS with these weights, so the fused edge (CNN) and the fused RNN sequence run unchanged; only the weights
and the genotype rule differ. The architecture step is DARTS's (first or second order).

RNN (the paper's space; ``jiangyingjunn/i-darts rnn/model_search.py``): each node keeps one (input, activation)
pair: the input whose best non-'none' joint weight is largest, except that a node after the first never takes
s0 (the state computed from x_t and h_{t-1}): it takes the second-ranked input instead (``forbid_s0``, on as in
the code); on the input the best activation.

CNN (our extension, not in the paper): the same joint softmax over each node's (2 + i) x 8 block; the genotype
keeps the two best (input, operation) pairs of the block, which may share an input
(:func:`pynas.cnn.genotypes.parse_cell_pairs`; ``distinct_inputs`` forces two inputs as DARTS's cells have).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..cnn import Network
from ..cnn.genotypes import Genotype, cells, parse_cell_pairs
from ..rnn import genotypes as rnn_genotypes
from ..rnn.model_search import RNNModelSearch
from .base import node_blocks, node_softmax
from .darts import DARTSMethod


class IDARTSNetwork(Network):
    """The DARTS CNN supernet with I-DARTS's weights (one softmax per node); ``distinct_inputs`` for the genotype."""

    def __init__(self, *args, distinct_inputs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._distinct_inputs = bool(distinct_inputs)

    def _method_kwargs(self) -> dict:
        return {"distinct_inputs": self._distinct_inputs}

    def cell_weights(self):
        sizes = node_blocks(self._steps, 2)
        return node_softmax(self.alphas_normal, sizes), node_softmax(self.alphas_reduce, sizes)

    def genotype(self) -> Genotype:
        sizes = node_blocks(self._steps, 2)
        with torch.no_grad():
            normal, reduce = (parse_cell_pairs(node_softmax(a.detach(), sizes), self._steps, self._primitives,
                                               self._distinct_inputs)
                              for a in (self.alphas_normal, self.alphas_reduce))
        return cells(normal, reduce, self._steps, self._multiplier)


class IDARTSMethod(DARTSMethod):
    """I-DARTS on the CNN space: DARTS's steps and defaults on :class:`IDARTSNetwork`."""

    name = "idarts"

    def network_class(self):
        return IDARTSNetwork

    def network_kwargs(self) -> dict:
        return {"distinct_inputs": self.cfg.distinct_inputs}


# -- the RNN space ------------------------------------------------------------------------------------------


def rnn_probs(weights: torch.Tensor, steps: int) -> torch.Tensor:
    """The (edges, candidates) weights of the RNN cell: node i's (i + 1) x 5 block under one softmax."""
    return node_softmax(weights, node_blocks(steps, 1))


def parse_recurrent_joint(probs: torch.Tensor, steps: int, primitives: Sequence[str],
                          forbid_s0: bool = True) -> List[Tuple[str, int]]:
    """I-DARTS's RNN genotype (``_parse_global``) from the jointly normalised weights: per node the input with the
    largest best non-'none' weight (for a node after the first, the second-ranked one where that is s0, unless
    ``forbid_s0`` is off), and on it the best non-'none' activation. Ties keep the earlier index."""
    return rnn_genotypes.parse_recurrent(probs, steps, primitives, forbid_s0)


class IDARTSRNNModel(RNNModelSearch):
    """The DARTS RNN search model with I-DARTS's weights (one softmax per node, 'none' inside) and genotype rule;
    ``forbid_s0`` as :func:`parse_recurrent_joint`."""

    def __init__(self, *args, forbid_s0: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.forbid_s0 = bool(forbid_s0)
        steps = rnn_genotypes.STEPS
        for rnn in self.rnns:
            rnn.probs_fn = lambda w: rnn_probs(w, steps)

    def new(self) -> "IDARTSRNNModel":
        model_new = super().new()
        model_new.forbid_s0 = self.forbid_s0
        return model_new

    clone = new

    def genotype(self):
        steps = rnn_genotypes.STEPS
        with torch.no_grad():
            gene = parse_recurrent_joint(rnn_probs(self.weights.detach(), steps), steps, rnn_genotypes.PRIMITIVES,
                                         self.forbid_s0)
        return rnn_genotypes.Genotype(recurrent=gene, concat=list(range(steps + 1))[-rnn_genotypes.CONCAT:])
