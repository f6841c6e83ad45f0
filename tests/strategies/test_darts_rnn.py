"""The DARTS RNN architect's alpha step against the exact second-order gradient (double backward).

The RNN hypergradient (docs/darts.md, "The second-order step" and "Departures from the original code"):
    g = dL_train(w)/dw;  w' = w - eta * (clip_coef(g) * g + wd * w)
    dalpha, v = dL_val(w', alpha)/d(alpha, w')
    grad = dalpha - eta * clip_coef(g) * d/dalpha [ dL_train(w)/dw . v ]     (Hessian at the ORIGINAL w)
with clip_coef(x) = min(1, clip / (||x|| + 1e-6)) a constant: dw'/dalpha = -eta clip_coef(g) dg/dalpha. The architect approximates the mixed
Hessian-vector product by a central finite difference; with a small radius in float64 it matches.
"""
import copy

import pytest
import torch

import pynas
from pynas.rnn import RNNModelSearch
from pynas.strategies.darts import RNNArchitect as Architect

from conftest import gpu_backend_params

NTOKEN, NINP, T, B = 20, 5, 3, 3
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]  # tiny tensors: threads only stall

TOL = 1e-8  # relative (max-abs) tolerance of the finite difference with fd_r = 1e-5 in float64
WD = 5e-4  # larger than the default 5e-7, so the weight-decay term of the virtual step matters


def _cpu_built():
    return pynas.backends()["cpu"] is None


needs_cpu = pytest.mark.skipif(not _cpu_built(), reason="the C++ CPU backend is not built")


def _setup(dropouts=(0.0, 0.0, 0.0, 0.0, 0.0), seed=0):
    torch.manual_seed(seed)
    model = RNNModelSearch(NTOKEN, NINP, NINP, NINP, *dropouts).double()
    with torch.no_grad():
        model.weights.normal_(0, 0.5)
        for p in model.parameters():
            p.mul_(10)  # away from the tiny 0.04 init so the curvature terms are not negligible
        model.decoder.bias.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    data = dict(
        hidden_train=[torch.randn(1, B, NINP, generator=g, dtype=torch.float64)],
        input_train=torch.randint(0, NTOKEN, (T, B), generator=g),
        target_train=torch.randint(0, NTOKEN, (T * B,), generator=g),
        hidden_valid=[torch.randn(1, B, NINP, generator=g, dtype=torch.float64)],
        input_valid=torch.randint(0, NTOKEN, (T, B), generator=g),
        target_valid=torch.randint(0, NTOKEN, (T * B,), generator=g),
    )
    return model, data


def _clip_coef(grads, clip):
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in grads))
    return torch.clamp(clip / (norm + 1e-6), max=1.0), norm


def _exact(model, d, eta, clip, wd=WD, hessian_at_virtual=False):
    """The exact second-order alpha gradient (double backward), on a deep copy, reference backend.
    Also returns the pieces (dalpha, HVP, coefficients, norms, R-independent) for the wrong variants."""
    m = copy.deepcopy(model)
    assert m.rnns[0].weights is m.weights and m.decoder.weight is m.encoder.weight
    params = list(m.parameters())
    alphas = m.arch_parameters()
    w0 = [p.detach().clone() for p in params]
    with pynas.use_backend("reference"):
        loss = m._loss(d["hidden_train"], d["input_train"], d["target_train"])[0]
        g = torch.autograd.grad(loss, params)
        coef_g, norm_g = _clip_coef(g, clip)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(eta * (coef_g * gi + wd * p))
        w_virtual = [p.detach().clone() for p in params]
        loss_v, hidden_v = m._loss(d["hidden_valid"], d["input_valid"], d["target_valid"])
        grads = torch.autograd.grad(loss_v, alphas + params)
        dalpha, v = grads[0], grads[1:]
        coef_v, norm_v = _clip_coef(v, clip)
        if not hessian_at_virtual:
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
        loss = m._loss(d["hidden_train"], d["input_train"], d["target_train"])[0]
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        hvp = torch.autograd.grad(dot, alphas)[0]
    grad = dalpha - eta * coef_g * hvp
    return grad.detach(), dict(dalpha=dalpha, hvp=hvp, coef_g=coef_g, coef_v=coef_v, norm_g=norm_g,
                               norm_v=norm_v, w_virtual=w_virtual,
                               hidden_v=hidden_v[0].detach())


def _close(a, b, rtol):
    """max |a - b| <= rtol * max |b| (a relative error on the whole tensor)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return err <= rtol * scale, err / scale


@pytest.mark.parametrize("clipped", [True, False])
def test_unrolled_grad_is_the_exact_hypergradient(clipped):
    model, d = _setup()
    eta = 2.0
    clip = 1e-3 if clipped else 1e3
    exact, parts = _exact(model, d, eta, clip)
    if clipped:  # both clip coefficients active
        assert parts["norm_g"] > clip and parts["norm_v"] > clip
        assert parts["coef_g"] < 1 and parts["coef_v"] < 1
    else:
        assert parts["coef_g"] == 1 and parts["coef_v"] == 1
    # the correction is a sizeable part of the gradient, so a wrong correction is visible
    corr = (eta * parts["coef_g"] * parts["hvp"]).abs().max()
    assert corr > 1e-3 * parts["dalpha"].abs().max()
    # and the virtual step moved the weights
    assert any(not torch.equal(a, b) for a, b in zip(parts["w_virtual"], model.parameters()))

    arch = Architect(model, weight_decay=WD, clip=clip, fd_r=1e-5)
    with pynas.use_backend("reference"):
        out, hidden = arch.unrolled_grad(d["hidden_train"], d["input_train"], d["target_train"],
                                         d["hidden_valid"], d["input_valid"], d["target_valid"], eta)
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (36, 5)
    ok, rel = _close(out[0], exact, TOL)  # measured: ~1e-11 (clipped), ~1e-10 (unclipped)
    assert ok, rel
    # the returned hidden is the validation pass's, at the virtual weights w', detached
    assert isinstance(hidden, list) and len(hidden) == 1 and not hidden[0].requires_grad
    torch.testing.assert_close(hidden[0], parts["hidden_v"], rtol=1e-12, atol=1e-14)

    # the tolerance is meaningful: the known bugs of other ports would fail it by far
    R = 1e-5 / parts["norm_v"]
    fd = 2 * R * parts["hvp"]  # what (g+ - g-) is, to first order
    wrong_div = parts["dalpha"] - eta * parts["coef_g"] * fd / 2. * R  # "/ 2. * R"
    # (each misses the exact value by >= 1000 x TOL)
    assert not _close(wrong_div, exact, 1000 * TOL)[0]
    wrong_at_virtual, _ = _exact(model, d, eta, clip, hessian_at_virtual=True)
    assert not _close(wrong_at_virtual, exact, 1000 * TOL)[0]
    no_clip = parts["dalpha"] - eta * parts["hvp"]  # the correction not scaled by clip_coef(g)
    with_clip_v = parts["dalpha"] - eta * parts["coef_g"] * parts["coef_v"] * parts["hvp"]  # v clipped too
    if clipped:
        assert not _close(no_clip, exact, 1000 * TOL)[0]
        assert not _close(with_clip_v, exact, 1000 * TOL)[0]
    no_virtual_step, _ = _exact(model, d, 0.0, clip)  # a virtual step that never changes the weights
    no_virtual_step = no_virtual_step - eta * parts["coef_g"] * parts["hvp"]
    assert not _close(no_virtual_step, exact, 1000 * TOL)[0]


def test_unrolled_grad_detects_a_perturbed_exact_value():
    """Sanity of the comparison itself: one entry off by 1e-6 relative fails the tolerance."""
    model, d = _setup()
    exact, _ = _exact(model, d, 2.0, 1e-3)
    bad = exact.clone()
    bad[7, 2] += 1e-6 * exact.abs().max()
    assert not _close(bad, exact, TOL)[0]


def _grad_with(backend, model, d, eta, unrolled, seed, fd_r=0.01, clip=0.25):
    arch = Architect(model, weight_decay=WD, clip=clip, fd_r=fd_r)
    torch.manual_seed(seed)
    with pynas.use_backend(backend):
        if unrolled:
            return arch.unrolled_grad(d["hidden_train"], d["input_train"], d["target_train"],
                                      d["hidden_valid"], d["input_valid"], d["target_valid"], eta)
        return arch.first_order_grad(d["hidden_valid"], d["input_valid"], d["target_valid"])


@needs_cpu
@pytest.mark.parametrize("unrolled", [True, False])
def test_cpu_backend_matches_reference(unrolled):
    model, d = _setup(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1))
    m_ref, m_cpu = copy.deepcopy(model), copy.deepcopy(model)
    g_ref, h_ref = _grad_with("reference", m_ref, d, 1.5, unrolled, seed=11)
    g_cpu, h_cpu = _grad_with("cpu", m_cpu, d, 1.5, unrolled, seed=11)
    ok, rel = _close(g_cpu[0], g_ref[0], 1e-8)
    assert ok, rel
    torch.testing.assert_close(h_cpu[0], h_ref[0], rtol=1e-9, atol=1e-12)
    for a, b in zip(m_cpu.state_dict().values(), m_ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the dropouts are drawn: another seed gives another gradient
    g_other, _ = _grad_with("reference", copy.deepcopy(model), d, 1.5, unrolled, seed=12)
    assert not _close(g_other[0], g_ref[0], 1e-4)[0]


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=WD)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("unrolled", [True, False])
def test_step_restores_weights_and_keeps_one_pass_of_bn_stats(backend, unrolled):
    model, d = _setup(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1))
    before = [p.detach().clone() for p in model.parameters()]
    alpha_before = model.weights.detach().clone()
    buffers_before = [b.clone() for b in model.buffers()]
    # expected BN statistics: one training pass (train batch for second order, valid batch for first)
    expect = copy.deepcopy(model)
    torch.manual_seed(3)
    with pynas.use_backend(backend):
        if unrolled:
            expect._loss(d["hidden_train"], d["input_train"], d["target_train"])
        else:
            expect._loss(d["hidden_valid"], d["input_valid"], d["target_valid"])
    arch = Architect(model, weight_decay=WD, clip=0.25)
    torch.manual_seed(3)
    with pynas.use_backend(backend):
        out = arch.step(d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"],
                        d["input_valid"], d["target_valid"], _sgd(model, 1.0), unrolled)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for b, e, b0 in zip(model.buffers(), expect.buffers(), buffers_before):
        assert torch.equal(b, e)
        assert not torch.equal(b, b0)
    assert model.rnns[0].bn.num_batches_tracked.item() == 9 * T
    assert not torch.equal(model.weights.detach(), alpha_before)  # Adam stepped alpha
    assert model.weights.grad is not None
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    hidden = out[0]
    assert isinstance(hidden, list) and len(hidden) == 1 and hidden[0].shape == (1, B, NINP)
    assert not hidden[0].requires_grad and hidden[0].grad_fn is None


def test_step_sets_the_grad_and_returns_the_valid_hidden():
    model, d = _setup()
    m2 = copy.deepcopy(model)
    # first order: the hidden is the validation pass's at w, the grad dL_val/dalpha
    arch = Architect(model, weight_decay=WD, clip=0.25)
    with pynas.use_backend("reference"):
        hidden, _ = arch.step(d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"],
                              d["input_valid"], d["target_valid"], _sgd(model, 1.0), False)
        loss, h_exp = m2._loss(d["hidden_valid"], d["input_valid"], d["target_valid"])
    ga = torch.autograd.grad(loss, m2.weights)[0]
    torch.testing.assert_close(model.weights.grad, ga, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hidden[0], h_exp[0].detach(), rtol=1e-12, atol=1e-15)


def test_step_reads_eta_from_the_optimizer():
    model, d = _setup()
    clip = 1e-3
    grads = {}
    for lr in (0.5, 2.0):
        m = copy.deepcopy(model)
        arch = Architect(m, weight_decay=WD, clip=clip, fd_r=1e-5)
        with pynas.use_backend("reference"):
            arch.step(d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"],
                      d["input_valid"], d["target_valid"], _sgd(m, lr), True)
        grads[lr] = m.weights.grad.clone()
        exact, _ = _exact(model, d, lr, clip)
        ok, rel = _close(grads[lr], exact, TOL)
        assert ok, (lr, rel)
    assert not _close(grads[0.5], grads[2.0], 1e-3)[0]


def test_arch_optimizer_is_adam_with_default_betas():
    model, d = _setup()
    arch = Architect(model, weight_decay=WD, clip=0.25, arch_learning_rate=4e-3, arch_weight_decay=2e-3)
    opt = arch.optimizer
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["params"] == [model.weights] and group["params"][0] is model.weights
    assert tuple(group["betas"]) == (0.9, 0.999) and group["lr"] == 4e-3 and group["weight_decay"] == 2e-3
    # one Adam step from the first-order gradient, written out
    a0 = model.weights.detach().clone()
    with pynas.use_backend("reference"):
        arch.step(d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"],
                  d["input_valid"], d["target_valid"], _sgd(model, 1.0), False)
    g = model.weights.grad + 2e-3 * a0
    m = 0.1 * g
    v = 0.001 * g * g
    expected = a0 - 4e-3 * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)
    torch.testing.assert_close(model.weights.detach(), expected, rtol=1e-10, atol=1e-12)


def test_architect_argument_errors():
    model, _ = _setup()
    with pytest.raises(ValueError, match="fd_r"):
        Architect(model, fd_r=0.0)
    with pytest.raises(ValueError, match="clip"):
        Architect(model, clip=0.0)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_unrolled_grad_makes_no_host_sync_on_a_gpu(backend):
    """On CUDA tensors torch's sync debug mode is on too: any hidden device-to-host read fails (dropout masks
    included)."""
    from pynas._sync import no_host_sync

    model, d = _setup(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1))
    model = model.to("cuda")
    d = {k: ([t.to("cuda") for t in v] if isinstance(v, list) else v.to("cuda")) for k, v in d.items()}
    arch = Architect(model, weight_decay=WD, clip=0.25)
    args = (d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"], d["input_valid"],
            d["target_valid"], 1.0)
    with pynas.use_backend(backend):
        arch.unrolled_grad(*args)  # warm-up: compiles, lazy init, pinned blocks
        torch.cuda.synchronize()
        with no_host_sync():
            grads, _ = arch.unrolled_grad(*args)
    torch.cuda.synchronize()
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


@needs_cpu
def test_no_host_sync_in_the_unrolled_grad(monkeypatch):
    model, d = _setup(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1))
    arch = Architect(model, weight_decay=WD, clip=0.25)
    calls = []

    def forbid(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} called in the unrolled step")
        return f

    with pynas.use_backend("cpu"):
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        try:
            grads, hidden = arch.unrolled_grad(d["hidden_train"], d["input_train"], d["target_train"],
                                               d["hidden_valid"], d["input_valid"], d["target_valid"], 1.0)
        finally:
            monkeypatch.undo()
    assert calls == []
    assert torch.isfinite(grads[0]).all()
    # the check is live: a .item() inside would have been caught
    monkeypatch.setattr(torch.Tensor, "item", forbid("item"))
    with pytest.raises(AssertionError, match="host sync"):
        torch.ones(()).item()
    monkeypatch.undo()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("unrolled", [True, False])
def test_alpha_only_passes_with_frozen_weights_give_the_same_grad(backend, unrolled):
    """RNNArchitect runs its alpha-only passes (first order; the two finite differences) with the weights'
    requires_grad off, so the fused cell's backward skips its weight gradients: the gradient is bit for bit the
    one without, and every weight requires grad again afterwards."""
    model, d = _setup(dropouts=(0.3, 0.25, 0.4, 0.2, 0.1))
    out = []
    for freeze in (False, True):
        m = copy.deepcopy(model)
        arch = Architect(m, weight_decay=WD, clip=0.25)
        arch.freeze_weights = freeze
        torch.manual_seed(3)
        with pynas.use_backend(backend):
            if unrolled:
                g, _ = arch.unrolled_grad(d["hidden_train"], d["input_train"], d["target_train"], d["hidden_valid"],
                                          d["input_valid"], d["target_valid"], 1.5)
            else:
                g, _ = arch.first_order_grad(d["hidden_valid"], d["input_valid"], d["target_valid"])
        assert all(p.requires_grad for p in m.parameters())
        out.append(g[0])
    assert torch.equal(out[0], out[1])
