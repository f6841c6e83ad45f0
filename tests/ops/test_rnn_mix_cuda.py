"""The CUDA kernels of rnn_mix (csrc/cuda/rnn_mix.cu) against a plain-PyTorch formula in float64.

    out[b, k] = sum_j sum_{f in tanh, relu, sigmoid, identity} probs[j, f] * (s + c * (f(h) - s))

with s, c, h = states, c, h at [j, b, k]; the gradients of the formula come from autograd. The inputs are
rounded to the tested dtype first and the formula runs on those values in float64, so the kernels (which
accumulate in float32, float64 for float64) differ from it only by their own rounding: float64 to 1e-10,
float32 to 1e-5, float16/bfloat16 to a few units of their rounding, relative to the largest value (d probs:
relative to the sum of the magnitudes of its terms, since it sums B * H of them). The tests need a GPU
(they run in the GPU check); without one they skip.
"""
import pytest
import torch

import pynas
from pynas import _ext
from pynas._sync import no_host_sync

C = _ext.load()

needs_cuda = pytest.mark.skipif(
    C is None or not torch.cuda.is_available() or pynas.backends()["cuda"] is not None,
    reason="needs a CUDA device and pynas._C built with its CUDA part",
)
pytestmark = [pytest.mark.gpu, needs_cuda]

DEV = "cuda"
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# d probs: the rounding of a sum of B * H terms in the accumulation type, relative to the sum of their magnitudes
ACC_TOL = {torch.float64: 1e-13, torch.float32: 3e-7, torch.float16: 3e-7, torch.bfloat16: 3e-7}
# (J, B, H): a single node, odd sizes, a row length not a multiple of the block, and more elements than
# one grid's worth of threads (1024 blocks of 256), so the grid-stride loops wrap.
SHAPES = [(1, 3, 7), (8, 16, 65), (2, 1, 1), (3, 5, 33), (2, 300, 1000)]
FUNCS = (torch.tanh, torch.relu, torch.sigmoid, lambda t: t)  # probs columns 1..4


def _id(x):
    return str(x).replace("torch.", "")


def make_inputs(shape, dtype, probs_dtype=None, seed=0):
    """states, c (in (0, 1), as after the sigmoid), h, probs (rows of a softmax), grad_out, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    j, b, h = shape

    def rand(*size):
        return torch.randn(size, generator=gen, dtype=torch.float64)

    states = rand(j, b, h).to(dtype)
    c = torch.sigmoid(rand(j, b, h)).to(dtype)
    hh = (2 * rand(j, b, h)).to(dtype)
    probs = torch.softmax(rand(j, 5), dim=1).to(probs_dtype or dtype)
    grad_out = rand(b, h).to(dtype)
    return states, c, hh, probs, grad_out


def reference(states, c, h, probs, grad_out):
    """out, d states, d c, d h, d probs of the formula, in float64 on the CPU (autograd)."""
    s64, c64, h64, p64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (states, c, h, probs))
    out = torch.zeros(s64.shape[1:], dtype=torch.float64)
    for j in range(s64.shape[0]):
        for k, f in enumerate(FUNCS, start=1):
            out = out + p64[j, k] * (s64[j] + c64[j] * (f(h64[j]) - s64[j]))
    grads = torch.autograd.grad(out, (s64, c64, h64, p64), grad_out.to("cpu", torch.float64))
    return (out.detach(),) + tuple(g.detach() for g in grads)


def probs_scale(states, c, h, grad_out):
    """(J, 5): the sum over (b, k) of the magnitudes of the terms of d probs[j, f] (column 0: 1)."""
    s, cc, hh, g = (t.to("cpu", torch.float64) for t in (states, c, h, grad_out))
    cols = [torch.ones(s.shape[0], dtype=torch.float64)]
    for f in FUNCS:
        cols.append((g.abs() * (s.abs() + cc.abs() * (f(hh).abs() + s.abs()))).sum(dim=(1, 2)))
    return torch.stack(cols, dim=1)


def check(got, want, tol, what, scale=None):
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.detach().to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if scale is None:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = (got - want).abs()
    bad = err > tol * scale
    assert not bad.any(), f"{what}: max error {float(err.max()):.3g} (tol {tol:g} x scale), at {bad.nonzero()[:5].tolist()}"


def check_probs(got, want, tol, acc_tol, magnitudes):
    """d probs: the final rounding to probs' dtype (tol of the value) plus that of the sum (acc_tol of the sum of
    the magnitudes of its terms)."""
    check(got, want, 1.0, "d probs", scale=tol * want.abs() + acc_tol * magnitudes)


def run_gpu(states, c, h, probs, grad_out):
    """pynas._C's forward and backward on the GPU, asserting that they never synchronise with the host."""
    args = [t.to(DEV) for t in (states, c, h, probs, grad_out)]
    torch.cuda.synchronize()
    with no_host_sync():
        out = C.rnn_mix_forward(*args[:4])
        grads = C.rnn_mix_backward(args[4], *args[:4])
    torch.cuda.synchronize()
    return (out,) + tuple(grads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_matches_formula(shape, dtype):
    states, c, h, probs, grad_out = make_inputs(shape, dtype)
    got = run_gpu(states, c, h, probs, grad_out)
    want = reference(states, c, h, probs, grad_out)
    tol = TOL[dtype]
    for name, g, w in zip(("out", "d states", "d c", "d h"), got[:4], want[:4]):
        assert g.dtype == dtype and g.device.type == DEV, f"{name}: {g.dtype} on {g.device}"
        check(g, w, tol, name)
    d_probs = got[4]
    assert d_probs.dtype == probs.dtype and d_probs.device.type == DEV
    assert (d_probs[:, 0] == 0).all(), "d probs: column 0 ('none') must be zero"
    # d probs sums B * H terms in the accumulation type and is rounded to probs' dtype at the end
    check_probs(d_probs, want[4], tol, ACC_TOL[dtype], probs_scale(states, c, h, grad_out))


@pytest.mark.parametrize(
    "dtype,probs_dtype",
    [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
     (torch.float64, torch.float32)],
    ids=lambda x: _id(x),
)
def test_probs_of_another_dtype(dtype, probs_dtype):
    """probs may have any floating dtype: used in the accumulation type, d probs returned in probs' dtype."""
    states, c, h, probs, grad_out = make_inputs((3, 4, 37), dtype, probs_dtype, seed=1)
    got = run_gpu(states, c, h, probs, grad_out)
    want = reference(states, c, h, probs, grad_out)
    tol = max(TOL[dtype], TOL[probs_dtype])
    for name, g, w in zip(("out", "d states", "d c", "d h"), got[:4], want[:4]):
        assert g.dtype == dtype
        check(g, w, tol, name)
    assert got[4].dtype == probs_dtype
    assert (got[4][:, 0] == 0).all()
    check_probs(got[4], want[4], tol, ACC_TOL[dtype], probs_scale(states, c, h, grad_out))


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_deterministic(dtype):
    """Two runs on the same inputs agree bit for bit (d probs reduced in a fixed order, no atomics)."""
    states, c, h, probs, grad_out = make_inputs((4, 64, 1000), dtype, seed=2)
    first = run_gpu(states, c, h, probs, grad_out)
    second = run_gpu(states, c, h, probs, grad_out)
    for name, a, b in zip(("out", "d states", "d c", "d h", "d probs"), first, second):
        assert torch.equal(a, b), f"{name}: two runs differ"


def test_non_contiguous_inputs():
    """Strided views are made contiguous by the kernels, with the same results."""
    states, c, h, probs, grad_out = make_inputs((3, 6, 10), torch.float64, seed=3)
    # transposed storage of the same values: (J, H, B) -> (J, B, H) views
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (states, c, h)]
    g_view = grad_out.t().contiguous().t()
    p_view = probs.t().contiguous().t()
    assert not views[0].is_contiguous() and not g_view.is_contiguous()
    got = run_gpu(*views, p_view, g_view)
    want = reference(states, c, h, probs, grad_out)
    for name, g, w in zip(("out", "d states", "d c", "d h", "d probs"), got, want):
        check(g, w, 1e-10, name)


def test_empty():
    """B * H == 0 gives empty results and a zero d probs, without launching on an empty grid."""
    states, c, h, probs, grad_out = make_inputs((2, 0, 5), torch.float32)
    out, ds, dc, dh, dp = run_gpu(states, c, h, probs, grad_out)
    assert out.shape == (0, 5) and ds.shape == (2, 0, 5) and dc.shape == (2, 0, 5) and dh.shape == (2, 0, 5)
    assert dp.shape == (2, 5) and dp.dtype == torch.float32 and (dp == 0).all()


# ---- h = +-inf, |h| where exp overflows float32, and NaN (the math of csrc/include/pynas/rnn_mix.h) ---------

EXTREME_H = [float("-inf"), float("inf"), 1e4, -1e4, 80.0, -80.0, 89.0, -89.0, 100.0, -100.0, float("nan")]
EXTREME_AT = [(0, 0, 3), (1, 3, 11), (2, 1, 7), (2, 1, 8), (0, 3, 12)]


def _agrees(what, got, want, tol):
    """Where ``want`` is not NaN: the same infinities, finite values within tol of the largest finite one; NaN
    where ``want`` is NaN."""
    got = got.detach().to("cpu", torch.float64)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN at {torch.isnan(got).nonzero()[:4].tolist()}, " \
        f"the formula at {nan.nonzero()[:4].tolist()}"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: {got[inf].tolist()} where the formula gives {want[inf].tolist()}"
    fin = torch.isfinite(want)
    scale = max(1.0, float(want[fin].abs().max())) if fin.any() else 1.0
    err = float((got[fin] - want[fin]).abs().max()) if fin.any() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("value", EXTREME_H, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_infinite_huge_and_nan_h(dtype, value):
    """The CPU float loops gave NaN for h = -inf (relu as h * (h > 0)); the shared header must not: -inf through
    the identity column stays -inf, saturated tanh / sigmoid give derivative 0, relu(NaN) is NaN."""
    states, c, h, probs, grad_out = make_inputs((3, 4, 13), dtype, seed=3)
    for at in EXTREME_AT:
        h[at] = value
    want = reference(states, c, h, probs, grad_out)
    got = run_gpu(states, c, h, probs, grad_out)
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else 4 * TOL[dtype]
    for what, a, b in zip(("out", "d states", "d c", "d h", "d probs"), got, want):
        _agrees(what, a, b, tol)
    if value == float("-inf"):
        assert all(float(got[0][at[1:]]) == float("-inf") for at in EXTREME_AT)
