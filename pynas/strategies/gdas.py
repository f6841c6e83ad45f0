"""GDAS (Dong and Yang, CVPR 2019; ``D-X-Y/AutoDL-Projects``): one candidate per edge, sampled with the
Gumbel-max trick, trained through straight-through Gumbel-softmax weights.

Once per network forward and cell type (every cell of the type shares the sample)::

    g     = -log(E),  E ~ Exponential(1)          (standard Gumbel, one per (edge, candidate))
    probs = softmax((log_softmax(alpha) + g) / tau)
    index = argmax(probs);  hard = one_hot(index) - probs.detach() + probs
    resampled while g or probs hold an inf or a nan

Each edge computes only its sampled candidate (the fused edge over that one candidate,
:meth:`pynas.cnn.MixedOp.forward` with ``selected``): ``hard[index] * op_index(x)``; with ``gdas_unselected =
'scalar'`` (the default: the paper's straight-through sum, the code's NAS-Bench-201 cell) every other candidate
adds the scalar ``hard[k]``, whose value is 0 and whose gradient is the sum of the edge's output gradient, so every
alpha of the edge gets a gradient; with ``'drop'`` (the code's DARTS-space cell) only the sampled term is kept.
'none' is a legal sample (its term is zero). Only the sampled candidates' BatchNorm statistics move.

Each iteration: the weight step on the train batch (SGD, Nesterov, clip 5), then the architecture step on the
valid batch (Adam, no clip), each with its own sample; first order only. The temperature falls linearly over the
epochs, ``tau = tau_max - (tau_max - tau_min) * epoch / (epochs - 1)``, 10 to 0.1. In eval mode (the per-epoch
validation) each edge takes its argmax candidate, unsampled. Defaults (the DARTS-space config): batch 256, lr
0.025 cosine to 0.001, momentum 0.9, Nesterov, wd 5e-4, 250 epochs, 6 cells (two per stage), arch Adam lr 3e-4,
betas (0.5, 0.999), wd 1e-3. The genotype keeps per node the two best (input, operation) pairs of the per-edge
softmax, which may share an input (:func:`pynas.cnn.genotypes.parse_cell_pairs`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..cnn import Network
from ..cnn.genotypes import Genotype, cells, parse_cell_pairs
from ..cnn.model_search import CellWeights
from .base import CNNMethod, _grad

#: Draws tried before a non-finite sample is an error (a finite alpha gives a finite sample almost surely).
MAX_DRAWS = 100


def gumbel_hard(alpha: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hard, index): the straight-through weights (edges, candidates) and the sampled candidate of each edge."""
    logp = F.log_softmax(alpha, dim=-1)
    for _ in range(MAX_DRAWS):
        g = -torch.empty_like(alpha).exponential_().log()
        probs = F.softmax((logp + g) / tau, dim=-1)
        if bool(torch.isfinite(g).all()) and bool(torch.isfinite(probs).all()):
            break
    else:
        raise FloatingPointError(f"alpha: {MAX_DRAWS} Gumbel draws gave no finite sample (is alpha finite?)")
    index = probs.argmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index.unsqueeze(-1), 1.0)
    return one_hot - probs.detach() + probs, index


class GDASNetwork(Network):
    """The DARTS CNN supernet sampled by GDAS: ``tau`` the temperature, ``unselected`` 'scalar' or 'drop'."""

    def __init__(self, *args, unselected: str = "scalar", distinct_inputs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if unselected not in ("scalar", "drop"):
            raise ValueError(f"gdas_unselected: expected 'scalar' or 'drop', got {unselected!r}")
        self.unselected = unselected
        self._distinct_inputs = bool(distinct_inputs)
        self.tau = 10.0
        self.last_index = None  # the sampled candidates of the last forward: (normal, reduce) lists

    def _method_kwargs(self) -> dict:
        return {"unselected": self.unselected, "distinct_inputs": self._distinct_inputs}

    def cell_weights(self):
        hards, indices = [], []
        for alpha in (self.alphas_normal, self.alphas_reduce):
            if self.training:
                hard, index = gumbel_hard(alpha, self.tau)
            else:  # eval: the argmax candidates, unsampled
                index = alpha.detach().argmax(dim=-1)
                hard = torch.zeros_like(alpha).scatter_(-1, index.unsqueeze(-1), 1.0)
            hards.append(hard)
            indices.append(index)
        both = torch.stack(indices).tolist()  # one host sync per forward: which kernels to run
        self.last_index = both
        straight = self.training and self.unselected == "scalar"
        return tuple(CellWeights(h, selected=[(k,) for k in idx], straight_through=straight)
                     for h, idx in zip(hards, both))

    def genotype(self) -> Genotype:
        genes = [parse_cell_pairs(F.softmax(a.detach(), dim=-1), self._steps, self._primitives, self._distinct_inputs)
                 for a in (self.alphas_normal, self.alphas_reduce)]
        return cells(genes[0], genes[1], self._steps, self._multiplier)


class _ArchStep:
    """GDAS's architecture step: Adam on alpha with the gradient of the valid loss (its own sample)."""

    def __init__(self, model, cfg):
        self.model = model
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=cfg.arch_learning_rate, betas=(0.5, 0.999),
                                          weight_decay=cfg.arch_weight_decay)

    def step(self, criterion, xv, yv):
        self.optimizer.zero_grad()
        loss = criterion(self.model(xv), yv)
        for a, g in zip(self.model.arch_parameters(), _grad(loss, self.model.arch_parameters())):
            a.grad = g
        self.optimizer.step()
        return loss


class GDASMethod(CNNMethod):
    """GDAS on the CNN space: the weight step, then the architecture step, each on its own Gumbel sample."""

    name = "gdas"
    SECOND_ORDER = False
    SAMPLED_PATHS = True
    DEFAULTS = dict(batch_size=256, learning_rate=0.025, learning_rate_min=0.001, momentum=0.9, nesterov=True,
                    weight_decay=5e-4, epochs=250, layers=6, arch_learning_rate=3e-4, arch_weight_decay=1e-3,
                    grad_clip=5.0)

    def build_model(self, num_classes, criterion):
        cfg = self.cfg
        return GDASNetwork(cfg.init_channels, num_classes, cfg.layers, criterion, unselected=cfg.gdas_unselected,
                           distinct_inputs=cfg.distinct_inputs)

    def build_architect(self, model):
        return _ArchStep(model, self.cfg)

    def tau(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.epochs == 1:
            return float(cfg.tau_max)
        return cfg.tau_max - (cfg.tau_max - cfg.tau_min) * epoch / (cfg.epochs - 1)

    def start_epoch(self, epoch):
        self.search.model.tau = self.tau(epoch)
        return {"tau": self.search.model.tau}

    def iteration(self, x, y, xv, yv, lr, epoch):
        model = self.search.model
        model.tau = self.tau(epoch)
        out = self.weight_step(x, y)
        if epoch >= self.cfg.warmup_epochs:
            self.search.architect.step(self.search.criterion, xv, yv)
        return out
