"""pynas.Architect: DARTS's architecture step over any model's weights, arch tensors and loss function, against
the exact unrolled hypergradient written here with torch.func (float64), and against CNNArchitect on pynas's
own network."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import pynas
from pynas.cnn import Network
from pynas.strategies.darts import CNNArchitect

from . import _supernets as S

ETA, MOM, WD = 0.05, 0.9, 3e-4


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
            for _ in range(2)]


def _exact_hypergradient(net, names, alphas, bufs, x, y, xv, yv):
    """d L_val(w'(alpha), alpha) / d alpha, w' = w - eta (mom buf + dL_train(w, alpha)/dw + wd w), exactly."""
    params = dict(net.named_parameters())
    w = [params[n] for n in names]
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, w, create_graph=True)
    w2 = {n: p - ETA * (MOM * b + gi + WD * p) for n, p, b, gi in zip(names, w, bufs, g)}
    out = functional_call(net, w2, (xv,))
    return torch.autograd.grad(F.cross_entropy(out, yv), alphas)


@pytest.mark.parametrize("accelerated", [False, True])
def test_unrolled_step_equals_the_exact_hypergradient(accelerated):
    torch.manual_seed(0)
    net = S.reordered(layers=3).double()  # a normal cell and two reduction cells: every alpha is used
    (x, y), (xv, yv) = _batches(1)
    alphas = net.arch_parameters()
    names = [n for n, p in net.named_parameters() if all(p is not a for a in alphas)]
    weights = [dict(net.named_parameters())[n] for n in names]
    opt = torch.optim.SGD(weights, ETA, momentum=MOM, weight_decay=WD)
    F.cross_entropy(net(x), y).backward()  # one weight step, so the momentum buffers are there
    opt.step()
    net.zero_grad()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in weights]
    oracle_net = copy.deepcopy(net)
    oracle_alphas = oracle_net.arch_parameters()
    if accelerated:
        assert len(pynas.accelerate(net, example_inputs=x).accelerated) == 15
    arch = pynas.Architect.for_model(net, arch_parameters=alphas, loss_fn=lambda a, b: F.cross_entropy(net(a), b),
                                     momentum=MOM, weight_decay=WD, fd_r=1e-5)
    assert [id(p) for p in arch.parameters] == [id(p) for p in weights]
    before = [p.detach().clone() for p in weights]
    got = arch.unrolled_grad(x, y, xv, yv, ETA, opt)
    for p, b in zip(weights, before):
        assert torch.equal(p, b)  # the weights restored bit for bit
    want = _exact_hypergradient(oracle_net, names, oracle_alphas, bufs, x, y, xv, yv)
    first = torch.autograd.grad(F.cross_entropy(oracle_net(xv), yv), oracle_alphas)
    for g, w, f in zip(got, want, first):
        assert (w - f).abs().max() > 1e-6  # the second-order term is not negligible here
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)


def test_generic_architect_equals_cnn_architect_on_pynas_network():
    torch.manual_seed(0)
    a = Network(4, 5, 2, steps=2, multiplier=2).double()
    b = copy.deepcopy(a)
    b._arch_parameters = [b.alphas_normal, b.alphas_reduce]
    opts = [torch.optim.SGD(m.parameters(), ETA, momentum=MOM, weight_decay=WD) for m in (a, b)]
    archs = [CNNArchitect(a, momentum=MOM, weight_decay=WD),
             pynas.Architect(b.parameters(), b.arch_parameters(), b._loss, buffers=b.buffers(), momentum=MOM,
                             weight_decay=WD)]
    for i in range(2):
        (x, y), (xv, yv) = _batches(10 + i)
        for m, arch, opt in zip((a, b), archs, opts):
            arch.step(x, y, xv, yv, ETA, opt, True)
            opt.zero_grad()
            m._loss(x, y).backward()
            opt.step()
    for p, q in zip(a.arch_parameters(), b.arch_parameters()):
        assert torch.equal(p, q)
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k


def test_bad_arguments_name_themselves():
    net = S.reordered(layers=2).double()
    alphas = net.arch_parameters()
    weights = [p for p in net.parameters() if all(p is not a for a in alphas)]
    loss = lambda a, b: F.cross_entropy(net(a), b)  # noqa: E731
    with pytest.raises(ValueError, match="parameters: 2 of them are also arch_parameters"):
        pynas.Architect(list(net.parameters()), alphas, loss)
    with pytest.raises(ValueError, match="arch_parameters: expected at least one"):
        pynas.Architect(weights, [], loss)
    with pytest.raises(TypeError, match="parameters: expected an iterable of tensors"):
        pynas.Architect(weights[0], alphas, loss)
    with pytest.raises(TypeError, match="loss_fn"):
        pynas.Architect(weights, alphas, "loss")
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="parameters: every tensor must require grad"):
        pynas.Architect(weights + [frozen], alphas, loss)
    with pytest.raises(ValueError, match="fd_r"):
        pynas.Architect(weights, alphas, loss, fd_r=0.0)
    with pytest.raises(ValueError, match="loss_fn: the model has no _loss"):
        pynas.Architect.for_model(net)
    with pytest.raises(ValueError, match="arch_parameters: the model has no arch_parameters"):
        pynas.Architect.for_model(torch.nn.Linear(2, 2), loss_fn=loss)
