"""The Triton kernels of the fused RNN node mix (kernels/rnn_mix.py) against plain PyTorch.

Truth is the plain-PyTorch formula of ``csrc/include/pynas/rnn_mix.h``::

    out = sum_j sum_{f in tanh, relu, sigmoid, identity} probs[j, f] * (s + c * (f(h) - s))

computed in float64 from the same inputs, with gradients by autograd. On the CPU the kernels run
under ``TRITON_INTERPRET=1`` (float64, float32; small shapes: the interpreter is slow); on a CUDA
machine the same tests run on cuda tensors, float16 and bfloat16 included (held loosely).
"""
import pytest
import torch

import pynas

if pynas.backends()["triton"] is not None:
    pytest.skip(f"triton is unusable here: {pynas.backends()['triton']}", allow_module_level=True)

from pynas._triton import kernel_module  # noqa: E402

K = kernel_module("rnn_mix")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
# (J, B, H): one node with a ragged block; several nodes over several programs (block_size 16).
SHAPES = [(1, 3, 7), (8, 5, 33)]
# Relative tolerance (of the largest |truth| of each result) per dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]


def _ids(xs):
    return [str(x).replace("torch.", "") for x in xs]


def _reference(s, c, h, p):
    """Plain PyTorch: sum_j sum_{f>=1} p[j, f] * (s + c * (f(h) - s)), shape (B, H)."""
    out = torch.zeros(s.shape[1:], dtype=s.dtype, device=s.device)
    for col, f in enumerate((torch.tanh, torch.relu, torch.sigmoid, lambda x: x), start=1):
        out = out + (p[:, col, None, None] * (s + c * (f(h) - s))).sum(dim=0)
    return out


def _truth(g, s, c, h, p):
    """(out, (d s, d c, d h, d p)) of the reference in float64 by autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (s, c, h, p)]
    out = _reference(*leaves)
    grads = torch.autograd.grad(out, leaves, g.double())
    return out.detach(), grads


def _inputs(J, B, H, dtype, h_scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(J, B, H, generator=gen, dtype=torch.float64)
    c = torch.sigmoid(torch.randn(J, B, H, generator=gen, dtype=torch.float64))
    h = torch.randn(J, B, H, generator=gen, dtype=torch.float64) * h_scale
    p = torch.softmax(torch.randn(J, 5, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.randn(B, H, generator=gen, dtype=torch.float64)
    s, c, h, g = (t.to(device=DEVICE, dtype=dtype) for t in (s, c, h, g))
    return g, s, c, h, p.to(device=DEVICE, dtype=dtype)


def _close(name, got, truth, dtype):
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - truth.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    assert err <= RTOL[dtype] * scale, f"{name}: max error {err:.3g} > {RTOL[dtype]:.1g} * {scale:.3g}"


def _check_all(g, s, c, h, p, block_size, dtype):
    out_t, grads_t = _truth(g, s, c, h, p)
    out = K.rnn_mix_forward(s, c, h, p, block_size=block_size)
    assert out.dtype == s.dtype and out.device == s.device and out.is_contiguous()
    _close("out", out, out_t, dtype)
    grads = K.rnn_mix_backward(g, s, c, h, p, block_size=block_size)
    assert len(grads) == 4
    for name, got, truth, like in zip(("d_states", "d_c", "d_h", "d_probs"), grads, grads_t, (s, c, h, p)):
        assert got.dtype == like.dtype and got.device == like.device, name
        _close(name, got, truth, dtype)
    assert (grads[3][:, 0] == 0).all(), "d_probs column 0 ('none') must be zero"


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_forward_backward(dtype, shape):
    _check_all(*_inputs(*shape, dtype), block_size=16, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_large_h_saturates(dtype):
    """|h| up to 30 (and far beyond in float32/64): sigmoid/tanh saturate without inf/nan."""
    g, s, c, h, p = _inputs(3, 4, 9, dtype, h_scale=30.0, seed=1)
    h = h.clamp(-30, 30)
    h[0, 0, :6] = torch.tensor([30.0, -30.0, 0.0, 20.0, -20.0, 1e-3], dtype=dtype)
    _check_all(g, s, c, h, p, block_size=16, dtype=dtype)
    if dtype in (torch.float32, torch.float64):
        huge = torch.full_like(h, 1e4)
        huge[1::2] = -1e4
        _check_all(g, s, c, huge, p, block_size=16, dtype=dtype)


def test_default_block_and_mixed_probs_dtype():
    """Default block size; probs in float32 with float64 inputs (d_probs in probs' dtype)."""
    g, s, c, h, p = _inputs(2, 6, 11, torch.float64, seed=2)
    p32 = p.float()
    out_t, grads_t = _truth(g, s, c, h, p32)
    _close("out", K.rnn_mix_forward(s, c, h, p32), out_t, torch.float64)
    ds, dc, dh, dp = K.rnn_mix_backward(g, s, c, h, p32)
    assert dp.dtype == torch.float32 and ds.dtype == torch.float64
    for name, got, truth in zip(("d_states", "d_c", "d_h"), (ds, dc, dh), grads_t):
        _close(name, got, truth, torch.float64)
    _close("d_probs", dp, grads_t[3], torch.float32)


def test_non_contiguous_inputs():
    g, s, c, h, p = _inputs(3, 7, 5, torch.float64, seed=3)
    st, ct, ht = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (s, c, h))
    assert not st.is_contiguous()
    _check_all(g.t().contiguous().t(), st, ct, ht, p, block_size=16, dtype=torch.float64)


def test_deterministic():
    g, s, c, h, p = _inputs(8, 5, 33, torch.float32, seed=4)
    first = K.rnn_mix_backward(g, s, c, h, p, block_size=16)
    again = K.rnn_mix_backward(g, s, c, h, p, block_size=16)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    out = K.rnn_mix_forward(s, c, h, p, block_size=16)
    assert torch.equal(out, K.rnn_mix_forward(s, c, h, p, block_size=16))


def test_empty():
    g, s, c, h, p = _inputs(0, 3, 4, torch.float64)
    out = K.rnn_mix_forward(s, c, h, p)
    assert out.shape == (3, 4) and (out == 0).all()
    ds, dc, dh, dp = K.rnn_mix_backward(g, s, c, h, p)
    assert ds.shape == (0, 3, 4) and dp.shape == (0, 5)
    g, s, c, h, p = _inputs(2, 0, 4, torch.float64)
    assert K.rnn_mix_forward(s, c, h, p).shape == (0, 4)
    ds, dc, dh, dp = K.rnn_mix_backward(g, s, c, h, p)
    assert ds.shape == (2, 0, 4) and dp.shape == (2, 5) and (dp == 0).all()


def _bad_cases():
    g, s, c, h, p = _inputs(2, 3, 4, torch.float64)
    return [
        ("states", TypeError, dict(states=s.tolist())),
        ("states", ValueError, dict(states=s[0], c=c[0], h=h[0])),
        ("states", TypeError, dict(states=s.long(), c=c.long(), h=h.long())),
        ("c", ValueError, dict(c=c[:, :2])),
        ("h", TypeError, dict(h=h.float())),
        ("c", TypeError, dict(c=None)),
        ("probs", ValueError, dict(probs=p[:, :4])),
        ("probs", ValueError, dict(probs=p[:1])),
        ("probs", ValueError, dict(probs=p.reshape(-1))),
        ("probs", TypeError, dict(probs=p.long())),
        ("probs", ValueError, dict(probs=p.to("meta"))),
        ("h", ValueError, dict(h=h.to("meta"))),
        ("grad_out", ValueError, dict(grad_out=g[:2])),
        ("grad_out", TypeError, dict(grad_out=g.long())),
        ("grad_out", TypeError, dict(grad_out=3.0)),
        ("grad_out", ValueError, dict(grad_out=g.to("meta"))),
        ("block_size", ValueError, dict(block_size=24)),
    ], dict(grad_out=g, states=s, c=c, h=h, probs=p)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_inputs(case):
    name, exc, change = _bad_cases()[0][case]
    args = dict(_bad_cases()[1], **change)
    block = args.pop("block_size", 16)
    fwd = dict(args)
    grad_out = fwd.pop("grad_out")
    if name != "grad_out":
        with pytest.raises(exc, match=rf"^{name}: expected"):
            K.rnn_mix_forward(**fwd, block_size=block)
    with pytest.raises(exc, match=rf"^{name}: expected"):
        K.rnn_mix_backward(grad_out, **fwd, block_size=block)


# ---- h = +-inf, |h| where exp overflows float32, and NaN: agree with the plain-PyTorch formula -------------

EXTREME_H = [float("-inf"), float("inf"), 1e4, -1e4, 80.0, -80.0, 89.0, -89.0, 100.0, -100.0]
EXTREME_AT = [(0, 0, 3), (1, 3, 11), (2, 1, 7), (2, 1, 8), (0, 3, 12)]  # (J, B, H) = (3, 4, 13): 4 programs of 16


def _truth_in(g, s, c, h, p, dtype):
    """[out, d s, d c, d h, d p] of the formula by autograd, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (s, c, h, p)]
    out = _reference(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(dtype)))


def _agrees(name, got, want, tol):
    """Where ``want`` is not NaN: the same infinities, and finite values within tol of the largest finite one."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    defined = ~torch.isnan(want)
    assert not torch.isnan(got[defined]).any(), f"{name}: NaN where the formula gives {want[defined & torch.isnan(got)][:4].tolist()}"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{name}: {got[inf].tolist()} where the formula gives {want[inf].tolist()}"
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{name}: non-finite where the formula is finite"
    scale = max(1.0, float(want[fin].abs().max())) if fin.any() else 1.0
    err = float((got[fin] - want[fin]).abs().max()) if fin.any() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _check_extreme(g, s, c, h, p, dtype):
    got = [K.rnn_mix_forward(s, c, h, p, block_size=16)] + list(K.rnn_mix_backward(g, s, c, h, p, block_size=16))
    names = ("out", "d_states", "d_c", "d_h", "d_probs")
    for name, a, b in zip(names, got, _truth_in(g, s, c, h, p, torch.float64)):
        _agrees(name + " (float64 formula)", a, b, RTOL[dtype])
    if dtype in (torch.float32, torch.float64):
        for name, a, b in zip(names, got, _truth_in(g, s, c, h, p, dtype)):
            _agrees(name + f" ({dtype} formula)", a, b, RTOL[dtype])
    return got


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf sums under the interpreter
@pytest.mark.parametrize("value", EXTREME_H, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_infinite_and_huge_h(dtype, value):
    g, s, c, h, p = _inputs(3, 4, 13, dtype, seed=5)
    for at in EXTREME_AT:
        h[at] = value
    got = _check_extreme(g, s, c, h, p, dtype)
    if value == float("-inf"):  # through the identity column (probs[:, 4] > 0)
        assert all(got[0][at[1:]] == float("-inf") for at in EXTREME_AT)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf sums under the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_nan_h_propagates_through_relu(dtype):
    """relu(NaN) = NaN (torch.relu): d probs of the relu column is NaN for the node with the NaN (the kernel
    took relu(NaN) = 0 and gave a finite value); the other nodes stay finite."""
    g, s, c, h, p = _inputs(3, 4, 13, dtype, seed=6)
    h[1, 2, 5] = float("nan")
    got = _check_extreme(g, s, c, h, p, dtype)
    truth = _truth_in(g, s, c, h, p, torch.float64)
    for a, b in zip(got, truth):
        assert torch.equal(torch.isnan(a.cpu()), torch.isnan(b))
    assert torch.isnan(got[4][1, 1:]).all() and torch.isfinite(got[4][[0, 2]]).all()
