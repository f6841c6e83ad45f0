"""Multi-tensor ops of the second-order architect step: each is one pass over ALL weight tensors.

    virtual_step_(params, grads, bufs, eta, momentum, weight_decay, grad_scale=None)
        w <- w - eta * (momentum * buf + s * g + weight_decay * w)   (buf None: zero; s = grad_scale or 1)
    sum_squares(xs) -> 0-d float64 tensor: sum over all tensors of sum(x^2)
    perturb_(params, base, v, sum_sq, r, sign) -> R (0-d float64)
        w <- base + sign * R * v,  R = r / max(sqrt(sum_sq), tiny)
    copy_(dst, src): dst <- src, bit for bit
    clip_coefficient(sum_sq, max_norm) -> min(1, max_norm / (sqrt(sum_sq) + 1e-6)), as
        torch.nn.utils.clip_grad_norm_ scales: the RNN architect's virtual step passes it as grad_scale
        (DARTS RNN: no momentum, clip 0.25)

Data-dependent scalars (sum_sq, R, grad_scale) stay tensors: nothing is read back to the host.

Backends: 'cpu' and 'cuda' run ``torch.ops.pynas.mt_*`` (C++ in csrc/cpu/multi_tensor.cpp: one parallel
region per op over fixed chunks of all tensors; CUDA in csrc/cuda/multi_tensor.cu where built), 'triton'
the kernels of kernels/multi_tensor.py; 'reference' (and any list the kernels do not take: mixed dtypes,
non-contiguous tensors) runs the ``torch._foreach_*`` formulation below.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _ext
from . import _dispatch

__all__ = ["virtual_step_", "sum_squares", "perturb_", "copy_", "clip_coefficient", "uses_kernels"]



class _TorchOps:
    """The C++ (CPU) and CUDA kernels: ``torch.ops.pynas.mt_*``, the dispatcher picks the device."""

    @staticmethod
    def virtual_step_(params, grads, bufs, eta, momentum, weight_decay, grad_scale=None):
        torch.ops.pynas.mt_virtual_step_(params, grads, bufs, eta, momentum, weight_decay, grad_scale)

    @staticmethod
    def sum_squares(xs):
        return torch.ops.pynas.mt_sum_squares(xs)

    @staticmethod
    def perturb_(params, base, v, sum_sq, r, sign):
        return torch.ops.pynas.mt_perturb_(params, base, v, sum_sq, r, sign)

    @staticmethod
    def copy_(dst, src):
        torch.ops.pynas.mt_copy_(dst, src)


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("pynas::mt_sum_squares", dispatch_key)
    except RuntimeError:  # the op is not registered (no extension)
        return False


def _extension_kernels(dispatch_key: str):
    return _TorchOps if _ext.load() is not None and _has_kernel(dispatch_key) else None


def _triton_kernels():
    from .._triton import kernel_module

    try:
        return kernel_module("multi_tensor")
    except ModuleNotFoundError:
        return None


_LAYOUT = "one dtype and contiguous across the list (else the reference runs)"
TABLE = _dispatch.register("multi_tensor", [
    _dispatch.reference("multi_tensor"),
    _dispatch.extension("multi_tensor", "cpu", loader=lambda: _extension_kernels("CPU"), layout=_LAYOUT),
    _dispatch.extension("multi_tensor", "cuda", loader=lambda: _extension_kernels("CUDA"), layout=_LAYOUT),
    _dispatch.triton("multi_tensor", "multi_tensor", loader=_triton_kernels, layout=_LAYOUT),
])


def _implementation(params: Sequence[torch.Tensor], backend: Optional[str] = None):
    """The kernels serving these tensors, or None for the torch._foreach reference."""
    if not params:
        return None
    impl = TABLE.resolve(list(params[:1]), backend)
    if impl.backend == "reference":
        return None
    dtype = params[0].dtype
    if not all(p.dtype == dtype and p.is_contiguous() for p in params):
        return None
    return impl.kernels()


def uses_kernels(params: Sequence[torch.Tensor], backend: Optional[str] = None) -> bool:
    """Whether pynas's kernels serve these tensors (else the torch._foreach reference)."""
    return _implementation(params, backend) is not None


@torch.no_grad()
def virtual_step_(params, grads, bufs, eta: float, momentum: float, weight_decay: float,
                  grad_scale: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> None:
    params, grads = list(params), list(grads)
    bufs = list(bufs) if bufs is not None else [None] * len(params)
    impl = _implementation(params, backend)
    if impl is not None:
        impl.virtual_step_(params, grads, bufs, float(eta), float(momentum), float(weight_decay), grad_scale)
        return
    g = torch._foreach_mul(grads, grad_scale) if grad_scale is not None else grads
    d = torch._foreach_add(g, params, alpha=weight_decay)  # s g + wd w
    with_buf = [i for i, b in enumerate(bufs) if b is not None]
    if with_buf and momentum != 0.0:
        torch._foreach_add_([d[i] for i in with_buf], [bufs[i] for i in with_buf], alpha=momentum)
    torch._foreach_add_(params, d, alpha=-eta)


def sum_squares(xs, *, backend: Optional[str] = None) -> torch.Tensor:
    xs = list(xs)
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        raise RuntimeError("sum_squares: pynas's multi-tensor ops are not differentiable (optimizer-side passes "
                           "under no_grad); detach xs, or use torch.stack([x.pow(2).sum() for x in xs]).sum()")
    with torch.no_grad():
        return _sum_squares(xs, backend)


def _sum_squares(xs, backend):
    impl = _implementation(xs, backend)
    if impl is not None:
        return impl.sum_squares(xs)
    # accumulated in float64 (by default _foreach_norm returns, and rounds to, the inputs' dtype)
    norms = torch.stack(torch._foreach_norm(xs, 2, dtype=torch.float64))
    return (norms * norms).sum()


@torch.no_grad()
def perturb_(params, base, v, sum_sq: torch.Tensor, r: float, sign: float, *,
             backend: Optional[str] = None) -> torch.Tensor:
    params, base, v = list(params), list(base), list(v)
    impl = _implementation(params, backend)
    if impl is not None:
        return impl.perturb_(params, base, v, sum_sq, float(r), float(sign))
    R = r / sum_sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    torch._foreach_copy_(params, base)
    torch._foreach_add_(params, torch._foreach_mul(v, (sign * R).to(params[0].dtype)))
    return R


@torch.no_grad()
def copy_(dst, src, *, backend: Optional[str] = None) -> None:
    dst, src = list(dst), list(src)
    if not dst:
        return
    impl = _implementation(dst, backend)
    if impl is not None:
        impl.copy_(dst, [s.detach() for s in src])
        return
    torch._foreach_copy_(dst, [s.detach() for s in src])


def clip_coefficient(sum_sq: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (||g|| + 1e-6))`` from ``sum_sq = ||g||^2``, a 0-d tensor (no host sync)."""
    return (max_norm / (sum_sq.sqrt() + 1e-6)).clamp(max=1.0)
