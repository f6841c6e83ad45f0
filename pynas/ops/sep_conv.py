"""The separable convolution of the derived CNN as one autograd node: ``conv1x1(depthwise(relu(x)))``.

For x (N, C, H, W), a depthwise weight (C, 1, k, k) with stride s, padding p and dilation d, and a 1x1 weight
(Co, C, 1, 1)::

    sep_conv(x) = conv1x1(dwconv(relu(x), stride s, padding p, dilation d))

It is the convolution part of the evaluation network's ``dil_conv`` (then an affine BatchNorm) and of each half
of its ``sep_conv`` (docs/darts.md, "Evaluation network"); the BatchNorms stay torch's. The kernels are the fused
CNN edge's (``cnn_edge_dw_*``, ``cnn_edge_pw_*``: the ReLU applied as the input is read, the depthwise filter's
gradient in the same pass as the input's); the 1x1 conv is a batched matmul on a GPU, and on the CPU where the
plane is small (``CPU_PW_KERNEL_MIN_PLANE``). Saved for backward: x and
the depthwise output. Second derivatives (create_graph) differentiate the reference, exactly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _autodiff, _ext
from .._triton import kernel_module
from . import _dispatch
from ._conv1x1 import conv1x1, conv1x1_backward
from .cnn_edge import _module_kernels, _needs_4d, _triton_needs

_EMPTY = torch.empty(0)
_RELU = 1  # the depthwise kernels' "pre": relu(x) as x is read
MAX_KERNEL = 9  # the largest depthwise filter the kernels take
#: On the CPU the C++ 1x1 kernel serves planes of at least this many pixels; smaller ones (more channels, in the
#: derived CNN) go to a batched matmul, which was faster there (benchmarks/results/eval_convs.txt).
CPU_PW_KERNEL_MIN_PLANE = 1024


def sep_conv_ref(x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, stride: int, padding: int,
                 dilation: int) -> torch.Tensor:
    """Plain PyTorch: the source of truth."""
    u = F.conv2d(F.relu(x), w_dw, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    return F.conv2d(u, w_pw)


TABLE = _dispatch.register("sep_conv", [
    _dispatch.reference("sep_conv"),
    _dispatch.extension("sep_conv", "cpu", _dispatch.WIDE_FLOATS, lambda: _module_kernels(_ext.get(), False),
                        "x 4-D (N, C, H, W), made contiguous", _needs_4d),
    _dispatch.extension("sep_conv", "cuda", _dispatch.FLOATS, lambda: _module_kernels(_ext.get(), True),
                        "x 4-D (N, C, H, W), made contiguous", _needs_4d),
    _dispatch.triton("sep_conv", "cnn_edge", _dispatch.FLOATS,
                     lambda: _module_kernels(kernel_module("cnn_edge"), False),
                     "x 4-D (N, C, H, W), made contiguous; on CPU tensors float32, float64 only", _triton_needs),
])


class _SepConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, geometry, matmul_pw, x, w_dw, w_pw):
        stride, padding, dilation = geometry
        x, w_dw, w_pw = x.contiguous(), w_dw.contiguous(), w_pw.contiguous()
        (u,) = k.dw_forward(x, [w_dw], [stride], [padding], [dilation], _RELU, _EMPTY, _EMPTY)
        p = conv1x1(u, w_pw) if matmul_pw else k.pw_forward(u, w_pw, False, 1.0, 0.0, None, None)[0]
        ctx.k, ctx.geometry, ctx.matmul_pw = k, geometry, matmul_pw
        ctx.save_for_backward(x, w_dw, w_pw, u)
        return p

    @staticmethod
    def backward(ctx, g):
        x, w_dw, w_pw, u = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference (exact)
            return (None, None, None, *_autodiff.grad_through(
                lambda x_, a, b: sep_conv_ref(x_, a, b, stride, padding, dilation), (x, w_dw, w_pw),
                ctx.needs_input_grad[3:], g))
        need_w = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        pw_backward = conv1x1_backward if ctx.matmul_pw else ctx.k.pw_backward
        gu, g_pw = pw_backward(g.contiguous(), u, w_pw, need_w)
        gx, g_dws, _ = ctx.k.dw_backward(x, [w_dw], [gu], [stride], [padding], [dilation], _RELU, _EMPTY, _EMPTY,
                                         need_w)
        return (None, None, None, gx if ctx.needs_input_grad[3] else None,
                g_dws[0] if ctx.needs_input_grad[4] else None, g_pw if ctx.needs_input_grad[5] else None)


def check_sep_conv_args(x, w_dw, w_pw, stride, padding, dilation) -> None:
    """The public checks, in the public wording ("argument: expected ..., got ...")."""
    for name, t in (("x", x), ("w_dw", w_dw), ("w_pw", w_pw)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a 4-D (N, C, H, W) floating tensor, got {x.dtype} {tuple(x.shape)}")
    C = x.shape[1]
    if w_dw.dim() != 4 or w_dw.shape[0] != C or w_dw.shape[1] != 1 or w_dw.shape[2] != w_dw.shape[3]:
        raise ValueError(f"w_dw: expected a depthwise weight ({C}, 1, k, k), got {tuple(w_dw.shape)}")
    if w_pw.dim() != 4 or w_pw.shape[1] != C or w_pw.shape[2:] != (1, 1):
        raise ValueError(f"w_pw: expected a 1x1 weight (C_out, {C}, 1, 1), got {tuple(w_pw.shape)}")
    for name, t in (("w_dw", w_dw), ("w_pw", w_pw)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, "
                             f"{t.device}")
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")


def choose(x: torch.Tensor) -> Optional[_dispatch.Implementation]:
    """The implementation that runs convs on ``x`` fused under the backend in force, or None (torch's convs):
    not under torch.compile or torch.func transforms."""
    if torch.compiler.is_compiling() or _autodiff.under_transform():
        return None
    impl = TABLE.resolve([x], strict=False)
    return None if impl is None or impl.backend == "reference" else impl


def sep_conv(x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, stride: int = 1, padding: int = 0,
             dilation: int = 1, impl: Optional[_dispatch.Implementation] = None) -> torch.Tensor:
    """``conv1x1(depthwise(relu(x)))`` (see the module docstring); ``impl``: the implementation (None: the one
    :func:`choose` picks, the reference where none)."""
    check_sep_conv_args(x, w_dw, w_pw, stride, padding, dilation)
    if impl is None and w_dw.shape[-1] <= MAX_KERNEL:
        impl = choose(x)
    if impl is None or impl.backend == "reference":
        return sep_conv_ref(x, w_dw, w_pw, stride, padding, dilation)
    k = w_dw.shape[-1]
    plane = 1
    for n in x.shape[2:]:
        plane *= (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    matmul_pw = impl.backend == "cpu" and plane < CPU_PW_KERNEL_MIN_PLANE
    return _SepConvFunction.apply(impl.kernels(), (stride, padding, dilation), matmul_pw, x, w_dw, w_pw)


def layers_of(op) -> List:
    """The (depthwise, 1x1, BatchNorm) triples of a ``SepConv`` (two) or ``DilConv`` (one) module."""
    seq = op.op
    return [(seq[1], seq[2], seq[3])] if len(seq) == 4 else [(seq[1], seq[2], seq[3]), (seq[5], seq[6], seq[7])]


def run_module(op, x: torch.Tensor, impl: _dispatch.Implementation) -> torch.Tensor:
    """A ``SepConv`` or ``DilConv`` module's forward with its convolutions through :func:`sep_conv` (its own
    parameters and BatchNorms, so the state_dict and the running statistics are the module's)."""
    for dw, pw, bn in layers_of(op):
        x = bn(sep_conv(x, dw.weight, pw.weight, dw.stride[0], dw.padding[0], dw.dilation[0], impl))
    return x


def fusable_module(op) -> bool:
    """Whether a ``SepConv`` / ``DilConv`` module's convs are what :func:`sep_conv` computes (square filters,
    equal strides, paddings and dilations on both axes, up to 9x9, no bias)."""
    for dw, pw, _ in layers_of(op):
        if dw.bias is not None or pw.bias is not None or dw.groups != dw.in_channels or \
                len(set(dw.stride)) != 1 or len(set(dw.padding)) != 1 or len(set(dw.dilation)) != 1 or \
                dw.kernel_size[0] != dw.kernel_size[1] or dw.kernel_size[0] > MAX_KERNEL or \
                pw.kernel_size != (1, 1) or pw.stride != (1, 1):
            return False
    return True


__all__: Sequence[str] = ("sep_conv", "sep_conv_ref", "TABLE", "choose", "run_module", "fusable_module")
