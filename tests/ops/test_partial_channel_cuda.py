"""partial_channel on CUDA tensors: the CUDA kernels (csrc/cuda/partial_channel.cu) and the Triton kernels
(kernels/partial_channel.py) against the plain-PyTorch reference on the same GPU, in float64, float32, float16
and bfloat16. Every value is a copy of an input value, so the results must be bitwise equal to the reference's
(NaNs in the same places), ties and NaNs in the 2x2 windows included. Needs a GPU (benchmarks/gpu_check.sh runs
it with -m gpu); the check of a CUDA tensor given to a build without the CUDA part runs wherever it applies."""
from __future__ import annotations

import pytest
import torch

import pynas
from pynas import _ext
from pynas.ops import partial_channel as pc
from pynas.ops.partial_channel import partial_channel, partial_channel_ref

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)

_HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA device")
GPU_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        not _HAS_GPU or pynas.backends()[name] is not None,
        reason=f"{name}: {'no CUDA device' if not _HAS_GPU else pynas.backends()[name]}"))
    for name in ("cuda", "triton")
]
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, C, groups, H, W): odd and even N, groups 2 and 4, a plane larger than one Triton tile and a thread block
SHAPES = [(1, 4, 2, 2, 2), (3, 8, 4, 6, 10), (2, 12, 4, 34, 36), (5, 16, 4, 64, 64)]


def _id(dtype):
    return str(dtype).replace("torch.", "")


def _inputs(shape, stride, dtype, seed, integer=False):
    n, c, groups, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (n, c, h, w), generator=gen).to(dtype)
    else:
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(n, c // groups, h // stride, w // stride, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(n, c, h // stride, w // stride, generator=gen, dtype=torch.float64).to(dtype)
    return t.cuda(), x.cuda(), g.cuda()


def _reference(t, x, g, groups, stride):
    t = t.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    out = partial_channel_ref(t, x, groups, stride)
    g_t, g_x = torch.autograd.grad(out, (t, x), g)
    return out, g_t, g_x


def _check_exact(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaNs differ"
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0)), f"{what}: values differ"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}C{}g{}_{}x{}".format(*s))
@pytest.mark.parametrize("integer", [False, True], ids=["normal", "ties"])
def test_gpu_kernels_match_the_reference(backend, dtype, stride, shape, integer):
    groups = shape[2]
    t, x, g = _inputs(shape, stride, dtype, seed=hash((shape, stride, integer)) % 1000, integer=integer)
    k = pc.kernels(backend)
    out = pc.partial_channel_forward_impl(k, t, x, groups, stride)
    g_t, g_x = pc.partial_channel_backward_impl(k, g, x, groups, stride)
    want_out, want_t, want_x = _reference(t, x, g, groups, stride)
    _check_exact(out, want_out, "out")
    _check_exact(g_t, want_t, "g_t")
    _check_exact(g_x, want_x, "g_x")
    assert g_t.is_contiguous() and g_x.is_contiguous()
    assert not g_x[:, : shape[1] // groups].any()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_gpu_max_pool_nans_and_infinities_follow_torch(backend, dtype):
    vals = torch.tensor([1.0, 1.0, 0.0, -0.0, float("-inf"), float("inf"), float("nan"), 2.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = vals[torch.randint(0, len(vals), (3, 4, 6, 8), generator=gen)].to(dtype)
    x[0, 3, :2, :2] = float("nan")
    t = torch.randn(3, 2, 3, 4, dtype=torch.float64, generator=gen).to(dtype)
    g = torch.randn(3, 4, 3, 4, dtype=torch.float64, generator=gen).to(dtype)
    t, x, g = t.cuda(), x.cuda(), g.cuda()
    k = pc.kernels(backend)
    want_out, want_t, want_x = _reference(t, x, g, 2, 2)
    _check_exact(pc.partial_channel_forward_impl(k, t, x, 2, 2), want_out, "out")
    g_t, g_x = pc.partial_channel_backward_impl(k, g, x, 2, 2)
    _check_exact(g_t, want_t, "g_t")
    _check_exact(g_x, want_x, "g_x")


@pytest.mark.parametrize("backend", [*GPU_BACKENDS, pytest.param("auto", marks=needs_gpu)])
def test_gpu_public_op_forward_backward_and_gradcheck(backend):
    t, x, g = _inputs((3, 8, 4, 6, 6), 2, torch.float64, seed=5)
    x = x + torch.arange(x.numel(), device=x.device, dtype=x.dtype).view_as(x) * 1e-3  # no ties: gradcheck
    t.requires_grad_(True)
    x.requires_grad_(True)
    out = partial_channel(t, x, 4, 2, backend=backend)
    got = torch.autograd.grad(out, (t, x), g)
    want = torch.autograd.grad(partial_channel_ref(t, x, 4, 2), (t, x), g)
    for a, b in zip(got, want):
        _check_exact(a, b, "grad")
    assert torch.autograd.gradcheck(lambda a, b: partial_channel(a, b, 4, 2, backend=backend), (t, x))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_contiguous_inputs_and_current_stream(backend):
    t, x, g = _inputs((2, 8, 2, 8, 6), 2, torch.float32, seed=9)
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xs.is_contiguous()
    k = pc.kernels(backend)
    want = partial_channel_ref(t, x, 2, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = pc.partial_channel_forward_impl(k, t, xs, 2, 2)
        g_t, g_x = pc.partial_channel_backward_impl(k, g, xs, 2, 2)
    stream.synchronize()
    _check_exact(got, want, "out")
    _, want_t, want_x = _reference(t, x, g, 2, 2)
    _check_exact(g_t, want_t, "g_t")
    _check_exact(g_x, want_x, "g_x")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck(backend):
    pytest.importorskip("expecttest", reason="torch.library.opcheck needs expecttest")
    t, x, g = _inputs((3, 4, 2, 4, 6), 2, torch.float32, seed=11)
    torch.library.opcheck(torch.ops.pynas.partial_channel.default,
                          (t.requires_grad_(True), x.requires_grad_(True), 2, 2, backend))
    torch.library.opcheck(torch.ops.pynas.partial_channel_backward.default, (g, x.detach(), 2, 2, backend))


@pytest.mark.skipif(_ext.load() is None or not _HAS_GPU or pynas.backends()["cuda"] is not None,
                    reason="needs a CUDA device and pynas._C built with its CUDA part")
def test_gpu_extension_checks_name_the_argument():
    C = _ext.get()
    x = torch.zeros(1, 4, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"partial_channel_forward: t: expected \[1, 2, 4, 4\] .*device of x"):
        C.partial_channel_forward(torch.zeros(1, 2, 4, 4), x, 2, 1)
    with pytest.raises(RuntimeError, match=r"partial_channel_backward: x: expected an even height and width"):
        C.partial_channel_backward(torch.zeros(1, 4, 2, 2, device="cuda"), torch.zeros(1, 4, 5, 4, device="cuda"), 2, 2)


@pytest.mark.skipif(_ext.load() is None or not _HAS_GPU or _ext.build_info().get("cuda", True),
                    reason="needs a CUDA device and a pynas._C built without its CUDA part")
def test_cpu_only_build_names_the_cuda_device():
    x = torch.zeros(1, 4, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"built without CUDA, got x on cuda"):
        _ext.get().partial_channel_forward(torch.zeros(1, 2, 4, 4, device="cuda"), x, 2, 1)
