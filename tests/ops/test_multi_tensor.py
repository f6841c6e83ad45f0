"""The multi-tensor ops of the second-order step: C++ kernels against the torch._foreach reference."""
import pytest
import torch

import pynas
from pynas.ops import multi_tensor as mt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built")]

SHAPES = [(3, 4), (70000,), (1,), (16, 8, 3, 3), (0,), (5, 1, 1, 7)]


def _lists(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]  # noqa: E731
    return mk(), mk(), mk()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_scale", [False, True])
def test_virtual_step(dtype, with_scale):
    params, grads, bufs = _lists(dtype)
    bufs[1] = None  # a parameter without a momentum buffer yet
    scale = torch.tensor(0.37, dtype=torch.float64) if with_scale else None
    ref = [p.clone() for p in params]
    mt.virtual_step_(ref, grads, bufs, 0.025, 0.9, 3e-4, scale, backend="reference")
    out = [p.clone() for p in params]
    mt.virtual_step_(out, grads, bufs, 0.025, 0.9, 3e-4, scale, backend="cpu")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2) \
        if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for a, b, p, g, buf in zip(out, ref, params, grads, bufs):
        torch.testing.assert_close(a, b, **tol)
        # and against the formula in float64
        s = 0.37 if with_scale else 1.0
        expect = p.double() - 0.025 * (s * g.double() + 3e-4 * p.double() + (0.9 * buf.double() if buf is not None else 0))
        torch.testing.assert_close(a.double(), expect, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sum_squares_and_perturb(dtype):
    params, base, v = _lists(dtype, 1)
    truth = sum((x.double() ** 2).sum() for x in v)
    ss = mt.sum_squares(v, backend="cpu")
    assert ss.dtype == torch.float64 and ss.dim() == 0
    torch.testing.assert_close(ss, truth, rtol=1e-12, atol=0)
    torch.testing.assert_close(mt.sum_squares(v, backend="reference"), truth, rtol=1e-6, atol=0)
    for sign in (1.0, -1.0):
        out = [p.clone() for p in params]
        R = mt.perturb_(out, base, v, ss, 0.01, sign, backend="cpu")
        torch.testing.assert_close(R, 0.01 / truth.sqrt())
        for a, b0, vv in zip(out, base, v):
            torch.testing.assert_close(a.double(), b0.double() + sign * R * vv.double(),
                                       rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_sum_squares_does_not_depend_on_threads():
    xs = [torch.randn(100003), torch.randn(7, 9000)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = mt.sum_squares(xs, backend="cpu")
        torch.set_num_threads(2)
        b = mt.sum_squares(xs, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


def test_copy_is_bit_exact():
    params, base, _ = _lists(torch.float32, 2)
    mt.copy_(params, base, backend="cpu")
    for a, b in zip(params, base):
        assert torch.equal(a, b)


def test_zero_vector_gives_finite_radius():
    params, base, v = _lists(torch.float64, 3)
    v = [torch.zeros_like(x) for x in v]
    R = mt.perturb_(params, base, v, mt.sum_squares(v, backend="cpu"), 0.01, 1.0, backend="cpu")
    assert torch.isfinite(R)
    for a, b in zip(params, base):
        assert torch.equal(a, b)


def _backend_devices():
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if torch.cuda.is_available() else "cpu")]
    if torch.cuda.is_available():
        pairs += [("reference", "cuda"), ("cuda", "cuda")]
    return [pytest.param(b, d, id=f"{b}-{d}", marks=pytest.mark.skipif(
        pynas.backends()[b] is not None, reason=f"backend {b} unusable here: {pynas.backends()[b]}")) for b, d in pairs]


@pytest.mark.parametrize("backend, device", _backend_devices())
def test_nan_norm_gives_nan_radius_on_every_backend(backend, device):
    # a NaN in v must not turn into a huge finite R (fmax / max.f64 would return the other operand)
    params, base, v = ([t.to(device) for t in ts] for ts in _lists(torch.float32, 4))
    v[0].view(-1)[0] = float("nan")
    ss = mt.sum_squares(v, backend=backend)
    R = mt.perturb_(params, base, v, ss, 0.01, 1.0, backend=backend)
    assert torch.isnan(ss) and torch.isnan(R)
    assert all(torch.isnan(p).all() for p in params if p.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_sum_squares_accumulates_in_float64(dtype):
    _, _, v = _lists(dtype, 5)
    truth = sum(float((x.double() ** 2).sum()) for x in v)
    ss = mt.sum_squares(v, backend="reference")
    assert ss.dtype == torch.float64 and abs(float(ss) - truth) <= 1e-12 * truth


def test_bad_inputs_name_the_argument():
    a = [torch.randn(3), torch.randn(4)]
    with pytest.raises(RuntimeError, match="grads: expected 2 tensors"):
        torch.ops.pynas.mt_virtual_step_(a, a[:1], [], 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"grads\[1\]: expected the shape of params\[1\]"):
        torch.ops.pynas.mt_virtual_step_(a, [torch.randn(3), torch.randn(5)], [], 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"bufs: expected no entry or one entry"):
        torch.ops.pynas.mt_virtual_step_(a, a, [None], 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"v\[0\]: expected the dtype and device"):
        torch.ops.pynas.mt_perturb_(a, a, [torch.randn(3).double(), torch.randn(4)], torch.tensor(1.0), 0.01, 1.0)
    with pytest.raises(RuntimeError, match="r: expected a positive value"):
        torch.ops.pynas.mt_perturb_(a, a, a, torch.tensor(1.0), 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"src\[0\]: expected a dense contiguous tensor"):
        torch.ops.pynas.mt_copy_(a, [torch.randn(3, 2).t().reshape(-1)[:3].as_strided((3,), (2,)), a[1]])


def test_architect_uses_the_kernels_and_restores_weights_bit_for_bit(monkeypatch):
    from torch import nn

    from pynas.strategies.darts import CNNArchitect as Architect
    from pynas.cnn import Network

    calls = []
    real = mt._implementation
    def spy(params, backend=None):
        impl = real(params, backend)
        calls.append((len(params), impl is not None))
        return impl

    monkeypatch.setattr(mt, "_implementation", spy)
    torch.manual_seed(0)
    model = Network(2, 10, 2, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    model._loss(torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))).backward()
    opt.step()  # momentum buffers exist
    before = [p.detach().clone() for p in model.parameters()]
    arch = Architect(model)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    with pynas.use_backend("cpu"):
        arch.step(x, y, x, y, 0.1, opt, unrolled=True)
    n = len(list(model.parameters()))
    weight_passes = [used for size, used in calls if size == n]
    assert len(weight_passes) >= 6 and all(weight_passes)  # every pass over the weights took the kernels
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_rnn_variant_clipped_virtual_step_matches_clip_grad_norm():
    """DARTS RNN: w' = w - eta * (clip(g, 0.25) + wd * w), no momentum."""
    params, grads, _ = _lists(torch.float64, 4)
    clipped = [g.clone() for g in grads]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    coef = min(1.0, 0.25 / (float(total) + 1e-6))
    for c in clipped:
        c.mul_(coef)
    ref = [p - 20.0 * (c + 5e-7 * p) for p, c in zip(params, clipped)]
    scale = mt.clip_coefficient(mt.sum_squares(grads, backend="cpu"), 0.25)
    out = [p.clone() for p in params]
    mt.virtual_step_(out, grads, None, 20.0, 0.0, 5e-7, scale, backend="cpu")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(pynas.backends()["triton"] is not None, reason="triton unusable here (TRITON_INTERPRET=1 on CPU)")
def test_triton_backend_dispatches_to_the_triton_kernels():
    params, base, v = _lists(torch.float64, 5)
    impl = mt._implementation(params, "triton")
    assert impl is not None and impl.__name__.endswith("kernels.multi_tensor")
    ss = mt.sum_squares(v, backend="triton")
    torch.testing.assert_close(ss, mt.sum_squares(v, backend="cpu"), rtol=1e-12, atol=0)
    out = [p.clone() for p in params]
    mt.perturb_(out, base, v, ss, 0.01, -1.0, backend="triton")
    ref = [p.clone() for p in params]
    mt.perturb_(ref, base, v, ss, 0.01, -1.0, backend="cpu")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
