"""partial_channel (pynas.ops.partial_channel): the PC-DARTS partial-channel edge's output, against its
plain-PyTorch reference, on CPU tensors: the C++ kernels, and the Triton kernels under TRITON_INTERPRET=1
(skipped with the reason when triton cannot run here, as tests/ops/test_cnn_edge_triton.py does; GPU runs are
tests/ops/test_partial_channel_cuda.py). Forward and backward on fresh random inputs (every value is a copy:
exact), ties and NaNs in the max pool's windows (integer-valued x), gradcheck, second derivatives through the
reference, the custom op (opcheck, torch.compile) and the argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pynas
from pynas._triton import interpreting
from pynas.ops import partial_channel as pc
from pynas.ops.partial_channel import partial_channel, partial_channel_ref

_CPU = pynas.backends()["cpu"] is None
_TRITON = pynas.backends()["triton"] is None and interpreting()  # CPU tensors: the interpreter only
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _CPU, reason=f"cpu: {pynas.backends()['cpu']}")),
    pytest.param("triton", marks=pytest.mark.skipif(not _TRITON, reason="triton unusable on CPU tensors here: "
                                                    f"{pynas.backends()['triton'] or 'TRITON_INTERPRET unset'}")),
]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
# (N, C, groups, H, W): odd and even N, small and larger planes (larger than one Triton tile of 1024 values at
# stride 1), groups 2 and 4
SHAPES = [(1, 4, 2, 2, 2), (3, 8, 4, 6, 10), (2, 12, 4, 8, 8), (2, 6, 2, 34, 36)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _shape_id(s):
    return "N{}C{}g{}_{}x{}".format(*s)


def _inputs(shape, stride, dtype, seed, integer=False):
    """(t, x): x random normal, or (integer) small integers, so that the 2x2 windows have ties."""
    n, c, groups, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (n, c, h, w), generator=gen).to(dtype)
    else:
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(n, c // groups, h // stride, w // stride, generator=gen, dtype=torch.float64).to(dtype)
    return t, x


def _grads(fn, t, x, g):
    t = t.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    out = fn(t, x)
    g_t, g_x = torch.autograd.grad(out, (t, x), g)
    return out, g_t, g_x


def _check_exact(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    # every value is a copy of an input value: bitwise equal, NaNs in the same places
    assert torch.equal(torch.nan_to_num(got, nan=1234.5), torch.nan_to_num(want, nan=1234.5)), what
    assert torch.equal(got.isnan(), want.isnan()), what


# ---- the reference is the formula ---------------------------------------------------------------------------


def test_reference_is_the_channel_shuffle_of_the_concatenation():
    t, x = _inputs((2, 6, 3, 4, 4), 2, torch.float64, seed=0)
    out = partial_channel_ref(t, x, 3, 2)
    cg = 2
    ans = torch.cat([t, F.max_pool2d(x[:, cg:], 2, 2)], 1)
    for c_ in range(cg):
        for g in range(3):
            assert torch.equal(out[:, c_ * 3 + g], ans[:, g * cg + c_])


# ---- every backend against the reference --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_backward_match_the_reference(backend, dtype, stride, shape):
    seed = hash((shape, stride)) % 1000
    t, x = _inputs(shape, stride, dtype, seed)
    n, c, _, h, w = shape
    g = torch.randn(n, c, h // stride, w // stride, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out, g_t, g_x = _grads(lambda a, b: partial_channel(a, b, shape[2], stride, backend=backend), t, x, g)
    ref_out, ref_t, ref_x = _grads(lambda a, b: partial_channel_ref(a, b, shape[2], stride), t, x, g)
    _check_exact(out, ref_out, "out")
    _check_exact(g_t, ref_t, "g_t")
    _check_exact(g_x, ref_x, "g_x")
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 8, 4, 6, 10), (2, 6, 2, 8, 8)], ids=_shape_id)
def test_kernels_give_a_contiguous_g_t_and_zeros_in_g_x(backend, dtype, shape):
    """The raw kernels (as another module's autograd Function calls them): g_t contiguous, g_x (N, C, H, W) with
    its first C/groups channels zero; at stride 2 ties (integer x) go to the first maximum, as torch's."""
    n, c, groups, h, w = shape
    k = pc.kernels(backend)
    for stride in (1, 2):
        t, x = _inputs(shape, stride, dtype, seed=3 + stride, integer=True)
        x[0, -1, :2, :2] = 1.0  # a window of four equal values
        g = torch.randn(n, c, h // stride, w // stride, dtype=dtype)
        out = pc.partial_channel_forward_impl(k, t, x, groups, stride)
        _check_exact(out, partial_channel_ref(t, x, groups, stride), f"out s{stride}")
        g_t, g_x = pc.partial_channel_backward_impl(k, g, x, groups, stride)
        _, ref_t, ref_x = _grads(lambda a, b: partial_channel_ref(a, b, groups, stride), t, x, g)
        assert g_t.is_contiguous() and g_x.is_contiguous() and g_x.shape == x.shape
        assert torch.equal(g_x[:, : c // groups], torch.zeros_like(g_x[:, : c // groups]))
        _check_exact(g_t, ref_t, f"g_t s{stride}")
        _check_exact(g_x, ref_x, f"g_x s{stride}")
        if stride == 2:
            window = g_x[0, -1, :2, :2]  # the last channel of ans is the last of out: c - 1
            assert window[0, 0] == g[0, c - 1, 0, 0] and window.flatten()[1:].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_ties_nans_and_infinities_follow_torch(backend):
    """Windows with ties, -inf, +inf and NaN: the pooled value and the gradient's position are torch's."""
    vals = torch.tensor([1.0, 1.0, 0.0, -0.0, float("-inf"), float("inf"), float("nan"), 2.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    x = vals[torch.randint(0, len(vals), (3, 4, 6, 8), generator=gen)]
    x[0, 2, :2, :2] = float("-inf")  # all -inf: the first position
    x[0, 3, :2, :2] = float("nan")  # all NaN: as torch (the last NaN)
    x[1, 2, :2, :2] = torch.tensor([[2.0, float("nan")], [3.0, float("nan")]])
    t = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, 3, 4, dtype=torch.float64)
    out, g_t, g_x = _grads(lambda a, b: partial_channel(a, b, 2, 2, backend=backend), t, x, g)
    ref_out, ref_t, ref_x = _grads(lambda a, b: partial_channel_ref(a, b, 2, 2), t, x, g)
    _check_exact(out, ref_out, "out")
    _check_exact(g_t, ref_t, "g_t")
    _check_exact(g_x, ref_x, "g_x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_empty_batches(backend):
    t, x = _inputs((2, 8, 4, 6, 6), 2, torch.float64, seed=11)
    xs = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    ts = t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xs.is_contiguous()
    _check_exact(partial_channel(ts, xs, 4, 2, backend=backend), partial_channel_ref(t, x, 4, 2), "strided")
    empty_t, empty_x = _inputs((0, 8, 4, 6, 6), 1, torch.float64, seed=12)
    out = partial_channel(empty_t.requires_grad_(True), empty_x.requires_grad_(True), 4, 1, backend=backend)
    assert out.shape == (0, 8, 6, 6)
    out.sum().backward()
    assert empty_x.grad.shape == empty_x.shape and empty_t.grad.shape == empty_t.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_one_is_t_itself(backend):
    t, x = _inputs((2, 3, 1, 4, 4), 2, torch.float64, seed=13)
    _check_exact(partial_channel(t, x, 1, 2, backend=backend), t, "groups=1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(backend, stride):
    # the interpreter takes a while per launch: fewer values, and gradcheck's fast mode (random projections)
    fast = backend == "triton"
    t, x = _inputs((1, 4, 2, 2, 4) if fast else (3, 4, 2, 4, 6), stride, torch.float64, seed=20 + stride)
    x = x + torch.arange(x.numel(), dtype=torch.float64).view_as(x) * 1e-3  # distinct values: no ties
    t.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: partial_channel(a, b, 2, stride, backend=backend), (t, x),
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_second_derivatives_go_through_the_reference(backend, stride):
    """A PC-DARTS-like edge: t = a differentiable function of x[:, :Cg]; the gradient of a function of the
    first derivative (create_graph=True) is the reference's, and the kernels are not asked for it."""
    gen = torch.Generator().manual_seed(30 + stride)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = torch.randn(2, dtype=torch.float64, generator=gen).requires_grad_(True)
    v = torch.randn(2, 8, 4 // stride, 4 // stride, dtype=torch.float64, generator=gen)

    def inner(x_, w_):
        t = torch.tanh(x_[:, :2] * w_[0]) * w_[1]
        return F.avg_pool2d(t, 2, 2) if stride == 2 else t

    def through(fn):
        out = fn(inner(x, w), x)
        gx, gw = torch.autograd.grad((out * v).pow(2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gw.sum(), (x, w))

    got = through(lambda t, x_: partial_channel(t, x_, 4, stride, backend=backend))
    want = through(lambda t, x_: partial_channel_ref(t, x_, 4, stride))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    t = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    xx = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: partial_channel(a, b, 2, 1, backend=backend), (t, xx),
                                        fast_mode=backend == "triton")


def test_auto_takes_the_cpu_kernels_and_the_reference_under_transforms():
    t, x = _inputs((2, 4, 2, 4, 4), 1, torch.float64, seed=40)
    expected = "cpu" if _CPU else "reference"
    assert pc.TABLE.resolve([x, t], "auto").backend == expected
    assert pc.TABLE.resolve([x.half(), t.half()], "auto").backend == "reference"
    # torch.func composes with the reference path
    jac = torch.func.jacrev(lambda b: partial_channel(t, b, 2, 1))(x)
    assert jac.shape == (2, 4, 4, 4, 2, 4, 4, 4)


# ---- the custom op (what torch.compile sees) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_opcheck(backend):
    pytest.importorskip("expecttest", reason="torch.library.opcheck needs expecttest")
    for stride in (1, 2):
        t, x = _inputs((3, 4, 2, 4, 6), stride, torch.float64, seed=50 + stride)
        t.requires_grad_(True)
        x.requires_grad_(True)
        torch.library.opcheck(torch.ops.pynas.partial_channel.default, (t, x, 2, stride, backend))
        g = torch.randn(3, 4, 4 // stride, 6 // stride, dtype=torch.float64)
        torch.library.opcheck(torch.ops.pynas.partial_channel_backward.default, (g, x.detach(), 2, stride, backend))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not _CPU, reason=f"cpu: {pynas.backends()['cpu']}")
def test_custom_op_under_torch_compile():
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(60)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = torch.randn(1, dtype=torch.float64, generator=gen).requires_grad_(True)

    def f(x_, w_, fn):
        return (fn(F.avg_pool2d(torch.relu(x_[:, :2]) * w_, 2, 2), x_) ** 2).sum()

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(lambda x_, w_: f(x_, w_, lambda t, b: partial_channel(t, b, 4, 2, backend="cpu")),
                             backend=recording, fullgraph=True)
    got = compiled(x, w)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "pynas.partial_channel" in targets, targets  # the custom op, not the reference's ops
    want = f(x, w, lambda t, b: partial_channel_ref(t, b, 4, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops = _RecordOps()
    with ops:  # the compiled backward calls the kernels' custom op
        grads = torch.autograd.grad(got, (x, w))
    assert "pynas.partial_channel_backward" in ops.names, ops.names
    for a, b in zip(grads, torch.autograd.grad(want, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_table_has_every_backend():
    assert [impl.backend for impl in pc.TABLE] == ["reference", "cpu", "cuda", "triton"]
    assert [impl.validated for impl in pc.TABLE] == [True, True, False, False]
    assert pc.TABLE["cpu"].dtypes == (torch.float32, torch.float64)


# ---- argument errors name the argument ----------------------------------------------------------------------


def _z(*shape, **kw):
    return torch.zeros(*shape, **kw)


_T, _X = _z(1, 2, 4, 4), _z(1, 4, 4, 4)


@pytest.mark.parametrize("args,error,match", [
    (([1.0], _X, 2, 1), TypeError, r"t: expected a tensor, got list"),
    ((_T, "x", 2, 1), TypeError, r"x: expected a tensor, got str"),
    ((_T, _z(4, 4, 4), 2, 1), ValueError, r"x: expected a 4-D \(N, C, H, W\)"),
    ((_z(2, 4, 4), _X, 2, 1), ValueError, r"t: expected a 4-D \(N, C, H, W\)"),
    ((_T, _z(1, 4, 4, 4, dtype=torch.long), 2, 1), ValueError, r"x: expected a 4-D .*floating"),
    ((_T, _X, 0, 1), ValueError, r"groups: expected a positive integer, got 0"),
    ((_T, _X, 2.0, 1), ValueError, r"groups: expected a positive integer"),
    ((_T, _X, True, 1), ValueError, r"groups: expected a positive integer"),
    ((_T, _X, 2, 3), ValueError, r"stride: expected 1 or 2, got 3"),
    ((_T.double(), _X, 2, 1), TypeError, r"t: expected x's dtype torch.float32, got torch.float64"),
    ((_z(1, 2, 4, 4, device="meta"), _X, 2, 1), ValueError, r"t: expected x's device cpu, got meta"),
    ((_T, _z(1, 6, 4, 4), 4, 1), ValueError, r"groups: expected a divisor of x's channels \(C = 6\), got 4"),
    ((_z(1, 2, 2, 3), _z(1, 4, 5, 6), 2, 2), ValueError, r"x: expected an even height and width at stride 2"),
    ((_T, _X, 2, 2), ValueError,
     r"t: expected shape \(N, C/groups, H/stride, W/stride\) = \(1, 2, 2, 2\), got \(1, 2, 4, 4\)"),
])
def test_bad_arguments_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        partial_channel(*args)


@pytest.mark.skipif(not _CPU, reason=f"cpu: {pynas.backends()['cpu']}")
def test_extension_checks_name_the_argument():
    k = pynas._ext.get()
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(RuntimeError, match=r"partial_channel_forward: t: expected \[1, 2, 2, 2\]"):
        k.partial_channel_forward(torch.zeros(1, 2, 4, 4), x, 2, 2)
    with pytest.raises(RuntimeError, match=r"partial_channel_forward: groups: expected a divisor"):
        k.partial_channel_forward(torch.zeros(1, 1, 4, 4), x, 3, 1)
    with pytest.raises(RuntimeError, match=r"partial_channel_backward: g: expected \[1, 4, 4, 4\]"):
        k.partial_channel_backward(torch.zeros(1, 4, 2, 2), x, 2, 1)
    with pytest.raises(RuntimeError, match=r"partial_channel_backward: stride: expected 1 or 2"):
        k.partial_channel_backward(torch.zeros(1, 4, 2, 2), x, 2, 3)
    with pytest.raises(RuntimeError, match=r"forward: x: expected dtype torch.float32 or torch.float64 on cpu"):
        k.partial_channel_forward(torch.zeros(1, 2, 4, 4).half(), x.half(), 2, 1)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run partial_channel: dtype torch.float16"):
        partial_channel(torch.zeros(1, 2, 4, 4).half(), x.half(), 2, 1, backend="cpu")
