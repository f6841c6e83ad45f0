"""The DARTS architect (pynas.compat.darts.cnn.Architect) against exact autograd math in float64.

The oracle computes the DARTS second-order gradient exactly, by double backward:
    w'(alpha) = w - eta * (momentum * buf + dL_train(w, alpha)/dw + wd * w)
    grad_alpha = d L_val(w'(alpha), alpha) / d alpha
which is what the finite difference of docs/darts.md ("The second-order step") approximates; with
a small fd_r in float64 the two agree to ~1e-9.
"""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

import pynas
from pynas.compat.darts.cnn import Architect, Network

from conftest import gpu_backend_params

MOM, WD = 0.9, 3e-4
ARCH_LR, ARCH_WD = 3e-3, 1e-3


pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------------------------
# set-up and oracles
# ----------------------------------------------------------------------------------------------

def _args(**extra):
    ns = SimpleNamespace(momentum=MOM, weight_decay=WD, arch_learning_rate=ARCH_LR, arch_weight_decay=ARCH_WD)
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def _setup(seed=0, weight_steps=2, C=3, layers=3, N=4, hw=8, num_classes=5):
    """A tiny float64 search net (cell 0 normal, cells 1 and 2 reduction), random alphas,
    batches, and an SGD weight optimizer that has taken ``weight_steps`` real steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    net = Network(C, num_classes, layers, nn.CrossEntropyLoss()).double().train()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float64))

    def batch():
        return (torch.randn(N, 3, hw, hw, generator=gen, dtype=torch.float64),
                torch.randint(0, num_classes, (N,), generator=gen))

    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=MOM, weight_decay=WD)
    for _ in range(weight_steps):
        x, y = batch()
        opt.zero_grad()
        net._loss(x, y).backward()
        opt.step()
    for a in net.arch_parameters():
        a.grad = None
    if weight_steps:
        assert all(opt.state[p]["momentum_buffer"].abs().max() > 0 for p in net.parameters()
                   if p.grad is not None and p.grad.abs().max() > 0)
    xt, yt = batch()
    xv, yv = batch()
    return net, opt, xt, yt, xv, yv


@contextlib.contextmanager
def _oracle(net):
    """Plain-PyTorch mixing (double-differentiable) and BN buffers left as they were."""
    saved = [(b, b.detach().clone()) for b in net.buffers()]
    try:
        with pynas.use_backend("reference"):
            yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _loss_at(net, weights, x, y):
    names = [n for n, _ in net.named_parameters()]
    return net._criterion(functional_call(net, dict(zip(names, weights)), (x,)), y)


def _bufs(net, opt):
    return [opt.state.get(p, {}).get("momentum_buffer") for p in net.parameters()]


def _virtual_weights(net, opt, xt, yt, eta, differentiable):
    """w' = w - eta * (mom * buf + dL_train/dw + wd * w); a function of alpha if differentiable."""
    params = list(net.parameters())
    g = torch.autograd.grad(net._loss(xt, yt), params, create_graph=differentiable)
    out = []
    for p, gi, b in zip(params, g, _bufs(net, opt)):
        d = gi + WD * p.detach()
        if b is not None:
            d = d + MOM * b
        w = p.detach() - eta * d
        out.append(w if differentiable else w.detach())
    return out


def exact_unrolled(net, opt, xt, yt, xv, yv, eta):
    """d L_val(w'(alpha), alpha) / d alpha by double backward (zeros for an unused alpha)."""
    alphas = net.arch_parameters()
    with _oracle(net):
        w1 = _virtual_weights(net, opt, xt, yt, eta, differentiable=True)
        g = torch.autograd.grad(_loss_at(net, w1, xv, yv), alphas, allow_unused=True)
        return [torch.zeros_like(a) if gi is None else gi for a, gi in zip(alphas, g)]


def _hvp_alpha_w(net, weights, x, y, v):
    """(d^2 L_train / d alpha d w) v at the given weights, exactly."""
    w = [t.detach().requires_grad_(True) for t in weights]
    g = torch.autograd.grad(_loss_at(net, w, x, y), w, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return torch.autograd.grad(dot, net.arch_parameters())


def variants(net, opt, xt, yt, xv, yv, eta):
    """The exact gradient written as dalpha - eta * H(w) v, and the known bugs' results."""
    alphas = net.arch_parameters()
    params = [p.detach() for p in net.parameters()]
    out = {}
    with _oracle(net):
        w1 = _virtual_weights(net, opt, xt, yt, eta, differentiable=False)
        w1r = [t.requires_grad_(True) for t in w1]
        g = torch.autograd.grad(_loss_at(net, w1r, xv, yv), list(alphas) + w1r)
        dalpha, v = g[:2], g[2:]
        h_w = _hvp_alpha_w(net, params, xt, yt, v)
        h_w1 = _hvp_alpha_w(net, w1, xt, yt, v)
        out["exact_by_hvp"] = [d - eta * h for d, h in zip(dalpha, h_w)]
        # bug: the Hessian term lost (e.g. `/ 2. * eps` makes it O(R^2)): dalpha alone.
        out["no_hessian_term"] = list(dalpha)
        # bug: the Hessian taken at w' instead of w.
        out["hessian_at_w_prime"] = [d - eta * h for d, h in zip(dalpha, h_w1)]
        # bug: a virtual step that never changes the weights (everything at w).
        w0r = [p.clone().requires_grad_(True) for p in params]
        g0 = torch.autograd.grad(_loss_at(net, w0r, xv, yv), list(alphas) + w0r)
        h0 = _hvp_alpha_w(net, params, xt, yt, g0[2:])
        out["no_virtual_step"] = [d - eta * h for d, h in zip(g0[:2], h0)]
        out["first_order"] = list(g0[:2])
    return out


def fd_unrolled(net, opt, xt, yt, xv, yv, eta, r):
    """The finite difference of docs/darts.md ("The second-order step", step 3) at radius r (an oracle for fd_r)."""
    alphas = net.arch_parameters()
    params = [p.detach() for p in net.parameters()]
    with _oracle(net):
        w1 = [t.requires_grad_(True) for t in _virtual_weights(net, opt, xt, yt, eta, differentiable=False)]
        g = torch.autograd.grad(_loss_at(net, w1, xv, yv), list(alphas) + w1)
        dalpha, v = g[:2], g[2:]
        R = r / torch.sqrt(sum((vi * vi).sum() for vi in v))
        gp = torch.autograd.grad(_loss_at(net, [p + R * vi for p, vi in zip(params, v)], xt, yt), alphas)
        gm = torch.autograd.grad(_loss_at(net, [p - R * vi for p, vi in zip(params, v)], xt, yt), alphas)
        return [d - eta * (a - b) / (2 * R) for d, a, b in zip(dalpha, gp, gm)]


def rel(a, b):
    """Largest relative (norm-wise) difference over the two arch tensors."""
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# second order
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_steps", [0, 2])
def test_unrolled_step_matches_exact_hypergradient(weight_steps):
    eta = 0.3
    net, opt, xt, yt, xv, yv = _setup(seed=weight_steps, weight_steps=weight_steps)
    exact = exact_unrolled(net, opt, xt, yt, xv, yv, eta)
    for e in exact:
        assert e.abs().max() > 0  # both arch tensors are used (layers=3 has a normal cell)

    params = list(net.parameters())
    w_before = [p.detach().clone() for p in params]
    bufs_before = [None if b is None else (b, b.clone()) for b in _bufs(net, opt)]
    bn_before = {n: b.clone() for n, b in net.named_buffers()}
    alphas_before = [a.detach().clone() for a in net.arch_parameters()]

    arch = Architect(net, _args(fd_r=1e-6))
    arch.step(xt, yt, xv, yv, eta, opt, True)

    # The gradient handed to Adam is the exact DARTS hypergradient (to FD accuracy).
    got = [a.grad for a in net.arch_parameters()]
    assert all(g is not None for g in got)
    assert rel(got, exact) < 1e-7, rel(got, exact)

    # The weights are restored bit for bit, the momentum buffers untouched.
    for p, w in zip(params, w_before):
        assert torch.equal(p.detach(), w)
    for b, now in zip(bufs_before, _bufs(net, opt)):
        if b is None:
            assert now is None
        else:
            assert now is b[0] and torch.equal(now, b[1])

    # Adam's first step with that gradient: m_hat = g', v_hat = g'^2, g' = g + arch_wd * alpha.
    for a, before in zip(net.arch_parameters(), alphas_before):
        g = a.grad + ARCH_WD * before
        want = before - ARCH_LR * g / (g.abs() + 1e-8)
        assert (a.detach() - want).abs().max() <= 1e-12

    # BN running stats: as in the reference code, updated by the train-batch forwards at
    # w, w + Rv and w - Rv (R ~ 1e-6 here, so ~= three train forwards at w), not by the
    # pass at w' (which the reference runs on a throw-away copy of the model).
    want = copy.deepcopy(net)
    with torch.no_grad():
        for a, a0 in zip(want.arch_parameters(), alphas_before):
            a.copy_(a0)  # the passes ran before Adam moved alpha
        for name, b in want.named_buffers():
            b.copy_(bn_before[name])
        with pynas.use_backend("reference"):
            for _ in range(3):
                want(xt)
    want_bufs = dict(want.named_buffers())
    for name, b in net.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert b.item() == bn_before[name].item() + 3, name
        else:
            w = want_bufs[name]
            assert (b - w).abs().max() <= 1e-5 * (1 + w.abs().max()), name


def test_unrolled_grad_catches_known_bugs():
    """The exact result is far (relative to the 1e-7 tolerance) from what each known bug gives."""
    eta = 0.3
    net, opt, xt, yt, xv, yv = _setup(seed=5)
    exact = exact_unrolled(net, opt, xt, yt, xv, yv, eta)
    var = variants(net, opt, xt, yt, xv, yv, eta)
    # Two independent ways to the exact value agree (the oracle checks itself).
    assert rel(var["exact_by_hvp"], exact) < 1e-11
    # Each buggy variant differs by far more than the tolerance used against pynas.
    for name in ("no_hessian_term", "hessian_at_w_prime", "no_virtual_step", "first_order"):
        assert rel(var[name], exact) > 1e-4, (name, rel(var[name], exact))

    arch = Architect(net, _args(fd_r=1e-6))
    w_before = [p.detach().clone() for p in net.parameters()]
    got = arch.unrolled_grad(xt, yt, xv, yv, eta, opt)
    assert rel(got, exact) < 1e-7
    for name in ("no_hessian_term", "hessian_at_w_prime", "no_virtual_step", "first_order"):
        assert rel(got, var[name]) > 1e-5, name
    for p, w in zip(net.parameters(), w_before):
        assert torch.equal(p.detach(), w)


def test_unrolled_grad_over_eta():
    """eta = 0 gives the first-order gradient; other etas match the exact value."""
    net, opt, xt, yt, xv, yv = _setup(seed=7)
    arch = Architect(net, _args(fd_r=1e-6))
    with _oracle(net):
        first = list(torch.autograd.grad(net._loss(xv, yv), net.arch_parameters()))
    got0 = arch.unrolled_grad(xt, yt, xv, yv, 0.0, opt)
    assert rel(got0, first) < 1e-7
    for eta in (0.05, 0.5):
        exact = exact_unrolled(net, opt, xt, yt, xv, yv, eta)
        assert rel(arch.unrolled_grad(xt, yt, xv, yv, eta, opt), exact) < 1e-7


@pytest.mark.parametrize("unrolled", [False, True])
def test_network_without_normal_cells(unrolled):
    """layers=2 makes both cells reduction cells: alphas_normal is unused and gets a zero gradient."""
    eta = 0.3
    net, opt, xt, yt, xv, yv = _setup(seed=17, layers=2)
    assert all(c.reduction for c in net.cells)
    if unrolled:
        want = exact_unrolled(net, opt, xt, yt, xv, yv, eta)
    else:
        with _oracle(net):
            want = [torch.zeros_like(net.alphas_normal),
                    torch.autograd.grad(net._loss(xv, yv), net.alphas_reduce)[0]]
    arch = Architect(net, _args(fd_r=1e-6))
    arch.step(xt, yt, xv, yv, eta, opt, unrolled)
    assert torch.equal(net.alphas_normal.grad, torch.zeros_like(net.alphas_normal))
    assert torch.equal(want[0], torch.zeros_like(net.alphas_normal))
    assert rel([net.alphas_reduce.grad], [want[1]]) < 1e-7


# ----------------------------------------------------------------------------------------------
# first order
# ----------------------------------------------------------------------------------------------

def test_first_order_step_gradient_and_adam():
    net, opt, xt, yt, xv, yv = _setup(seed=3, weight_steps=1)
    gen = torch.Generator().manual_seed(33)
    arch = Architect(net, _args())
    group = arch.optimizer.param_groups[0]
    assert isinstance(arch.optimizer, torch.optim.Adam)
    assert group["lr"] == ARCH_LR and tuple(group["betas"]) == (0.5, 0.999)
    assert group["weight_decay"] == ARCH_WD
    assert all(p is a for p, a in zip(group["params"], net.arch_parameters()))

    w_before = [p.detach().clone() for p in net.parameters()]
    b1, b2, eps = 0.5, 0.999, 1e-8
    m = [torch.zeros_like(a) for a in net.arch_parameters()]
    v = [torch.zeros_like(a) for a in net.arch_parameters()]
    for t in (1, 2, 3):
        xv = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
        yv = torch.randint(0, 5, (4,), generator=gen)
        alphas = net.arch_parameters()
        with _oracle(net):
            direct = torch.autograd.grad(net._loss(xv, yv), alphas)
        before = [a.detach().clone() for a in alphas]
        arch.step(xt, yt, xv, yv, 0.025, opt, False)
        for a, d in zip(alphas, direct):
            assert a.grad is not None
            assert rel([a.grad], [d]) < 1e-12
        # Adam with L2 weight decay, betas (0.5, 0.999), by hand.
        for i, (a, d, a0) in enumerate(zip(alphas, direct, before)):
            g = d + ARCH_WD * a0
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            want = a0 - ARCH_LR * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            assert (a.detach() - want).abs().max() <= 1e-12, (t, i)
    # First order never touches the weights.
    for p, w in zip(net.parameters(), w_before):
        assert torch.equal(p.detach(), w)


# ----------------------------------------------------------------------------------------------
# fd_r
# ----------------------------------------------------------------------------------------------

def test_fd_r_default_is_001():
    eta = 0.3
    net, opt, xt, yt, xv, yv = _setup(seed=11)
    arch = Architect(net, _args())  # no fd_r in args
    assert arch.fd_r == 0.01
    got = arch.unrolled_grad(xt, yt, xv, yv, eta, opt)
    want = fd_unrolled(net, opt, xt, yt, xv, yv, eta, 0.01)
    other = fd_unrolled(net, opt, xt, yt, xv, yv, eta, 1e-4)
    assert rel(got, want) < 1e-9
    assert rel(other, want) > max(1e3 * rel(got, want), 1e-7)  # the radius is visible at this tolerance


@pytest.mark.parametrize("r", [1e-3, 0.1])
def test_fd_r_is_honoured(r):
    eta = 0.3
    net, opt, xt, yt, xv, yv = _setup(seed=13)
    arch = Architect(net, _args(fd_r=r))
    assert arch.fd_r == r
    got = arch.unrolled_grad(xt, yt, xv, yv, eta, opt)
    want = fd_unrolled(net, opt, xt, yt, xv, yv, eta, r)
    default = fd_unrolled(net, opt, xt, yt, xv, yv, eta, 0.01)
    assert rel(got, want) < 1e-9
    assert rel(default, want) > max(1e3 * rel(got, want), 1e-7)


@pytest.mark.parametrize("r", [0.0, -1e-3])
def test_fd_r_must_be_positive(r):
    net = Network(2, 3, 2, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="fd_r"):
        Architect(net, _args(fd_r=r))


def test_no_host_sync_mode_catches_item():
    from pynas._sync import HostSyncError, no_host_sync

    t = torch.ones(2)
    with pytest.raises(HostSyncError, match="item"):
        with no_host_sync():
            t.sum().item()
    with pytest.raises(HostSyncError):
        with no_host_sync():
            if t.sum() > 0:
                pass
    with no_host_sync():
        (t * 2).sum()  # device-side work is fine


@pytest.mark.parametrize("unrolled", [False, True], ids=["first-order", "second-order"])
def test_architect_gradient_makes_no_host_sync(unrolled):
    """The architect's own work (virtual step, norm, perturbations, restore) never reads a tensor's value on
    the host. (The Adam step after it is torch's; its step counter is a host tensor even for GPU params.)"""
    from pynas._sync import no_host_sync

    torch.manual_seed(11)
    model = Network(2, 3, 2, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=MOM, weight_decay=WD)
    arch = Architect(model, _args())
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2,))
    model._loss(x, y).backward()
    opt.step()  # momentum buffers exist
    with no_host_sync():
        if unrolled:
            grads = arch.unrolled_grad(x, y, x.flip(0), y.flip(0), 0.1, opt)
        else:
            grads = arch.first_order_grad(x.flip(0), y.flip(0))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_unrolled_grad_makes_no_host_sync_on_a_gpu(backend):
    """On CUDA tensors torch's sync debug mode is on too: any hidden device-to-host read fails."""
    from pynas._sync import no_host_sync

    torch.manual_seed(11)
    model = Network(4, 3, 3, nn.CrossEntropyLoss()).to("cuda")
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=MOM, weight_decay=WD)
    arch = Architect(model, _args())
    x, y = torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 3, (4,), device="cuda")
    with pynas.use_backend(backend):
        model._loss(x, y).backward()
        opt.step()  # momentum buffers exist
        arch.unrolled_grad(x, y, x.flip(0), y.flip(0), 0.1, opt)  # warm-up: compiles, lazy init, pinned blocks
        torch.cuda.synchronize()
        with no_host_sync():
            grads = arch.unrolled_grad(x, y, x.flip(0), y.flip(0), 0.1, opt)
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("unrolled", [False, True])
def test_alpha_only_passes_with_frozen_weights_give_the_same_step(backend, unrolled):
    """CNNArchitect runs its alpha-only passes (first order; the two finite differences) with the weights'
    requires_grad off, so no weight-gradient work is done there: the step is bit for bit the one without, and
    every weight requires grad again afterwards, an error inside included."""
    from pynas.strategies.base import frozen
    from pynas.strategies.darts import CNNArchitect

    if backend == "cpu" and pynas.backends()["cpu"] is not None:
        pytest.skip("the C++ extension is not built")
    torch.manual_seed(0)
    base = Network(4, 10, 2, nn.CrossEntropyLoss()).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    xv, yv = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    out = []
    with pynas.use_backend(backend):
        for freeze in (False, True):
            model = copy.deepcopy(base)
            arch = CNNArchitect(model)
            arch.freeze_weights = freeze
            opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
            arch.step(x, y, xv, yv, 0.1, opt, unrolled)
            assert all(p.requires_grad for p in model.parameters())
            out.append([a.detach().clone() for a in model.arch_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))
    w = [torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=False)]
    with pytest.raises(RuntimeError, match="inside"):
        with frozen(w):
            assert not w[0].requires_grad
            raise RuntimeError("inside")
    assert w[0].requires_grad and not w[1].requires_grad
