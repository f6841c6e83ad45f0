"""rnn_mix (the DARTS RNN node mix) on every usable backend against its plain-PyTorch reference."""
import pytest
import torch

import pynas
from pynas.ops import rnn_mix, rnn_mix_ref

from conftest import backend_devices

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)

PAIRS = [(b, d) for b, d in backend_devices() if b != "reference"]
SHAPES = [(1, 3, 7), (8, 5, 33), (3, 16, 64)]


def _inputs(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)  # noqa
    states, h = mk(), mk()
    c = torch.sigmoid(mk())
    probs = torch.softmax(torch.randn(shape[0], 5, generator=g, dtype=torch.float64), 1).to(device)
    probs = probs.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [t.requires_grad_(True) for t in (states, c, h, probs)]


def _dtypes(backend, device):
    if device == "cpu":
        return [torch.float64, torch.float32]
    return [torch.float32, torch.bfloat16, torch.float16]


def _cases():
    for backend, device in PAIRS:
        if backend == "triton" and device == "cpu" and pynas.backends()["triton"] is None:
            try:  # the Triton kernels may be absent from an older checkout
                from pynas._triton import kernel_module
                kernel_module("rnn_mix")
            except ModuleNotFoundError:
                continue
        for dtype in _dtypes(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,device,dtype", list(_cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_reference(backend, device, dtype, shape):
    ins = _inputs(shape, dtype, device, seed=sum(shape))
    out = rnn_mix(*ins, backend=backend)
    assert out.shape == shape[1:] and out.dtype == dtype
    g = torch.randn(shape[1:], dtype=torch.float64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, ins, g)
    ref_in = [t.detach().double().requires_grad_(True) for t in ins]
    ref = rnn_mix_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2),
           torch.float16: (3e-3, 3e-3)}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol[0], atol=tol[1])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=tol[0], atol=tol[1] * max(1.0, float(b.abs().max())))
    assert float(grads[3][:, 0].abs().max()) == 0.0  # 'none' has no gradient


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[1] == "cpu"])
def test_saturated_activations(backend, device):
    ins = _inputs((2, 4, 9), torch.float64, device, seed=3, scale=30.0)
    out = rnn_mix(*ins, backend=backend)
    torch.testing.assert_close(out, rnn_mix_ref(*[t.detach() for t in ins]), rtol=1e-10, atol=1e-10)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), ins))


def test_gradcheck_and_determinism():
    if pynas.backends()["cpu"] is not None:
        pytest.skip("the C++ CPU backend is not built")
    ins = [t.detach().requires_grad_(True) for t in _inputs((3, 2, 5), torch.float64, "cpu", seed=7)]
    assert torch.autograd.gradcheck(lambda *a: rnn_mix(*a, backend="cpu"), ins)
    big = [t.detach() for t in _inputs((8, 64, 300), torch.float32, "cpu", seed=8)]
    g = torch.randn(64, 300)
    k = pynas._ext.get()
    a = k.rnn_mix_backward(g, *big)
    b = k.rnn_mix_backward(g, *big)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_opcheck_and_compile():
    if pynas.backends()["cpu"] is not None:
        pytest.skip("the C++ CPU backend is not built")
    pytest.importorskip("expecttest", reason="torch.library.opcheck needs expecttest")
    ins = _inputs((2, 3, 4), torch.float64, "cpu", seed=9)
    torch.library.opcheck(torch.ops.pynas.rnn_mix.default, (*ins, "cpu"))
    f = torch.compile(lambda *a: rnn_mix(*a, backend="cpu"), backend="aot_eager", fullgraph=True)
    out = f(*ins)
    torch.testing.assert_close(out, rnn_mix_ref(*ins))
    ga = torch.autograd.grad(out.sum(), ins)
    gb = torch.autograd.grad(rnn_mix_ref(*ins).sum(), ins)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    s = torch.randn(2, 3, 4)
    p = torch.softmax(torch.randn(2, 5), 1)
    with pytest.raises(ValueError, match="states: expected shape"):
        rnn_mix(s[0], s[0], s[0], p)
    with pytest.raises(ValueError, match="c: expected the shape"):
        rnn_mix(s, s[:, :2], s, p)
    with pytest.raises(ValueError, match="h: expected the shape, dtype"):
        rnn_mix(s, s, s.double(), p)
    with pytest.raises(ValueError, match=r"probs: expected a floating \(2, 5\)"):
        rnn_mix(s, s, s, torch.randn(2, 4))
    with pytest.raises(TypeError, match="states: expected a tensor"):
        rnn_mix([1.0], s, s, p)
    if pynas.backends()["cpu"] is None:
        k = pynas._ext.get()
        with pytest.raises(RuntimeError, match="rnn_mix_forward: probs: expected"):
            k.rnn_mix_forward(s, s, s, torch.randn(3, 5))
        with pytest.raises(RuntimeError, match="rnn_mix_backward: grad_out: expected"):
            k.rnn_mix_backward(torch.randn(3, 3), s, s, s, p)


@pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("shape,scale", [((3, 70, 61), 1.0), ((2, 9, 13), 60.0), ((5, 1, 3), 4.0)], ids=str)
def test_cpu_float32_lanes_tiles_and_saturation(isa, shape, scale):
    """The C++ float loops (8 lanes, one exponential, clamped): several tiles, a ragged tail, |h| up to
    hundreds, both instruction sets, against the float64 reference; d probs independent of the threads."""
    from pynas import _ext

    C = _ext.get()
    if isa == "avx2":
        try:
            C.set_cpu_isa("avx2")
        except RuntimeError as exc:
            pytest.skip(str(exc))
    else:
        C.set_cpu_isa("base")
    try:
        ins = _inputs(shape, torch.float32, "cpu", seed=7, scale=scale)
        out = rnn_mix(*ins, backend="cpu")
        g = torch.randn(shape[1:], dtype=torch.float32)
        grads = torch.autograd.grad(out, ins, g)
        ref_in = [t.detach().double().requires_grad_(True) for t in ins]
        ref = rnn_mix_ref(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, g.double())
        for a, b in zip([out] + list(grads), [ref] + list(ref_grads)):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-6 * max(1.0, float(b.detach().abs().max())))
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = torch.autograd.grad(rnn_mix(*ins, backend="cpu"), ins, g)[3]
        finally:
            torch.set_num_threads(n)
        assert torch.equal(one, grads[3])
    finally:
        C.set_cpu_isa("auto")


@pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built")
def test_cpu_float32_nan_propagates():
    s, c, h, p = (t.detach() for t in _inputs((2, 3, 11), torch.float32, "cpu", seed=5))
    h[1, 2, 4] = float("nan")
    out = rnn_mix(s, c, h, p, backend="cpu")
    assert torch.isnan(out[2, 4]) and torch.isfinite(out[~torch.isnan(out)]).all()
    assert int(torch.isnan(out).sum()) == 1


# ---- h = +-inf and |h| where exp overflows float32 (the identity column keeps inf in the result) ------------

EXTREME_H = [float("-inf"), float("inf"), 1e4, -1e4, 80.0, -80.0, 89.0, -89.0, 100.0, -100.0]
# (J, B, H) = (3, 4, 13): 52 elements per node, six full 8-lane blocks and a ragged tail of 4
EXTREME_SHAPE = (3, 4, 13)
EXTREME_AT = [(0, 0, 3), (1, 3, 11), (2, 1, 7), (2, 1, 8), (0, 3, 12)]  # body and tail lanes, two in one node


def _extreme_inputs(dtype, value, seed=11):
    s, c, h, p = (t.detach() for t in _inputs(EXTREME_SHAPE, dtype, "cpu", seed=seed))
    for at in EXTREME_AT:
        h[at] = value
    g = torch.randn(EXTREME_SHAPE[1:], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return s, c, h, p, g.to(dtype)


def _ref_with_grads(ins, g, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in ins]
    out = rnn_mix_ref(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(dtype)))


def _assert_agrees(name, got, want, tol):
    """Where ``want`` is not NaN: the same infinities and finite values within tol (of the largest finite)."""
    got = got.detach().double()
    want = want.detach().double()
    defined = ~torch.isnan(want)
    assert not torch.isnan(got[defined]).any(), f"{name}: NaN where the reference gives {want[defined & torch.isnan(got)][:4].tolist()}"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{name}: {got[inf].tolist()} where the reference gives {want[inf].tolist()}"
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{name}: non-finite where the reference is finite"
    scale = max(1.0, float(want[fin].abs().max())) if fin.any() else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("value", EXTREME_H, ids=str)
def test_cpu_infinite_and_huge_h_match_reference(value, dtype, isa):
    """h = -inf with the identity weight > 0 gave NaN (relu computed as h * (h > 0): -inf * 0) where the
    reference gives -inf, and NaN in d c and d probs. Forward and backward must agree with the reference
    (in the input dtype and in float64) wherever the reference's value is not NaN."""
    C = _ext_or_skip_isa(isa)
    try:
        s, c, h, p, g = _extreme_inputs(dtype, value)
        ins = [t.requires_grad_(True) for t in (s, c, h, p)]
        out = rnn_mix(*ins, backend="cpu")
        got = [out] + list(torch.autograd.grad(out, ins, g))
        names = ("out", "d states", "d c", "d h", "d probs")
        ref64 = _ref_with_grads(ins, g, torch.float64)
        tol64 = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
        for name, a, b in zip(names, got, ref64):
            _assert_agrees(name + " (float64 reference)", a, b, tol64)
        if dtype in (torch.float64, torch.float32):  # the reference in the dtype itself (its own float32 math)
            ref = _ref_with_grads(ins, g, dtype)
            for name, a, b in zip(names, got, ref):
                _assert_agrees(name + f" ({dtype} reference)", a, b, 1e-10 if dtype == torch.float64 else 1e-5)
        if value == float("-inf"):  # the case reported: -inf through the identity column
            for at in EXTREME_AT:
                assert got[0][at[1:]] == float("-inf")
        assert torch.isnan(got[0]).sum() == torch.isnan(ref64[0]).sum()
    finally:
        C.set_cpu_isa("auto")


def _ext_or_skip_isa(isa):
    C = pynas._ext.get()
    try:
        C.set_cpu_isa(isa)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return C


@pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_nan_h_propagates_through_relu(dtype, isa):
    """relu(NaN) is NaN in torch: d probs of the relu column is NaN for the node with the NaN, as in the
    reference (the kernels took relu(NaN) = 0); the other nodes' d probs stay finite."""
    C = _ext_or_skip_isa(isa)
    try:
        s, c, h, p, g = _extreme_inputs(dtype, 0.5)
        h[1, 2, 5] = float("nan")
        ins = [t.requires_grad_(True) for t in (s, c, h, p)]
        out = rnn_mix(*ins, backend="cpu")
        got = [out] + list(torch.autograd.grad(out, ins, g))
        ref = _ref_with_grads(ins, g, torch.float64)
        for name, a, b in zip(("out", "d states", "d c", "d h", "d probs"), got, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), name
            _assert_agrees(name, a, b, 1e-10 if dtype == torch.float64 else 1e-5)
        assert torch.isnan(got[4][1, 1:]).all() and torch.isfinite(got[4][[0, 2]]).all()
    finally:
        C.set_cpu_isa("auto")
