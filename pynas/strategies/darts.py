"""DARTS (Liu, Simonyan and Yang, ICLR 2019): the architecture step, first order or second order (unrolled),
for the CNN space (:class:`CNNArchitect`) and the RNN space (:class:`RNNArchitect`).

CNN. The second-order step is done in place on the model: no copy of the network is built. The weights are
saved once, overwritten by the virtual step and the two finite-difference perturbations, and restored bit for
bit from the saved copy. BatchNorm running statistics are restored after the pass at the virtual weights, as
the reference code runs that pass on a throw-away model.

RNN. The RNN variant of the second-order step (docs/darts.md, "The second-order step"): no momentum, the training
gradient clipped to ``clip`` (0.25) in the virtual step, w' = w - eta (coef g + wd w) with
coef = min(1, clip / (||g|| + 1e-6)), and the finite-difference correction scaled by that clip coefficient:
it is exactly the factor dw'/dalpha carries (-eta coef d g / d alpha, the coefficient held constant), so
with a small radius the step matches the exact hypergradient. (The reference code multiplies by the raw
ratio clip / (||g|| + 1e-6) even where it exceeds 1 and nothing was clipped, and also clips v; with R = r / ||v||
clipping v only rescales the correction once more. Neither is reproduced.) The finite difference is taken at
the original weights on the training batch, as in the CNN step (the reference takes it at the virtual
weights; docs/darts.md, "Departures from the original code"). Every pass over the weights is one multi-tensor op
(:mod:`pynas.ops.multi_tensor`); the clip coefficient and R stay on the device, so the step has no host sync.

BatchNorm running statistics: only the first training pass updates them; they are restored after the
later passes (the reference runs the validation pass at w' on a throw-away copy of the model; its
finite-difference passes would update them).
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn

from ..ops import multi_tensor as mt
from .base import ArchitectBase, CNNMethod, _copy_all, _grad, _momentum_buffers


def settings_from_args(args) -> dict:
    """Architect keyword arguments from a reference-code ``args`` namespace (``fd_r`` optional)."""
    missing = [k for k in ("momentum", "weight_decay", "arch_learning_rate", "arch_weight_decay")
               if not hasattr(args, k)]
    if missing:
        raise ValueError(f"args: missing {', '.join(missing)}")
    return dict(momentum=args.momentum, weight_decay=args.weight_decay,
                arch_learning_rate=args.arch_learning_rate, arch_weight_decay=args.arch_weight_decay,
                fd_r=getattr(args, "fd_r", 0.01))

def _tensor_list(name: str, tensors) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name}: expected an iterable of tensors (e.g. model.parameters()), got one tensor")
    try:
        out = list(tensors)
    except TypeError:
        raise TypeError(f"{name}: expected an iterable of tensors, got {type(tensors).__name__}") from None
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected tensors, got a {type(t).__name__}")
    return out


class Architect(ArchitectBase):
    """DARTS's architecture step for any model: given its weights, its architecture parameters and a loss
    function, not a pynas network, so that other DARTS code can replace its own architect (and the known bugs
    of some second-order steps) with this exact, in-place one, which reads nothing back to the host.

    Args:
        parameters: the weights w (``requires_grad``), those the weight optimizer steps; not the arch ones.
        arch_parameters: alpha (``requires_grad``), stepped by this object's Adam (``optimizer``).
        loss_fn: ``loss_fn(input, target) -> loss`` (a 0-d tensor) of the model at its current weights.
        buffers: the model's buffers (BatchNorm running statistics): restored after the pass at the virtual
            weights, which the original code runs on a throw-away copy (``model.buffers()``; None: none).
        momentum, weight_decay: the weight optimizer's (SGD), used by the virtual step.
        arch_learning_rate, arch_weight_decay, arch_betas: the arch Adam's settings (DARTS's defaults).
        fd_r: the finite-difference radius r (``R = r / ||v||``).

    :meth:`for_model` builds one from a model (its parameters minus the arch ones, its buffers).
    """

    def __init__(self, parameters, arch_parameters, loss_fn: Callable[..., torch.Tensor], *, buffers=None,
                 momentum: float = 0.9, weight_decay: float = 3e-4, arch_learning_rate: float = 3e-4,
                 arch_weight_decay: float = 1e-3, arch_betas=(0.5, 0.999), fd_r: float = 0.01):
        params = _tensor_list("parameters", parameters)
        alphas = _tensor_list("arch_parameters", arch_parameters)
        bufs = [] if buffers is None else _tensor_list("buffers", buffers)
        if not params:
            raise ValueError("parameters: expected at least one weight tensor, got none")
        if not alphas:
            raise ValueError("arch_parameters: expected at least one architecture tensor, got none")
        for name, ts in (("parameters", params), ("arch_parameters", alphas)):
            if not all(t.requires_grad for t in ts):
                raise ValueError(f"{name}: every tensor must require grad (a frozen one has no gradient to step)")
        shared = {id(a) for a in alphas} & {id(p) for p in params}
        if shared:
            raise ValueError(f"parameters: {len(shared)} of them are also arch_parameters (pass the weights only)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(input, target) -> loss, got {type(loss_fn).__name__}")
        super().__init__(alphas, weight_decay, arch_learning_rate, arch_weight_decay, arch_betas, fd_r)
        self.network_momentum = float(momentum)
        self.parameters, self.arch_parameters, self.buffers = params, alphas, bufs
        self.loss_fn = loss_fn

    @classmethod
    def for_model(cls, model: nn.Module, arch_parameters=None, loss_fn=None, **settings) -> "Architect":
        """An architect over ``model``'s weights (its parameters that require grad, the arch ones excepted) and
        buffers; ``arch_parameters`` default ``model.arch_parameters()``, ``loss_fn`` default ``model._loss``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if arch_parameters is None:
            if not callable(getattr(model, "arch_parameters", None)):
                raise ValueError("arch_parameters: the model has no arch_parameters(); pass its architecture tensors")
            arch_parameters = model.arch_parameters()
        alphas = _tensor_list("arch_parameters", arch_parameters)
        if loss_fn is None:
            if not callable(getattr(model, "_loss", None)):
                raise ValueError("loss_fn: the model has no _loss(input, target); pass a loss function")
            loss_fn = model._loss
        ids = {id(a) for a in alphas}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return cls(weights, alphas, loss_fn, buffers=list(model.buffers()), **settings)

    # -- public ------------------------------------------------------------------
    def step(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled):
        """One arch step: set ``alpha.grad`` (first or second order) and step Adam. ``eta``: the weight
        optimizer's current learning rate; ``network_optimizer``: the weight optimizer (its momentum buffers)."""
        self.optimizer.zero_grad()
        if unrolled:
            grads = self.unrolled_grad(input_train, target_train, input_valid, target_valid, eta,
                                       network_optimizer)
        else:
            grads = self.first_order_grad(input_valid, target_valid)
        for a, g in zip(self.arch_parameters, grads):
            a.grad = g
        self.optimizer.step()

    def _weights(self) -> List[torch.Tensor]:
        return self.parameters

    def first_order_grad(self, input_valid, target_valid) -> List[torch.Tensor]:
        """``dL_val(w, alpha)/dalpha``."""
        with self._alpha_only():
            return _grad(self.loss_fn(input_valid, target_valid), self.arch_parameters)

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
        loss_fn, params, alphas = self.loss_fn, self.parameters, self.arch_parameters
        eta = float(eta)
        # Every pass over the weights is one multi-tensor op (pynas.ops.multi_tensor), not a loop over
        # ~1000 tensors.
        saved = self._snapshot("weights", params)
        try:
            loss = loss_fn(input_train, target_train)
            g_train = _grad(loss, params)
            self._virtual_step(params, list(g_train), eta, network_optimizer)
            del g_train, loss

            saved_buffers = self._snapshot("buffers", self.buffers)
            loss_val = loss_fn(input_valid, target_valid)
            grads = _grad(loss_val, alphas + params)
            _copy_all(self.buffers, saved_buffers)
            dalpha, v = list(grads[:len(alphas)]), list(grads[len(alphas):])
            del grads, loss_val

            # R = r / ||v|| stays a device tensor: no host sync anywhere in the step
            sum_sq = mt.sum_squares(v)
            R = mt.perturb_(params, saved, v, sum_sq, self.fd_r, 1.0)  # w + R v
            with self._alpha_only():
                g_pos = _grad(loss_fn(input_train, target_train), alphas)
            mt.perturb_(params, saved, v, sum_sq, self.fd_r, -1.0)  # w - R v
            with self._alpha_only():
                g_neg = _grad(loss_fn(input_train, target_train), alphas)
            with torch.no_grad():
                scale = (eta / (2.0 * R)).to(alphas[0].dtype)
                return [da - (gp - gn) * scale for da, gp, gn in zip(dalpha, g_pos, g_neg)]
        finally:
            _copy_all(params, saved)  # bit-exact restore from the copy, not by adding back


class CNNArchitect(Architect):
    """:class:`Architect` over a pynas CNN search network: ``model.parameters()``, ``model.arch_parameters()``,
    ``model._loss(x, y)`` and ``model.buffers()``.

    Args:
        model: a search network with ``parameters()``, ``arch_parameters()`` and ``_loss(x, y)``.
        momentum, weight_decay: the weight optimizer's, used by the virtual step.
        arch_learning_rate, arch_weight_decay, arch_betas: the arch Adam's settings.
        fd_r: the finite-difference radius r (``R = r / ||v||``).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.9, weight_decay: float = 3e-4,
                 arch_learning_rate: float = 3e-4, arch_weight_decay: float = 1e-3,
                 arch_betas=(0.5, 0.999), fd_r: float = 0.01):
        super().__init__(model.parameters(), model.arch_parameters(), model._loss, buffers=model.buffers(),
                         momentum=momentum, weight_decay=weight_decay, arch_learning_rate=arch_learning_rate,
                         arch_weight_decay=arch_weight_decay, arch_betas=arch_betas, fd_r=fd_r)
        self.model = model
        self.freeze_weights = True


class DARTSMethod(CNNMethod):
    """DARTS on the CNN space (:class:`pynas.search.cnn.CNNSearch`): each iteration the architect steps alpha on
    the (train, valid) pair, first or second order, then SGD steps the weights on the train batch. With
    ``warmup_epochs`` the first epochs train the weights only (PC-DARTS's warm-up; DARTS: 0)."""

    name = "darts"

    def network_class(self):
        from ..cnn import Network

        return Network

    def network_kwargs(self) -> dict:
        return {}

    def build_model(self, num_classes, criterion):
        cfg = self.cfg
        return self.network_class()(cfg.init_channels, num_classes, cfg.layers, criterion, **self.network_kwargs())

    def build_architect(self, model):
        cfg = self.cfg
        return CNNArchitect(model, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                            arch_learning_rate=cfg.arch_learning_rate, arch_weight_decay=cfg.arch_weight_decay,
                            fd_r=cfg.fd_r)

    def iteration(self, x, y, xv, yv, lr, epoch):
        search = self.search
        if epoch >= self.cfg.warmup_epochs:
            search.architect.step(x, y, xv, yv, lr, search.optimizer, self.cfg.unrolled)
        return self.weight_step(x, y)


# -- the RNN space ------------------------------------------------------------------------------------------


def _detach_hidden(hidden):
    return [h.detach() for h in hidden]


def rnn_settings_from_args(args) -> dict:
    """Architect keyword arguments from the reference code's RNN ``args`` (``fd_r`` optional)."""
    missing = [k for k in ("wdecay", "clip", "arch_lr", "arch_wdecay") if not hasattr(args, k)]
    if missing:
        raise ValueError(f"args: missing {', '.join(missing)}")
    return dict(weight_decay=args.wdecay, clip=args.clip, arch_learning_rate=args.arch_lr,
                arch_weight_decay=args.arch_wdecay, fd_r=getattr(args, "fd_r", 0.01))


class RNNArchitect(ArchitectBase):
    """Owns the arch optimizer (Adam, default betas) of an RNN search model and steps alpha.

    Args:
        model: an :class:`~pynas.rnn.RNNModelSearch` (``parameters()``, ``arch_parameters()``,
            ``_loss(hidden, input, target) -> (loss, next_hidden)``).
        weight_decay, clip: the weight optimizer's weight decay and gradient clip, used by the virtual step.
        arch_learning_rate, arch_weight_decay, arch_betas: the arch Adam's settings.
        fd_r: the finite-difference radius r (``R = r / ||v||``).
    """

    def __init__(self, model: nn.Module, *, weight_decay: float = 5e-7, clip: float = 0.25,
                 arch_learning_rate: float = 3e-3, arch_weight_decay: float = 1e-3, arch_betas=(0.9, 0.999),
                 fd_r: float = 0.01):
        if not (clip > 0):
            raise ValueError(f"clip: expected a positive gradient clip, got {clip!r}")
        super().__init__(model.arch_parameters(), weight_decay, arch_learning_rate, arch_weight_decay, arch_betas, fd_r)
        self.model = model
        self.network_clip = float(clip)

    freeze_weights = True  # pynas's RNN models (see ArchitectBase.freeze_weights)

    def _weights(self) -> List[torch.Tensor]:
        return list(self.model.parameters())

    def step(self, hidden_train, input_train, target_train, hidden_valid, input_valid, target_valid,
             network_optimizer, unrolled):
        """One arch step; eta is the weight optimizer's current lr. Returns ``(next_hidden_valid, None)``."""
        eta = network_optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad()
        if unrolled:
            grads, hidden = self.unrolled_grad(hidden_train, input_train, target_train, hidden_valid,
                                               input_valid, target_valid, eta)
        else:
            grads, hidden = self.first_order_grad(hidden_valid, input_valid, target_valid)
        for a, g in zip(self.model.arch_parameters(), grads):
            a.grad = g
        self.optimizer.step()
        return hidden, None

    def first_order_grad(self, hidden_valid, input_valid, target_valid):
        """``(dL_val(w, alpha)/dalpha, next hidden)``."""
        with self._alpha_only():
            loss, hidden_next = self.model._loss(hidden_valid, input_valid, target_valid)
            return _grad(loss, self.model.arch_parameters()), _detach_hidden(hidden_next)

    def unrolled_grad(self, hidden_train, input_train, target_train, hidden_valid, input_valid, target_valid,
                      eta):
        """The second-order ``grad_alpha`` of the RNN search and the validation pass's next hidden state.

        1. g = dL_train(w)/dw;  w' = w - eta * (clip_coef(g) * g + wd * w)
        2. dalpha, v = dL_val(w', alpha)/d(alpha, w')
        3. R = r / ||v||;  g+- = dL_train(w +- R v)/dalpha   (at the ORIGINAL w)
        4. grad_alpha = dalpha - eta * clip_coef(g) * (g+ - g-) / (2 R);  w and the BN statistics restored.
        """
        model = self.model
        params: List[torch.Tensor] = list(model.parameters())
        alphas = list(model.arch_parameters())
        eta = float(eta)
        saved = self._snapshot("weights", params)
        buffers = list(model.buffers())
        saved_buffers = None
        try:
            loss, _ = model._loss(hidden_train, input_train, target_train)
            g_train = _grad(loss, params)
            del loss
            saved_buffers = self._snapshot("buffers", buffers)
            coef = mt.clip_coefficient(mt.sum_squares(g_train), self.network_clip)
            mt.virtual_step_(params, g_train, None, eta, 0.0, self.network_weight_decay, grad_scale=coef)
            del g_train

            loss_val, hidden_next = model._loss(hidden_valid, input_valid, target_valid)
            grads = _grad(loss_val, alphas + params)
            dalpha, v = list(grads[:len(alphas)]), list(grads[len(alphas):])
            hidden_next = _detach_hidden(hidden_next)
            del grads, loss_val

            sum_sq = mt.sum_squares(v)
            R = mt.perturb_(params, saved, v, sum_sq, self.fd_r, 1.0)  # w + R v
            with self._alpha_only():
                g_pos = _grad(model._loss(hidden_train, input_train, target_train)[0], alphas)
            mt.perturb_(params, saved, v, sum_sq, self.fd_r, -1.0)  # w - R v
            with self._alpha_only():
                g_neg = _grad(model._loss(hidden_train, input_train, target_train)[0], alphas)
            with torch.no_grad():
                scale = (eta * coef / (2.0 * R)).to(alphas[0].dtype)  # coef: the virtual step's clip
                out = [da - (gp - gn) * scale for da, gp, gn in zip(dalpha, g_pos, g_neg)]
            return out, hidden_next
        finally:
            _copy_all(params, saved)  # bit-exact restore from the copy
            if saved_buffers is not None:
                _copy_all(buffers, saved_buffers)
