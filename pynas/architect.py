"""The DARTS architect: the alpha step, first order or second order (unrolled).

The second-order step is done in place on the model: no copy of the network is
built. The weights are saved once, overwritten by the virtual step and the two
finite-difference perturbations, and restored bit for bit from the saved copy.
BatchNorm running statistics are restored after the pass at the virtual
weights, as the reference code runs that pass on a throw-away model.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .ops import multi_tensor as mt


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


def settings_from_args(args) -> dict:
    """Architect keyword arguments from a reference-code ``args`` namespace (``fd_r`` optional)."""
    missing = [k for k in ("momentum", "weight_decay", "arch_learning_rate", "arch_weight_decay")
               if not hasattr(args, k)]
    if missing:
        raise ValueError(f"args: missing {', '.join(missing)}")
    return dict(momentum=args.momentum, weight_decay=args.weight_decay,
                arch_learning_rate=args.arch_learning_rate, arch_weight_decay=args.arch_weight_decay,
                fd_r=getattr(args, "fd_r", 0.01))


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


class Architect(ArchitectBase):
    """Owns the arch optimizer (Adam) and computes ``grad_alpha`` for one step.

    Args:
        model: a search network with ``parameters()``, ``arch_parameters()`` and ``_loss(x, y)``.
        momentum, weight_decay: the weight optimizer's, used by the virtual step.
        arch_learning_rate, arch_weight_decay, arch_betas: the arch Adam's settings.
        fd_r: the finite-difference radius r (``R = r / ||v||``).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.9, weight_decay: float = 3e-4,
                 arch_learning_rate: float = 3e-4, arch_weight_decay: float = 1e-3,
                 arch_betas=(0.5, 0.999), fd_r: float = 0.01):
        super().__init__(model, weight_decay, arch_learning_rate, arch_weight_decay, arch_betas, fd_r)
        self.network_momentum = float(momentum)

    # -- public ------------------------------------------------------------------
    def step(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled):
        """One arch step: set ``alpha.grad`` (first or second order) and step Adam."""
        self.optimizer.zero_grad()
        if unrolled:
            grads = self.unrolled_grad(input_train, target_train, input_valid, target_valid, eta,
                                       network_optimizer)
        else:
            grads = self.first_order_grad(input_valid, target_valid)
        for a, g in zip(self.model.arch_parameters(), grads):
            a.grad = g
        self.optimizer.step()

    def first_order_grad(self, input_valid, target_valid) -> List[torch.Tensor]:
        """``dL_val(w, alpha)/dalpha``."""
        loss = self.model._loss(input_valid, target_valid)
        return _grad(loss, self.model.arch_parameters())

    @torch.no_grad()
    def _virtual_step(self, params, grads, eta, network_optimizer):
        """w <- w - eta * (momentum * buf + g + wd * w), in place (one multi-tensor pass)."""
        bufs = _momentum_buffers(params, network_optimizer)
        mt.virtual_step_(params, grads, bufs, eta, self.network_momentum, self.network_weight_decay)

    def unrolled_grad(self, input_train, target_train, input_valid, target_valid, eta,
                      network_optimizer) -> List[torch.Tensor]:
        """The second-order ``grad_alpha`` of DARTS, computed in place on the model.

        1. w' = w - eta * (momentum * buf + dL_train(w)/dw + wd * w)
        2. dalpha, v = dL_val(w', alpha)/d(alpha, w')
        3. R = r / ||v||;  g+- = dL_train(w +- R v)/dalpha   (at the ORIGINAL w)
        4. grad_alpha = dalpha - eta * (g+ - g-) / (2 R);  w restored exactly.
        """
        model = self.model
        params = [p for p in model.parameters()]
        alphas = list(model.arch_parameters())
        eta = float(eta)
        # Every pass over the weights is one multi-tensor op (pynas.ops.multi_tensor), not a loop over
        # ~1000 tensors.
        saved = self._snapshot("weights", params)
        try:
            loss = model._loss(input_train, target_train)
            g_train = _grad(loss, params)
            self._virtual_step(params, list(g_train), eta, network_optimizer)
            del g_train, loss

            buffers = list(model.buffers())
            saved_buffers = self._snapshot("buffers", buffers)
            loss_val = model._loss(input_valid, target_valid)
            grads = _grad(loss_val, alphas + params)
            _copy_all(buffers, saved_buffers)
            dalpha, v = list(grads[:len(alphas)]), list(grads[len(alphas):])
            del grads, loss_val

            # R = r / ||v|| stays a device tensor: no host sync anywhere in the step
            sum_sq = mt.sum_squares(v)
            R = mt.perturb_(params, saved, v, sum_sq, self.fd_r, 1.0)  # w + R v
            g_pos = _grad(model._loss(input_train, target_train), alphas)
            mt.perturb_(params, saved, v, sum_sq, self.fd_r, -1.0)  # w - R v
            g_neg = _grad(model._loss(input_train, target_train), alphas)
            with torch.no_grad():
                scale = (eta / (2.0 * R)).to(alphas[0].dtype)
                return [da - (gp - gn) * scale for da, gp, gn in zip(dalpha, g_pos, g_neg)]
        finally:
            _copy_all(params, saved)  # bit-exact restore from the copy, not by adding back


@torch.no_grad()
def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    mt.copy_(dst, src)
