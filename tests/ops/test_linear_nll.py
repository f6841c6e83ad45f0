"""linear_nll (pynas.ops.linear_nll): the decoder, log-softmax and mean NLL in one node, against its
plain-PyTorch reference ``nll_loss(log_softmax(linear(h, W, b)), target)`` on CPU tensors: the C++ rows kernel,
and the Triton one under TRITON_INTERPRET=1 (GPU runs: tests/ops/test_linear_nll_cuda.py). Fresh random inputs,
loss and every gradient, several chunks with a ragged last one, frozen inputs, the incoming gradient's scale,
extreme and infinite logits, second derivatives through the reference, the language models' fused loss and the
argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pynas
from pynas._triton import interpreting
from pynas.ops import linear_nll as ln
from pynas.ops.linear_nll import linear_nll, linear_nll_ref

_CPU = pynas.backends()["cpu"] is None
_TRITON = pynas.backends()["triton"] is None and interpreting()
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _CPU, reason=f"cpu: {pynas.backends()['cpu']}")),
    pytest.param("triton", marks=pytest.mark.skipif(not _TRITON, reason="triton unusable on CPU tensors here: "
                                                    f"{pynas.backends()['triton'] or 'TRITON_INTERPRET unset'}")),
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-5, atol=2e-7)}


def _inputs(N, D, V, dtype, seed, bias=True, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (spread * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    w = (0.3 * torch.randn(V, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    b = (0.5 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t


def _loss_and_grads(fn, h, w, b, t, scale=1.0):
    ins = [x for x in (h, w, b) if x is not None and x.requires_grad]
    loss = fn(h, w, b, t)
    grads = torch.autograd.grad(loss * scale, ins)
    return loss.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("N,D,V,bias", [(1, 3, 5, True), (7, 4, 13, False), (37, 16, 301, True)])
def test_matches_the_reference(backend, dtype, N, D, V, bias):
    h, w, b, t = _inputs(N, D, V, dtype, seed=N + V, bias=bias)
    want = _loss_and_grads(linear_nll_ref, h, w, b, t, scale=2.5)
    got = _loss_and_grads(lambda *a: linear_nll(*a, backend=backend), h, w, b, t, scale=2.5)
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_and_a_ragged_last_one(backend, monkeypatch):
    """Rows in chunks of 3 (CHUNK_LOGITS // V) with 2 left for the last: the same loss and gradients as one chunk
    and as the reference; the grad_W and grad_b sums over chunks included."""
    h, w, b, t = _inputs(11, 5, 17, torch.float64, seed=3)
    one = _loss_and_grads(lambda *a: linear_nll(*a, backend=backend), h, w, b, t)
    monkeypatch.setattr(ln, "CHUNK_LOGITS", 3 * 17 + 5)
    many = _loss_and_grads(lambda *a: linear_nll(*a, backend=backend), h, w, b, t)
    want = _loss_and_grads(linear_nll_ref, h, w, b, t)
    for got in (one, many):
        torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
        for a, e in zip(got[1], want[1]):
            torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "bias", "h", "weight+bias"])
def test_frozen_inputs_get_no_gradient_and_the_others_the_same(backend, frozen):
    h, w, b, t = _inputs(9, 4, 23, torch.float64, seed=5)
    named = dict(h=h, weight=w, bias=b)
    for name in frozen.split("+"):
        named[name].requires_grad_(False)
    want = _loss_and_grads(linear_nll_ref, h, w, b, t)
    got = _loss_and_grads(lambda *a: linear_nll(*a, backend=backend), h, w, b, t)
    assert len(got[1]) == len(want[1]) == 3 - len(frozen.split("+"))
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_gives_the_loss_only(backend):
    h, w, b, t = _inputs(6, 3, 11, torch.float32, seed=7)
    with torch.no_grad():
        got = linear_nll(h, w, b, t, backend=backend)
        want = linear_nll_ref(h, w, b, t)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_infinite_logits(backend):
    """Logits spread over +-200 (exp(x - max) far below float's range for most classes), one class at -inf,
    one row whose target is the -inf class (NLL inf); an inf logit or a NaN gives NaN, as the reference."""
    h, w, b, t = _inputs(8, 6, 40, torch.float32, seed=11, spread=60.0)
    with torch.no_grad():
        b[3] = float("-inf")
    t[5] = 3
    for x in (h, w, b):
        x.requires_grad_(False)
    got = linear_nll(h, w, b, t, backend=backend)
    want = linear_nll_ref(h, w, b, t)
    assert torch.isinf(got) and torch.isinf(want)
    t[5] = 4
    h.requires_grad_(True)
    want = _loss_and_grads(linear_nll_ref, h, w, b, t)
    got = _loss_and_grads(lambda *a: linear_nll(*a, backend=backend), h, w, b, t)
    assert torch.isfinite(want[0])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-4, atol=1e-6)
    for bad in (float("inf"), float("nan")):
        b2 = b.clone()
        b2[7] = bad
        with torch.no_grad():
            assert torch.isnan(linear_nll(h, w, b2, t, backend=backend)) and torch.isnan(linear_nll_ref(h, w, b2, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_through_the_reference(backend):
    h, w, b, t = _inputs(5, 3, 7, torch.float64, seed=13)
    torch.autograd.gradcheck(lambda *a: linear_nll(*a, t, backend=backend), (h, w, b))
    torch.autograd.gradgradcheck(lambda *a: linear_nll(*a, t, backend=backend), (h, w, b))
    v = [torch.randn_like(x) for x in (h, w, b)]

    def hvp(fn):
        g = torch.autograd.grad(fn(h, w, b, t), (h, w, b), create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), (h, w, b))

    for a, e in zip(hvp(lambda *a: linear_nll(*a, backend=backend)), hvp(linear_nll_ref)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


def test_reference_backend_is_the_composition():
    h, w, b, t = _inputs(4, 3, 6, torch.float64, seed=17)
    with pynas.use_backend("reference"):
        got = linear_nll(h, w, b, t)
    assert torch.equal(got, F.nll_loss(F.log_softmax(F.linear(h, w, b), -1), t))


@pytest.mark.skipif(not _CPU, reason="the C++ CPU backend is not built")
def test_argument_errors():
    h, w, b, t = _inputs(4, 3, 6, torch.float32, seed=19)
    with pytest.raises(ValueError, match="^h: expected"):
        linear_nll(h[0], w, b, t)
    with pytest.raises(ValueError, match="^weight: expected"):
        linear_nll(h, w[:, :2], b, t)
    with pytest.raises(ValueError, match="^weight: expected"):
        linear_nll(h, w.double(), b, t)
    with pytest.raises(ValueError, match="^bias: expected"):
        linear_nll(h, w, b[:5], t)
    with pytest.raises(ValueError, match="^target: expected"):
        linear_nll(h, w, b, t.int())
    with pytest.raises(ValueError, match="^target: expected"):
        linear_nll(h, w, b, t[:3])
    with pytest.raises(RuntimeError, match="target: expected class indices in \\[0, 6\\), got 6"):
        linear_nll(h, w, b, torch.tensor([0, 1, 6, 2]), backend="cpu")
    with pytest.raises(RuntimeError, match="target: expected class indices in \\[0, 6\\), got -1"):
        with torch.no_grad():
            linear_nll(h, w, b, torch.tensor([0, -1, 5, 2]), backend="cpu")


@pytest.mark.skipif(not _CPU, reason="the C++ CPU backend is not built")
def test_rows_kernel_binding_checks():
    C = pynas._ext.get()
    x, t, nll = torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.empty(3)
    with pytest.raises(RuntimeError, match="logits: expected a contiguous"):
        C.linear_nll_rows_(x.t().contiguous().t(), t, nll, False, 1.0)
    with pytest.raises(RuntimeError, match="target: expected a contiguous \\(3,\\) int64"):
        C.linear_nll_rows_(x, t.int(), nll, False, 1.0)
    with pytest.raises(RuntimeError, match="nll: expected a contiguous \\(3,\\)"):
        C.linear_nll_rows_(x, t, torch.empty(3, dtype=torch.float64), False, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64 on the CPU"):
        C.linear_nll_rows_(x.half(), t, nll.half(), False, 1.0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _CPU, reason="the C++ CPU backend is not built"))])
def test_language_model_loss_is_the_log_prob_path(backend):
    """RNNModelSearch.nll (the fused loss the search and the architect take) equals nll_loss on the forward's
    log-probabilities, with the same dropout draws, and gives the tied encoder/decoder weight the same
    gradient."""
    from pynas.rnn import RNNModelSearch

    torch.manual_seed(0)
    model = RNNModelSearch(50, 8, 8, 8, 0.3, 0.2, 0.3, 0.2, 0.1).double()
    x, y = torch.randint(0, 50, (5, 3)), torch.randint(0, 50, (15,))
    hidden = model.init_hidden(3)
    with pynas.use_backend(backend):
        torch.manual_seed(1)
        log_prob, _ = model(x, hidden)
        want = F.nll_loss(log_prob.view(-1, 50), y)
        gw = torch.autograd.grad(want, model.encoder.weight)[0]
        torch.manual_seed(1)
        got, _ = model.nll(x, hidden, y)
        gg = torch.autograd.grad(got, model.encoder.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-14)
