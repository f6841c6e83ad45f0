"""What every gradient-based search method's architecture step shares: the arch optimizer, the virtual step's
weight decay, the finite-difference radius, and bit-exact copies of tensor lists kept across steps."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..ops import multi_tensor as mt


def _momentum_buffers(params: Sequence[torch.Tensor], optimizer: Optional[torch.optim.Optimizer]):
    """The weight optimizer's momentum buffers, or ``None`` for each param that has none yet."""
    if optimizer is None:
        return [None] * len(params)
    out = []
    for p in params:
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if hasattr(optimizer, "state") else None
        out.append(buf)
    return out


def _grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``d loss / d inputs``, with zeros for inputs the loss does not use (e.g. the normal-cell
    alphas of a network whose every cell is a reduction cell)."""
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

class ArchitectBase:
    """What the CNN and RNN architects share: the model, the arch optimizer (Adam), the virtual step's weight
    decay, the finite-difference radius, and copies of tensor lists kept across steps (the bit-exact restores
    of the second-order step)."""

    def __init__(self, model: nn.Module, weight_decay: float, arch_learning_rate: float, arch_weight_decay: float,
                 arch_betas, fd_r: float):
        if not (fd_r > 0):
            raise ValueError(f"fd_r: expected a positive finite-difference radius, got {fd_r!r}")
        self.model = model
        self.network_weight_decay = float(weight_decay)
        self.fd_r = float(fd_r)
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=arch_learning_rate,
                                          betas=tuple(arch_betas), weight_decay=arch_weight_decay)

    def _snapshot(self, key: str, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Copies of ``tensors`` in buffers kept across steps (re-allocated when the tensors change)."""
        cache = self.__dict__.setdefault("_snapshots", {})
        spec = [(t.shape, t.dtype, t.device) for t in tensors]
        entry = cache.get(key)
        if entry is None or entry[0] != spec:
            entry = (spec, [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors])
            cache[key] = entry
        _copy_all(entry[1], tensors)
        return entry[1]


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    mt.copy_(dst, src)
