"""Curvature of the validation loss in the architecture (Robust-DARTS, Zela et al., ICLR 2020).

Zela et al. observed that a DARTS search that goes wrong (cells full of skip connections and parameter-free
operations) does so while the dominant eigenvalue of the Hessian of the validation loss with respect to the
architecture parameters alpha keeps rising; DARTS-ES stops the search when it rises too fast and keeps the
architecture of a few epochs earlier. This module has the math:

- :func:`hessian_vector_product`: ``H v`` by double backward, exact (no finite differences):
  ``g = d loss / d alpha`` with ``create_graph=True``, then ``H v = d <g, v> / d alpha``.
- :func:`dominant_eigenvalue`: power iteration on those products; the eigenvalue of largest magnitude, with its
  sign (the Rayleigh quotient ``v' H v`` of the unit iterate), and its eigenvector.
- :class:`EigenvalueEarlyStop`: the DARTS-ES rule on the per-epoch eigenvalues.

All tensors in ``params`` are treated as one vector (flattened and concatenated in order), as the paper treats
the normal and reduction alphas together.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

Vector = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    n = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != n:
        raise ValueError(f"vec: expected a flat vector of {n} elements (all params together), got shape "
                         f"{tuple(flat.shape)}")
    out, start = [], 0
    for p in params:
        out.append(flat[start:start + p.numel()].view_as(p).to(dtype=p.dtype, device=p.device))
        start += p.numel()
    return out


def _check_params(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one tensor")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params: tensor {i} does not require grad")
        if not p.is_floating_point():
            raise ValueError(f"params: tensor {i} is {p.dtype}, expected a floating-point tensor")
    return params


def _loss(loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: expected a scalar tensor, got "
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    return loss.reshape(())


def _grads(loss: torch.Tensor, params: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """First derivatives as a differentiable graph (None where the loss does not use a tensor)."""
    return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def _hvp(grads: List[Optional[torch.Tensor]], params: List[torch.Tensor],
         vs: List[torch.Tensor]) -> List[torch.Tensor]:
    """``H v`` from the differentiable first derivatives (the graph is kept for the next product)."""
    terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
    if not terms:  # the loss is at most linear in params: H = 0
        return [torch.zeros_like(p) for p in params]
    dot = torch.stack(terms).sum()
    hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           vec: Vector) -> Vector:
    """``H v``, ``H`` the Hessian of ``loss_fn()`` with respect to ``params`` (exact, double backward).

    ``vec`` is either a list of tensors shaped like ``params`` or one flat vector of all their elements (in the
    order of ``params``); the product comes back in the same form. ``loss_fn`` is called once.
    """
    params = _check_params(params)
    flat = isinstance(vec, torch.Tensor)
    vs = _split_like(vec, params) if flat else [v.to(dtype=p.dtype, device=p.device) for v, p in
                                                zip(vec, params)]
    if not flat:
        if len(vs) != len(params) or any(v.shape != p.shape for v, p in zip(vs, params)):
            raise ValueError("vec: expected one tensor per param, each of its param's shape")
    with torch.enable_grad():
        hv = _hvp(_grads(_loss(loss_fn), params), params, vs)
    return _flatten(hv) if flat else hv


def dominant_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int = 20,
                        tol: float = 1e-3, seed: int = 0) -> Tuple[float, torch.Tensor]:
    """The eigenvalue of largest magnitude of the Hessian of ``loss_fn()`` w.r.t. ``params``, by power iteration.

    ``loss_fn`` is called once (its graph, with the first derivatives, serves every product); the start vector
    is drawn from a generator of its own seeded with ``seed`` (the global RNG is not touched). Each iteration
    computes ``H v`` for the unit iterate ``v``; the estimate is the Rayleigh quotient ``v' H v`` (so it keeps
    the sign of a negative dominant eigenvalue); the iteration stops after ``iters`` products, or once the
    estimate changes by at most ``tol`` relative to itself. Returns ``(eigenvalue, eigenvector)``: the
    eigenvector flat (all params in order), unit length, the ``v`` whose Rayleigh quotient is returned.
    """
    params = _check_params(params)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite number >= 0, got {tol!r}")
    g = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    norm = _dot(v, v).sqrt()
    v = [x / norm for x in v]
    eig: Optional[float] = None
    with torch.enable_grad():
        grads = _grads(_loss(loss_fn), params)
        for _ in range(iters):
            hv = _hvp(grads, params, v)
            estimate = float(_dot(hv, v))
            hv_norm = float(_dot(hv, hv).sqrt())
            done = eig is not None and abs(estimate - eig) <= tol * abs(estimate)
            eig = estimate
            if done or hv_norm == 0.0 or not math.isfinite(hv_norm):
                break
            v = [h / hv_norm for h in hv]
    return float(eig), _flatten(v).detach()


class EigenvalueEarlyStop:
    """The DARTS-ES stopping rule (Zela et al., ICLR 2020, section 4.3) on per-epoch dominant eigenvalues.

    ``mean_w(i)`` is the mean eigenvalue over the ``window`` epochs ending at epoch ``i`` (epochs counted from 1:
    epochs ``i - window + 1 .. i``). After epoch ``i`` the search stops when ``mean_w(i) > 0`` and
    ``mean_w(i - k) / mean_w(i) < threshold``, i.e. the curvature grew by more than ``1 / threshold`` within ``k``
    epochs; the architecture to keep is the one of epoch ``i - k``. The first epoch that can stop is
    ``k + window`` (both means need a full window). Feed one eigenvalue per epoch to :meth:`update`.
    """

    def __init__(self, window: int = 5, k: int = 5, threshold: float = 0.75):
        for name, v in (("window", window), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold: expected a finite number > 0, got {threshold!r}")
        self.window, self.k, self.threshold = window, k, float(threshold)
        self.values: List[float] = []
        self.stop_epoch: Optional[int] = None

    @classmethod
    def replay(cls, values: Sequence[float], **kw) -> "EigenvalueEarlyStop":
        """A rule that has seen ``values`` (e.g. the eigenvalues of a resumed run's history)."""
        rule = cls(**kw)
        for v in values:
            rule.update(v)
        return rule

    def local_mean(self, epoch: int) -> Optional[float]:
        """``mean_w(epoch)``, or None before a full window is in."""
        if epoch < self.window or epoch > len(self.values):
            return None
        return sum(self.values[epoch - self.window:epoch]) / self.window

    @property
    def rollback_epoch(self) -> Optional[int]:
        """The epoch whose architecture DARTS-ES keeps (``stop_epoch - k``), once stopped."""
        return None if self.stop_epoch is None else self.stop_epoch - self.k

    def update(self, eigenvalue: float) -> bool:
        """Record the eigenvalue of the next epoch; True when the search should stop after it (and after)."""
        if self.stop_epoch is not None:
            return True
        self.values.append(float(eigenvalue))
        i = len(self.values)
        if i - self.k >= self.window:
            current, previous = self.local_mean(i), self.local_mean(i - self.k)
            if current > 0 and previous < self.threshold * current:
                self.stop_epoch = i
                return True
        return False
