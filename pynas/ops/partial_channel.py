"""partial_channel: the output of a PC-DARTS partial-channel edge (Xu et al., ICLR 2020), in one pass.

PC-DARTS sends only 1/K of an edge's channels through the mixed op. For the edge input x (N, C, H, W),
K = ``groups`` (C divisible by K, Cg = C / K), stride s in {1, 2} and t = the inner mixed op's output on
``x[:, :Cg]`` (N, Cg, H / s, W / s)::

    bypass = x[:, Cg:]                          s == 1
           = max_pool2d(x[:, Cg:], 2, 2)        s == 2   (kernel 2, stride 2, no padding; H, W even)
    ans    = cat([t, bypass], dim=1)            # (N, C, Ho, Wo)
    out    = ans.view(N, K, Cg, Ho, Wo).transpose(1, 2).reshape(N, C, Ho, Wo)   # channel shuffle

so out channel ``c' * K + g`` is ans channel ``g * Cg + c'``. The kernels write ``out`` in one pass from t
and x (the bypass, its max pool and the shuffle together), never storing ``ans`` or a pooled copy. Backward,
from the output gradient g, in one pass: ``g_t`` (N, Cg, Ho, Wo), contiguous, and ``g_x`` (N, C, H, W), the
gradient w.r.t. x of the bypass path: ZERO in its first Cg channels (where the inner op's input gradient
goes; through :func:`partial_channel` autograd adds it), the bypass gradient in the others (s == 2: each
window's gradient at its maximum, ties to the first maximum in row-major window order, as torch's
max_pool2d). Saved for backward: x only (the windows' maxima are found again; t's shape is all that is kept
of t). Values are copied, never rounded: every backend is exact in every dtype.

Backends (:data:`TABLE`): 'reference' (:func:`partial_channel_ref`), 'cpu' (C++, float32/float64,
csrc/cpu/partial_channel.cpp), 'cuda' (csrc/cuda/partial_channel.cu) and 'triton' (kernels/partial_channel.py;
on CPU tensors under TRITON_INTERPRET=1, float32/float64). Eager calls take an autograd Function, calls under
torch.compile the custom op ``pynas::partial_channel`` (with ``pynas::partial_channel_backward``); a backward
with create_graph=True differentiates the reference instead, exactly. A module with its own autograd Function
(a whole PC-DARTS edge as one node) calls the kernels through :func:`kernels`,
:func:`partial_channel_forward_impl` and :func:`partial_channel_backward_impl`.
"""
from __future__ import annotations

import operator
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _autodiff, _ext
from .._triton import kernel_module
from . import _dispatch

__all__ = ["partial_channel", "partial_channel_ref", "partial_channel_forward_impl",
           "partial_channel_backward_impl", "kernels", "check_partial_channel_args", "TABLE"]


def partial_channel_ref(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """Plain PyTorch, exactly the formula of the module docstring (autograd by torch): the source of truth."""
    n, c, _, _ = x.shape
    cg = c // groups
    bypass = x[:, cg:]
    if stride == 2:
        bypass = F.max_pool2d(bypass, 2, 2)
    ans = torch.cat([t, bypass], dim=1)
    ho, wo = ans.shape[2], ans.shape[3]
    return ans.view(n, groups, cg, ho, wo).transpose(1, 2).reshape(n, c, ho, wo)


# ---- the public checks ----------------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)}"


def check_partial_channel_args(t, x, groups, stride) -> None:
    """The public checks, in the public wording ("argument: expected ..., got ...")."""
    for name, v in (("t", t), ("x", x)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
    for name, v in (("x", x), ("t", t)):
        if v.dim() != 4 or not v.is_floating_point():
            raise ValueError(f"{name}: expected a 4-D (N, C, H, W) floating tensor, got {_describe(v)}")
        if v.layout != torch.strided:
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {v.layout}")
    if isinstance(groups, bool) or not hasattr(groups, "__index__") or operator.index(groups) < 1:
        raise ValueError(f"groups: expected a positive integer, got {groups!r}")
    if isinstance(stride, bool) or not hasattr(stride, "__index__") or operator.index(stride) not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
    if t.dtype != x.dtype:
        raise TypeError(f"t: expected x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"t: expected x's device {x.device}, got {t.device}")
    n, c, h, w = x.shape
    groups, stride = operator.index(groups), operator.index(stride)
    if c % groups:
        raise ValueError(f"groups: expected a divisor of x's channels (C = {c}), got {groups}")
    if stride == 2 and (h % 2 or w % 2):
        raise ValueError(f"x: expected an even height and width at stride 2 (a 2x2 max pool), got shape "
                         f"{tuple(x.shape)}")
    want = (n, c // groups, h // stride, w // stride)
    if tuple(t.shape) != want:
        raise ValueError(f"t: expected shape (N, C/groups, H/stride, W/stride) = {want}, got {tuple(t.shape)}")


# ---- the kernels and the op's table ---------------------------------------------------------------------------


class _Kernels(NamedTuple):
    """What an implementation calls: the API of the ``pynas._C`` bindings (csrc/bindings.cpp), which
    kernels/partial_channel.py repeats."""

    forward: Callable  # (t, x, groups, stride) -> out
    backward: Callable  # (g, x, groups, stride) -> (g_t, g_x)


def _module_kernels(m) -> _Kernels:
    return _Kernels(m.partial_channel_forward, m.partial_channel_backward)


def _ref_forward(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    with torch.no_grad():
        return partial_channel_ref(t, x, groups, stride).contiguous()


def _ref_backward(g: torch.Tensor, x: torch.Tensor, groups: int, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's gradients in torch ops, without autograd (so also inside a custom op): the inverse
    shuffle of g, then for the bypass torch's own max-pool backward."""
    n, c, h, w = x.shape
    cg, ho, wo = c // groups, h // stride, w // stride
    with torch.no_grad():
        g_ans = g.reshape(n, cg, groups, ho, wo).transpose(1, 2).reshape(n, c, ho, wo)
        g_x = torch.zeros_like(x, memory_format=torch.contiguous_format, dtype=g.dtype)
        if stride == 1:
            g_x[:, cg:] = g_ans[:, cg:]
        elif cg < c:
            bypass = x[:, cg:]
            _, idx = F.max_pool2d(bypass, 2, 2, return_indices=True)
            g_x[:, cg:] = torch.ops.aten.max_pool2d_with_indices_backward(
                g_ans[:, cg:], bypass, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        return g_ans[:, :cg].contiguous(), g_x


#: The reference as a kernel set (what :func:`kernels` gives for 'reference').
REFERENCE_KERNELS = _Kernels(_ref_forward, _ref_backward)


def _needs_4d(tensors: Sequence[torch.Tensor]) -> List[str]:
    names = ("x", "t", "g")
    return [f"{names[i] if i < len(names) else f'tensors[{i}]'}: expected a 4-D (N, C, H, W) input, got shape "
            f"{tuple(v.shape)}" for i, v in enumerate(tensors) if v.dim() != 4]


def _triton_needs(tensors: Sequence[torch.Tensor]) -> List[str]:
    x = tensors[0]
    if x.device.type == "cpu" and x.dtype not in _dispatch.WIDE_FLOATS:
        return [f"dtype {x.dtype} is not supported by backend 'triton' on CPU tensors (float32, float64)"]
    return _needs_4d(tensors)


_LAYOUT = "x (N, C, H, W), t (N, C/groups, H/stride, W/stride), made contiguous"
TABLE = _dispatch.register("partial_channel", [
    _dispatch.reference("partial_channel"),
    _dispatch.extension("partial_channel", "cpu", _dispatch.WIDE_FLOATS, lambda: _module_kernels(_ext.get()),
                        _LAYOUT, _needs_4d),
    _dispatch.extension("partial_channel", "cuda", _dispatch.FLOATS, lambda: _module_kernels(_ext.get()),
                        _LAYOUT, _needs_4d),
    _dispatch.triton("partial_channel", "partial_channel", _dispatch.FLOATS,
                     lambda: _module_kernels(kernel_module("partial_channel")),
                     _LAYOUT + "; on CPU tensors float32, float64 only", _triton_needs),
])


def kernels(backend: str) -> _Kernels:
    """The kernel set of ``backend`` ('reference', 'cpu', 'cuda', 'triton'): ``forward(t, x, groups, stride)``
    and ``backward(g, x, groups, stride)``, on raw tensors (no autograd, no public checks)."""
    if backend == "reference":
        return REFERENCE_KERNELS
    return TABLE[backend].kernels()


def partial_channel_forward_impl(k: _Kernels, t: torch.Tensor, x: torch.Tensor, groups: int,
                                 stride: int) -> torch.Tensor:
    """``out`` (N, C, H/stride, W/stride), contiguous, through the kernel set ``k`` (see :func:`kernels`)."""
    return k.forward(t.contiguous(), x.contiguous(), groups, stride)


def partial_channel_backward_impl(k: _Kernels, g: torch.Tensor, x: torch.Tensor, groups: int,
                                  stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g_t, g_x)`` from the output gradient ``g`` through ``k``: g_x's first C/groups channels are zero
    (the caller adds the inner op's input gradient there)."""
    return tuple(k.backward(g.contiguous(), x.contiguous(), groups, stride))


def _through_reference(t_shape, x: torch.Tensor, groups: int, stride: int, needs: Sequence[bool],
                       grad_out: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """(g_t, g_x) as a differentiable graph (create_graph=True), by differentiating the reference. t enters
    the output linearly, so a zero stand-in of its shape replaces it (t itself is not saved)."""
    t_ = x.new_zeros(t_shape).requires_grad_(True)
    return _autodiff.grad_through(lambda a, b: partial_channel_ref(a, b, groups, stride), (t_, x), needs, grad_out)


class _PartialChannelFunction(torch.autograd.Function):
    """The eager path: one autograd node, x saved (t's shape only)."""

    @staticmethod
    def forward(ctx, backend: str, groups: int, stride: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = partial_channel_forward_impl(kernels(backend), t, x, groups, stride)
        ctx.backend, ctx.groups, ctx.stride, ctx.t_shape = backend, groups, stride, t.shape
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact to any order)
            return (None, None, None, *_through_reference(ctx.t_shape, x, ctx.groups, ctx.stride,
                                                          ctx.needs_input_grad[3:], grad_out))
        g_t, g_x = partial_channel_backward_impl(kernels(ctx.backend), grad_out, x, ctx.groups, ctx.stride)
        return (None, None, None, g_t if ctx.needs_input_grad[3] else None, g_x if ctx.needs_input_grad[4] else None)


# ---- the custom ops: what torch.compile sees ------------------------------------------------------------------


def _out_shape(x: torch.Tensor, stride: int):
    n, c, h, w = x.shape
    return (n, c, h // stride, w // stride)


@torch.library.custom_op("pynas::partial_channel", mutates_args=())
def _partial_channel_op(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int, backend: str) -> torch.Tensor:
    return partial_channel_forward_impl(kernels(backend), t, x, groups, stride)


@_partial_channel_op.register_fake
def _(t, x, groups, stride, backend):
    return x.new_empty(_out_shape(x, stride))


@torch.library.custom_op("pynas::partial_channel_backward", mutates_args=())
def _partial_channel_backward_op(grad_out: torch.Tensor, x: torch.Tensor, groups: int, stride: int,
                                 backend: str) -> List[torch.Tensor]:
    """[g_t, g_x]."""
    return list(partial_channel_backward_impl(kernels(backend), grad_out, x, groups, stride))


@_partial_channel_backward_op.register_fake
def _(grad_out, x, groups, stride, backend):
    n, c, h, w = x.shape
    return [x.new_empty((n, c // groups, h // stride, w // stride)), x.new_empty((n, c, h, w))]


def _setup_context(ctx, inputs, output):
    t, x, groups, stride, backend = inputs
    ctx.groups, ctx.stride, ctx.backend, ctx.t_shape = groups, stride, backend, t.shape
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact to any order)
        g_t, g_x = _through_reference(ctx.t_shape, x, ctx.groups, ctx.stride, ctx.needs_input_grad[:2], grad_out)
        return g_t, g_x, None, None, None
    g_t, g_x = torch.ops.pynas.partial_channel_backward(grad_out, x, ctx.groups, ctx.stride, ctx.backend)
    return (g_t if ctx.needs_input_grad[0] else None, g_x if ctx.needs_input_grad[1] else None, None, None, None)


torch.library.register_autograd("pynas::partial_channel", _backward, setup_context=_setup_context)


# ---- the public function --------------------------------------------------------------------------------------


def partial_channel(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """The PC-DARTS partial-channel edge's output (see the module docstring), differentiable w.r.t. t and x.

    Args:
        t: (N, C/groups, H/stride, W/stride), the inner mixed op's output on ``x[:, :C/groups]``.
        x: (N, C, H, W), the edge's input, t's dtype and device.
        groups: K, a positive divisor of C. stride: 1 or 2 (then H and W even).
        backend: overrides the backend in force (see :func:`pynas.use_backend`).

    Returns:
        (N, C, H/stride, W/stride) in x's dtype. Its gradient w.r.t. x comes from the bypass only (the
        first C/groups channels reach x through t, by autograd).
    """
    check_partial_channel_args(t, x, groups, stride)
    groups, stride = operator.index(groups), operator.index(stride)
    return _partial_channel(t, x, groups, stride, TABLE.resolve([x, t], backend))


def _partial_channel(t: torch.Tensor, x: torch.Tensor, groups: int, stride: int,
                     impl: _dispatch.Implementation) -> torch.Tensor:
    """partial_channel on checked inputs through ``impl`` (a caller that has resolved the backend already)."""
    compiling = torch.compiler.is_compiling()
    if impl.backend == "reference" or (not compiling and _autodiff.under_transform()):
        return partial_channel_ref(t, x, groups, stride)
    t, x = t.contiguous(), x.contiguous()
    if compiling:
        return torch.ops.pynas.partial_channel(t, x, groups, stride, impl.backend)
    return _PartialChannelFunction.apply(impl.backend, groups, stride, t, x)
