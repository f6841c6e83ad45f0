"""What every gradient-based search method's architecture step shares: the arch optimizer, the virtual step's
weight decay, the finite-difference radius, and bit-exact copies of tensor lists kept across steps."""
from __future__ import annotations

import contextlib
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


def _data_parallel():
    """The active data-parallel group (pynas.search.distributed), or None."""
    from ..search.distributed import active

    return active()


class frozen:
    """Inside, ``tensors`` that require grad do not (restored on exit): a pass whose gradient is wanted for the
    architecture only then records no weight-gradient work (the fused edge's backward skips its weight gradients,
    the module path its weight-gradient GEMMs). The same values: only work nobody reads is left out."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = [t for t in tensors if t.requires_grad]

    def __enter__(self):
        for t in self.tensors:
            t.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for t in self.tensors:
            t.requires_grad_(True)
        return False


def _grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``d loss / d inputs``, with zeros for inputs the loss does not use (e.g. the normal-cell
    alphas of a network whose every cell is a reduction cell)."""
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    out = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    group = _data_parallel()
    return out if group is None else group.average(out)  # data-parallel: the global batch's gradient

class ArchitectBase:
    """What the CNN and RNN architects share: the model, the arch optimizer (Adam), the virtual step's weight
    decay, the finite-difference radius, and copies of tensor lists kept across steps (the bit-exact restores
    of the second-order step)."""

    def __init__(self, arch_parameters: Sequence[torch.Tensor], weight_decay: float, arch_learning_rate: float,
                 arch_weight_decay: float, arch_betas, fd_r: float):
        if not (fd_r > 0):
            raise ValueError(f"fd_r: expected a positive finite-difference radius, got {fd_r!r}")
        self.network_weight_decay = float(weight_decay)
        self.fd_r = float(fd_r)
        self.optimizer = torch.optim.Adam(list(arch_parameters), lr=arch_learning_rate,
                                          betas=tuple(arch_betas), weight_decay=arch_weight_decay)

    #: Whether the passes that need the gradient w.r.t. alpha only (the first-order step, the finite
    #: differences) run with the weights' requires_grad off (:class:`frozen`): no weight-gradient work, the
    #: same values. Off by default: a foreign model's weights may carry autograd hooks tied to their grad
    #: accumulators (torch's DDP); the architects of pynas's own networks turn it on.
    freeze_weights = False

    def _weights(self) -> List[torch.Tensor]:
        """The weights :meth:`_alpha_only` freezes."""
        raise NotImplementedError

    def _alpha_only(self):
        return frozen(self._weights()) if self.freeze_weights else contextlib.nullcontext()

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


def node_blocks(steps: int, first: int) -> List[int]:
    """Edges entering each node, in the arch tensors' row order: ``first + i`` for node i (CNN: 2 + i, RNN: 1 + i)."""
    return [first + i for i in range(steps)]


def node_softmax(logits: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The softmax over each node's block of rows taken as one distribution (every entry of the block: all its
    (edge, candidate) pairs for a 2-D tensor, its edges for a 1-D one); ``sizes`` the rows of each block."""
    if sum(sizes) != logits.shape[0]:
        raise ValueError(f"logits: expected {sum(sizes)} rows (node blocks {list(sizes)}), got {tuple(logits.shape)}")
    out = [torch.softmax(block.reshape(-1), dim=0).view_as(block) for block in torch.split(logits, list(sizes), 0)]
    return torch.cat(out, 0)


class CNNMethod:
    """A search method on the CNN space, driven by :class:`pynas.search.cnn.CNNSearch`: it builds the supernet, the
    weight optimizer and the architecture step, runs one iteration, derives the genotype and (optionally) finishes
    the run after the last epoch (random search with weight sharing ranks its samples there).

    ``DEFAULTS``: the method's settings where they differ from DARTS's (its paper's and code's); ``SECOND_ORDER``:
    whether the unrolled step applies."""

    name = ""
    DEFAULTS: dict = {}
    SECOND_ORDER = True
    HAS_ARCH_STEP = True  # False: no architecture step (``warmup_epochs`` does not apply)

    def __init__(self, search):
        self.search = search
        self.cfg = search.cfg

    # what the search calls
    def build_model(self, num_classes: int, criterion: nn.Module) -> nn.Module:
        raise NotImplementedError

    #: Whether an iteration leaves some weights without a gradient (a sampled path): the weight SGD is then torch's
    #: foreach one, which skips those weights (no momentum, no weight decay that step); the fused kernel cannot.
    SAMPLED_PATHS = False

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from ..search.config import _weight_optimizer

        cfg = self.cfg
        if self.SAMPLED_PATHS:
            return torch.optim.SGD(model.parameters(), cfg.learning_rate, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=bool(cfg.nesterov))
        return _weight_optimizer(model.parameters(), cfg)

    def build_architect(self, model: nn.Module):
        """The architecture step (an object with ``optimizer``), or None for a method without one."""
        return None

    def start_epoch(self, epoch: int) -> dict:
        """Called before each epoch's iterations; returns figures for the epoch's record (e.g. GDAS's tau)."""
        return {}

    def iteration(self, x, y, xv, yv, lr: float, epoch: int):
        """One search iteration on a (train, valid) batch pair: returns (the weight step's loss, its logits)."""
        raise NotImplementedError

    def weight_step(self, x, y):
        """The SGD step of the weights on a train batch, the gradient clipped to ``grad_clip``: (loss, logits)."""
        search = self.search
        search.optimizer.zero_grad()
        logits = search.model(x)
        loss = search.criterion(logits, y)
        loss.backward()
        group = _data_parallel()
        if group is not None:  # data-parallel: the global batch's gradient, before the clipping
            group.average_grads_(search.model.parameters())
        nn.utils.clip_grad_norm_(search.model.parameters(), self.cfg.grad_clip)
        search.optimizer.step()
        return loss, logits

    def genotype(self):
        return self.search.model.genotype()

    def finish(self) -> Optional[dict]:
        """After the last epoch: a record of what the method did to end the run (kept in the checkpoint), or None."""
        return None

    def final_record(self) -> Optional[dict]:
        """The record :meth:`finish` returned, once it has run (None before, and for a method without one)."""
        return None

    def load_final(self, record: Optional[dict]) -> None:
        """Take :meth:`final_record` back from a checkpoint."""


    @staticmethod
    def check_config(cfg) -> None:
        """The method's own checks of the settings (ValueError naming the setting)."""
