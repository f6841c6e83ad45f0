"""sep_conv (pynas.ops.sep_conv): conv1x1(depthwise(relu(x))) through the fused edge's kernels, against its
plain-PyTorch reference, forward, backward and second derivatives, on fresh random inputs; and the derived CNN
with it against the derived CNN without it."""
from __future__ import annotations

import pytest
import torch

import pynas
from pynas.ops import sep_conv as sc

_TRITON = pynas.backends()["triton"] is None
_CUDA = torch.cuda.is_available() and pynas.backends()["cuda"] is None
BACKENDS = [
    "cpu",
    pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.skipif(not _TRITON, reason="triton unusable here")]),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")]),
]
# (C, C_out, H, W, k, stride, padding, dilation): the geometries of sep_conv_3x3/5x5 and dil_conv_3x3/5x5
GEOMETRIES = [(3, 3, 7, 9, 3, 1, 1, 1), (3, 5, 8, 8, 5, 2, 2, 1), (4, 4, 9, 6, 3, 2, 2, 2), (2, 3, 11, 11, 5, 1, 4, 2)]


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _inputs(geometry, dtype, device, seed):
    C, Co, H, W, k, *_ = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype).to(device).requires_grad_(True)
    w_dw = torch.randn(C, 1, k, k, generator=g, dtype=dtype).to(device).requires_grad_(True)
    w_pw = torch.randn(Co, C, 1, 1, generator=g, dtype=dtype).to(device).requires_grad_(True)
    return x, w_dw, w_pw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "C{}-{}_{}x{}_k{}s{}p{}d{}".format(*g))
def test_forward_backward_match_the_reference(backend, dtype, geometry):
    *_, stride, padding, dilation = geometry
    x, w_dw, w_pw = _inputs(geometry, dtype, _device(backend), seed=hash(geometry) % 1000)
    impl = sc.TABLE[backend]
    out = sc.sep_conv(x, w_dw, w_pw, stride, padding, dilation, impl=impl)
    ref = sc.sep_conv_ref(x, w_dw, w_pw, stride, padding, dilation)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w_dw, w_pw), g)
    want = torch.autograd.grad(ref, (x, w_dw, w_pw), g)
    for name, a, b in zip(("x", "w_dw", "w_pw"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_only_the_needed_gradients():
    x, w_dw, w_pw = _inputs(GEOMETRIES[1], torch.float64, "cpu", 3)
    w_dw.requires_grad_(False)
    w_pw.requires_grad_(False)
    out = sc.sep_conv(x, w_dw, w_pw, 2, 2, 1, impl=sc.TABLE["cpu"])
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(sc.sep_conv_ref(x, w_dw, w_pw, 2, 2, 1).sum(), x)[0])


def test_second_derivatives_are_exact():
    x, w_dw, w_pw = _inputs(GEOMETRIES[2], torch.float64, "cpu", 5)
    fn = lambda a, b, c: sc.sep_conv(a, b, c, 2, 2, 2, impl=sc.TABLE["cpu"])  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w_dw, w_pw))


def test_auto_takes_the_kernels_on_the_cpu_and_reference_does_not():
    x = torch.randn(1, 2, 4, 4)
    assert sc.choose(x).backend == "cpu"
    with pynas.use_backend("reference"):
        assert sc.choose(x) is None
    assert sc.choose(x.half()) is None  # the C++ kernels take float32 and float64


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 3, 4)), "x: expected a 4-D"),
    (dict(w_dw=torch.randn(4, 1, 3, 3)), r"w_dw: expected a depthwise weight \(3, 1, k, k\)"),
    (dict(w_pw=torch.randn(5, 2, 1, 1)), r"w_pw: expected a 1x1 weight \(C_out, 3, 1, 1\)"),
    (dict(w_pw=torch.randn(5, 3, 1, 1, dtype=torch.float64)), "w_pw: expected x's dtype and device"),
    (dict(stride=0), "stride: expected an integer >= 1"),
    (dict(x=[1.0]), "x: expected a tensor"),
])
def test_bad_arguments_are_named(bad, match):
    kw = dict(x=torch.randn(2, 3, 6, 6), w_dw=torch.randn(3, 1, 3, 3), w_pw=torch.randn(5, 3, 1, 1), stride=1,
              padding=1, dilation=1)
    kw.update(bad)
    with pytest.raises((TypeError, ValueError), match=match):
        sc.sep_conv(**kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_derived_network_with_and_without_the_kernels(dtype):
    from pynas.cnn import PUBLISHED, EvalNetwork, Genotype

    genotype = Genotype(normal=[("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
                                ("skip_connect", 1), ("sep_conv_3x3", 3), ("avg_pool_3x3", 4), ("dil_conv_3x3", 2)],
                        normal_concat=[2, 3, 4, 5], reduce=PUBLISHED["DARTS_V1"].reduce[:4] +
                        [("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("sep_conv_3x3", 3), ("dil_conv_5x5", 2)],
                        reduce_concat=[2, 3, 4, 5])
    torch.manual_seed(0)
    model = EvalNetwork(4, 10, 4, True, genotype).to(dtype)
    model.drop_path_prob = 0.3
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(7)  # the same drop-path masks
        model.zero_grad()
        with pynas.use_backend(backend):
            logits, aux = model(x)
            (logits.square().sum() + aux.sum()).backward()
        results[backend] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for a, b in zip(results["reference"], results["cpu"]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("H", [8, 40], ids=["matmul-1x1", "kernel-1x1"])
def test_both_cpu_1x1_paths(H):
    """Small planes take the batched matmul for the 1x1 conv, large ones the C++ kernel: both equal the reference."""
    geometry = (3, 4, H, H, 3, 1, 1, 1)
    x, w_dw, w_pw = _inputs(geometry, torch.float64, "cpu", 11)
    assert (H * H < sc.CPU_PW_KERNEL_MIN_PLANE) == (H == 8)
    out = sc.sep_conv(x, w_dw, w_pw, 1, 1, 1, impl=sc.TABLE["cpu"])
    ref = sc.sep_conv_ref(x, w_dw, w_pw, 1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, w_dw, w_pw), g), torch.autograd.grad(ref, (x, w_dw, w_pw), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
