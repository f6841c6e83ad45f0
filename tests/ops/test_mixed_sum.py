"""mixed_sum on every usable backend against its plain-PyTorch reference."""
import pytest
import torch

import pynas
from pynas.ops import mixed_sum, mixed_sum_ref

from conftest import backend_devices

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)

PAIRS = backend_devices()
SHAPES = [(3, 5, 7), (2, 4, 9, 11), (1,), (), (16, 33)]
KS = [1, 7, 9]


def _tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def _dtypes(backend, device):
    if device == "cpu":
        return [torch.float64, torch.float32] + ([torch.bfloat16] if backend == "cpu" else [])
    return [torch.float32, torch.bfloat16, torch.float16]


def _cases():
    for backend, device in PAIRS:
        for dtype in _dtypes(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


def _small(backend):
    # the Triton interpreter is slow on the CPU: keep its shapes small
    return backend == "triton" and not torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_keeps_the_dtype_of_0d_inputs(dtype):
    xs = [torch.randn((), dtype=dtype) for _ in range(3)]
    out = mixed_sum(xs, torch.softmax(torch.randn(3), 0), backend="reference")
    assert out.shape == () and out.dtype == dtype


@pytest.mark.parametrize("backend,device,dtype", list(_cases()))
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_matches_reference(backend, device, dtype, K, shape):
    torch.manual_seed(1000 * K + len(shape))
    xs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(K)]
    w = torch.softmax(torch.randn(K, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype), 0)
    w.requires_grad_(True)
    gout = torch.randn(shape, device=device, dtype=dtype)

    out = mixed_sum(xs, w, backend=backend)
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    gx = torch.autograd.grad(out, xs + [w], gout)

    # truth in float64
    xs64 = [x.detach().double().requires_grad_(True) for x in xs]
    w64 = w.detach().double().requires_grad_(True)
    ref = mixed_sum_ref(xs64, w64)
    gref = torch.autograd.grad(ref, xs64 + [w64], gout.double())

    if dtype in (torch.float64, torch.float32):
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
        for a, b in zip(gx, gref):
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * scale * max(1, out.numel()) ** 0.5)
    else:
        # low precision: error vs float64 truth at most ~2x plain PyTorch's at the same precision
        plain = mixed_sum_ref([x.detach() for x in xs], w.detach().to(dtype))
        err = (out.double() - ref).abs().max()
        err_plain = (plain.double() - ref).abs().max()
        assert err <= 2 * err_plain + 1e-3


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_stacked_input_equals_list(backend, device):
    torch.manual_seed(3)
    xs = torch.randn(5, 3, 4, 5, device=device)
    w = torch.randn(5, device=device)
    a = mixed_sum(xs, w, backend=backend)
    b = mixed_sum(list(xs), w, backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (w.view(5, 1, 1, 1) * xs).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"])
def test_gradcheck_float64(backend):
    torch.manual_seed(4)
    xs = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: mixed_sum(list(a[:-1]), a[-1], backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*xs, w))
    assert torch.autograd.gradgradcheck(fn, (*xs, w)) if backend == "reference" else True


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_opcheck(backend, device):
    pytest.importorskip("expecttest", reason="torch.library.opcheck needs expecttest")
    torch.manual_seed(5)
    dtype = torch.float64 if device == "cpu" else torch.float32
    xs = [torch.randn(3, 7, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.pynas.mixed_sum.default, (xs, w, backend))
    g = torch.randn(3, 7, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.pynas.mixed_sum_backward.default,
                          (g, [x.detach() for x in xs], w.detach(), backend))


def test_works_under_torch_compile():
    torch.manual_seed(6)
    xs = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)

    def f(xs, w):
        return (mixed_sum(xs, torch.softmax(w, 0)) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(xs, w)
    g = torch.autograd.grad(out, xs + [w])
    out_ref = f(xs, w)
    g_ref = torch.autograd.grad(out_ref, xs + [w])
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


BAD = [
    ("xs", lambda: ([], torch.ones(0)), ValueError),
    ("xs", lambda: (torch.tensor(1.0), torch.ones(1)), ValueError),
    ("xs", lambda: ("abc", torch.ones(1)), TypeError),
    ("xs[1]", lambda: ([torch.ones(3), "x"], torch.ones(2)), TypeError),
    ("xs[1]", lambda: ([torch.ones(3), torch.ones(4)], torch.ones(2)), ValueError),
    ("xs[1]", lambda: ([torch.ones(3), torch.ones(3, dtype=torch.float64)], torch.ones(2)), TypeError),
    ("xs[0]", lambda: ([torch.ones(3, dtype=torch.long)], torch.ones(1)), TypeError),
    ("xs[0]", lambda: ([torch.ones(3).to_sparse()], torch.ones(1)), ValueError),
    ("weights", lambda: ([torch.ones(3)] * 2, torch.ones(3)), ValueError),
    ("weights", lambda: ([torch.ones(3)] * 2, torch.ones(2, 1)), ValueError),
    ("weights", lambda: ([torch.ones(3)] * 2, [0.5, 0.5]), TypeError),
    ("weights", lambda: ([torch.ones(3)] * 2, torch.ones(2, dtype=torch.long)), TypeError),
    ("weights", lambda: ([torch.ones(3)] * 2, torch.ones(2, device="meta")), ValueError),
]


@pytest.mark.parametrize("backend", [b for b, d in PAIRS])
@pytest.mark.parametrize("name,make,exc", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(backend, name, make, exc):
    xs, w = make()
    with pytest.raises(exc) as info:
        mixed_sum(xs, w, backend=backend)
    assert name in str(info.value)


def test_device_mismatch_named():
    if not torch.cuda.is_available():
        xs = [torch.ones(3, device="meta")] * 2
        with pytest.raises(ValueError, match="weights"):
            mixed_sum(xs, torch.ones(2))
    else:
        with pytest.raises(ValueError, match=r"xs\[1\]"):
            mixed_sum([torch.ones(3), torch.ones(3, device="cuda")], torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: the CUDA and GPU Triton kernels are tested on a GPU machine")
def test_gpu_backends_are_usable_on_a_gpu():
    table = pynas.backends()
    assert table["cuda"] is None, table["cuda"]
    assert table["triton"] is None, table["triton"]
    assert ("cuda", "cuda") in PAIRS and ("triton", "cuda") in PAIRS


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[0] != "reference"],
                         ids=[f"{b}-{d}" for b, d in PAIRS if b != "reference"])
def test_eager_path_equals_custom_op(backend, device):
    """Eager calls go through an autograd.Function, compiled ones through the custom op: same kernels."""
    torch.manual_seed(7)
    xs = [torch.randn(3, 5, device=device, requires_grad=True) for _ in range(4)]
    w = torch.randn(4, device=device, requires_grad=True)
    g = torch.randn(3, 5, device=device)
    eager = mixed_sum(xs, w, backend=backend)
    ge = torch.autograd.grad(eager, xs + [w], g)
    op = torch.ops.pynas.mixed_sum(xs, w, backend)
    go = torch.autograd.grad(op, xs + [w], g)
    assert torch.equal(eager, op)
    for a, b in zip(ge, go):
        assert torch.equal(a, b)


def test_double_backward_is_exact():
    """Through the saved xs (the incoming gradient is a constant here): d(sum_k grad_w[k]) / d xs_k = 1.
    More in tests/ops/test_higher_order.py."""
    if pynas.backends()["cpu"] is not None:
        pytest.skip("the C++ extension is not built")
    xs = [torch.randn(3, requires_grad=True) for _ in range(2)]
    w = torch.randn(2, requires_grad=True)
    (gw,) = torch.autograd.grad(mixed_sum(xs, w, backend="cpu").sum(), [w], create_graph=True)
    gw.sum().backward()
    for x in xs:
        assert torch.equal(x.grad, torch.ones(3))
