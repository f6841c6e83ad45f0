"""rnn_mix (the DARTS RNN node mix) on every usable backend against its plain-PyTorch reference."""
import pytest
import torch

import pynas
from pynas.ops import rnn_mix, rnn_mix_ref

from conftest import backend_devices

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
        with pytest.raises(RuntimeError, match="rnn_mix_forward: `probs` must be"):
            k.rnn_mix_forward(s, s, s, torch.randn(3, 5))
        with pytest.raises(RuntimeError, match="rnn_mix_backward: `grad_out` must be"):
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
