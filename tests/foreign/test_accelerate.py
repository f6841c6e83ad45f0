"""pynas.accelerate on DARTS-style supernets written as other codebases write them (tests/foreign/_supernets.py):
the same logits, gradients and running statistics as before (float64), the report's verdicts, search iterations
on the unaccelerated trajectory, the state_dict untouched, deaccelerate restoring the original forwards."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pynas
from pynas.foreign.accelerate import _STATE

from . import _supernets as S

ACCELERATED = ["reordered", "own_alpha", "partial"]
LEFT_ALONE = {  # supernet: (mixed-op class, words the reason holds)
    "with_unknown": ("UnknownOpMixedOp", "candidate 8 (StdConv)"),
    "affine": ("AffineMixedOp", "affine BatchNorm"),
    "scaled": ("ScaledMixedOp", "not what the fused path computes"),
    "branching": ("BranchingMixedOp", "not what the fused path computes"),
}


def _net(name, seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(S, name)(**kw).double()


def _batch(seed, n=4, hw=8, classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, hw, hw, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def _mixed_ops(net):
    return [m for m in net.modules() if _STATE in m.__dict__]


def _assert_same_pass(net, ref, x, y):
    """One forward and backward of both nets: logits, every gradient, every buffer after."""
    out, out_ref = net(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(out_ref, y).backward()
    for (k, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=k)
    for (k, b), (_, c) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ACCELERATED)
def test_accelerated_supernet_equals_its_own_forward(name):
    net = _net(name)
    ref = copy.deepcopy(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _batch(1)
    report = pynas.accelerate(net, example_inputs=x)
    assert len(report.entries) == 15 and len(report.accelerated) == 15, str(report)
    assert all(e.runs_on == "cpu" and e.error < 1e-12 for e in report.entries)
    # accelerate itself changes nothing: the state_dict, its keys and values (the probe forward is undone)
    after = net.state_dict()
    assert list(after) == list(state)
    for k in state:
        assert torch.equal(after[k], state[k]), k
    # and the fused path really runs (the autograd node of the fused edge is in the graph)
    out = net(x)
    ref(x)  # the same running-statistics update on both
    names = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or type(fn).__name__ in names:
            continue
        names.add(type(fn).__name__)
        stack += [f for f, _ in fn.next_functions]
    assert any("CnnEdge" in n for n in names), names
    _assert_same_pass(net, ref, x, y)


def test_report_names_form_and_candidates():
    net = _net("partial")
    report = pynas.accelerate(net, example_inputs=_batch(0)[0])
    e = report.entries[0]
    assert e.form == "partial channels K=4" and e.weights == "argument"
    assert [n for _, _, n in e.candidates] == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                             "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    reduce_edge = [v for v in report.entries if v.path == "cells.1.edges.0"][0]
    assert "skip_connect (factorized reduce)" in [n for _, _, n in reduce_edge.candidates]
    own = pynas.accelerate(_net("own_alpha"), example_inputs=_batch(0)[0]).entries[0]
    assert own.weights == "own 'alpha' (softmax)"
    assert [k for k, _, _ in own.candidates][:2] == ["maxpool", "avgpool"]
    assert "sep_conv_7x7" in [n for _, _, n in own.candidates]
    text = str(report)
    assert text.startswith("15 of 15 mixed ops accelerated") and "cells.0.edges.0" in text


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_left_alone_with_the_reason(name):
    cls, words = LEFT_ALONE[name]
    net = _net(name)
    ref = copy.deepcopy(net)
    x, y = _batch(2)
    report = pynas.accelerate(net, example_inputs=x)
    assert len(report.entries) == 15 and not report.accelerated
    for e in report.left_alone:
        assert e.cls == cls and words in e.reason, e.reason
    assert not _mixed_ops(net)  # nothing switched, nothing left on the modules
    assert all("forward" not in m.__dict__ for m in net.modules())
    _assert_same_pass(net, ref, x, y)


def test_unknown_candidate_is_named_in_the_candidate_list():
    e = pynas.accelerate(_net("with_unknown"), example_inputs=_batch(0)[0]).entries[0]
    assert e.candidates[-1] == ("8", "StdConv", "?")
    assert "ReLU, Conv2d, BatchNorm2d" in e.reason


def _search(net, arch_params, steps, unrolled, seed=5):
    """A few DARTS iterations with pynas.Architect and SGD on the weights; returns the alphas and weights after."""
    weights = [p for p in net.parameters() if all(p is not a for a in arch_params)]
    opt = torch.optim.SGD(weights, 0.05, momentum=0.9, weight_decay=3e-4)
    arch = pynas.Architect(weights, arch_params, lambda x, y: F.cross_entropy(net(x), y), buffers=net.buffers(),
                           arch_learning_rate=3e-2)
    for i in range(steps):
        x, y = _batch(seed + 2 * i)
        xv, yv = _batch(seed + 2 * i + 1)
        arch.step(x, y, xv, yv, 0.05, opt, unrolled)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(weights, 5.0)
        opt.step()
    return [a.detach().clone() for a in arch_params], {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name,unrolled", [("reordered", False), ("own_alpha", False), ("partial", False),
                                           ("reordered", True)])
def test_search_follows_the_unaccelerated_trajectory(name, unrolled):
    net = _net(name)
    ref = copy.deepcopy(net)
    start = [a.detach().clone() for a in net.arch_parameters()]
    report = pynas.accelerate(net)  # no example inputs: each mixed op is checked at its first call
    assert len(report.pending) == 15
    a1, s1 = _search(net, net.arch_parameters(), 3, unrolled)
    assert len(report.accelerated) == 15 and not report.pending, str(report)
    a2, s2 = _search(ref, ref.arch_parameters(), 3, unrolled)
    for p, q, p0 in zip(a1, a2, start):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        assert (p - p0).abs().max() > 1e-3  # the alphas moved
    assert list(s1) == list(s2)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-9, atol=1e-12, msg=k)


def test_deaccelerate_restores_the_original_forwards():
    net = _net("reordered")
    before = {id(m): dict(m.__dict__) for m in net.modules()}
    pynas.accelerate(net, example_inputs=_batch(0)[0])
    switched = _mixed_ops(net)
    assert len(switched) == 15 and all("forward" in m.__dict__ for m in switched)
    assert pynas.deaccelerate(net) == 15
    for m in net.modules():
        assert set(m.__dict__) == set(before[id(m)])
        assert type(m).forward is getattr(m.forward, "__func__", None)
    assert pynas.deaccelerate(net) == 0
    with pynas.accelerated(net, example_inputs=_batch(0)[0]) as report:
        assert len(report.accelerated) == 15 and len(_mixed_ops(net)) == 15
    assert not _mixed_ops(net)


def test_accelerate_twice_rechecks_and_keeps_an_instance_forward():
    net = _net("reordered")
    edge = net.cells[0].edges[0]
    calls = []

    def patched(x, weights):
        calls.append(1)
        return type(edge).forward(edge, x, weights)

    edge.forward = patched
    pynas.accelerate(net, example_inputs=_batch(0)[0])
    report = pynas.accelerate(net, example_inputs=_batch(0)[0])
    assert len(report.accelerated) == 15
    pynas.deaccelerate(net)
    assert edge.forward is patched


def test_eval_mode_hooks_and_autocast_run_the_module_forward():
    net = _net("reordered")
    ref = copy.deepcopy(net)
    x, y = _batch(3)
    pynas.accelerate(net, example_inputs=x)
    net.eval()
    ref.eval()
    torch.testing.assert_close(net(x), ref(x), rtol=1e-10, atol=1e-12)
    net.train()
    ref.train()
    seen = []
    conv = net.cells[0].edges[0].ops[0][1]
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _assert_same_pass(net, ref, x, y)
    assert len(seen) == 1  # the hooked edge ran its modules (the hook saw its conv)
    handle.remove()


def test_deepcopy_of_an_accelerated_model_is_independent():
    net = _net("reordered")
    x, y = _batch(4)
    pynas.accelerate(net, example_inputs=x)
    twin = copy.deepcopy(net)
    assert len(_mixed_ops(twin)) == 15
    bn = net.cells[0].edges[0].ops[0][3]
    before = bn.running_mean.clone()
    twin(x)
    assert torch.equal(bn.running_mean, before)  # the copy's plan reads the copy's buffers
    ref = copy.deepcopy(twin)
    pynas.deaccelerate(ref)
    _assert_same_pass(twin, ref, x, y)


def test_second_derivatives_through_the_accelerated_model():
    net = _net("reordered")
    ref = copy.deepcopy(net)
    x, y = _batch(5)
    pynas.accelerate(net, example_inputs=x)

    def hvp(m):
        alphas = m.arch_parameters()
        loss = F.cross_entropy(m(x), y)
        g = torch.autograd.grad(loss, alphas, create_graph=True)
        v = [torch.ones_like(a) for a in alphas]
        return torch.autograd.grad(g, alphas, v)

    for p, q in zip(hvp(net), hvp(ref)):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-11)


def test_float32_model_checks_at_its_own_dtype():
    torch.manual_seed(0)
    net = S.reordered()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    report = pynas.accelerate(net, example_inputs=x)
    assert len(report.accelerated) == 15 and all(e.runs_on == "cpu" for e in report.entries)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)


def test_reference_backend_leaves_the_module_forward_running():
    net = _net("reordered")
    ref = copy.deepcopy(net)
    x, y = _batch(6)
    with pynas.use_backend("reference"):
        report = pynas.accelerate(net, example_inputs=x)
        assert len(report.accelerated) == 15
        assert all(e.runs_on is None and "own forward runs" in e.note for e in report.entries)
        _assert_same_pass(net, ref, x, y)


def test_verify_false_switches_on_recognition():
    net = _net("reordered")
    ref = copy.deepcopy(net)
    x, y = _batch(7)
    report = pynas.accelerate(net, example_inputs=x, verify=False)
    assert len(report.accelerated) == 15 and all(e.error is None for e in report.entries)
    _assert_same_pass(net, ref, x, y)
    # recognition still refuses what it does not know, without the numbers
    assert not pynas.accelerate(_net("affine"), example_inputs=x, verify=False).accelerated


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="model"):
        pynas.accelerate("not a model")
    with pytest.raises(TypeError, match="verify"):
        pynas.accelerate(_net("reordered"), verify="yes")
    with pytest.raises(ValueError, match="example_inputs"):
        pynas.accelerate(_net("reordered"), example_inputs=torch.randn(2, 5, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="model"):
        pynas.deaccelerate(3)


def test_pynas_network_is_passed_over():
    from pynas.cnn import Network

    net = Network(4, 5, 2, steps=2, multiplier=2)
    assert pynas.accelerate(net, example_inputs=torch.randn(2, 3, 8, 8)).entries == []


def test_the_benchmarks_port_network_is_accelerated_whole():
    from pynas.foreign.example import PORT_PRIMITIVES, PortNetwork

    torch.manual_seed(0)
    net = PortNetwork(4, 5, 3, steps=2, multiplier=2).double()
    ref = copy.deepcopy(net)
    x, y = _batch(8)
    report = pynas.accelerate(net, example_inputs=x)
    assert len(report.accelerated) == len(report.entries) == 15
    assert [n for _, _, n in report.entries[0].candidates] == PORT_PRIMITIVES
    _assert_same_pass(net, ref, x, y)


def test_torch_compile_of_an_accelerated_model_runs_the_fused_op():
    net = _net("reordered", layers=2)
    ref = copy.deepcopy(net)
    x, y = _batch(9)
    pynas.accelerate(net, example_inputs=x)
    compiled = torch.compile(net, backend="aot_eager")
    with torch.profiler.profile() as prof:
        out = compiled(x)
    assert any(e.name == "pynas::cnn_edge" for e in prof.events())
    torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (k, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_torch_func_transforms_run_the_module_forward():
    from torch.func import functional_call, grad

    net = _net("reordered", layers=3)
    ref = copy.deepcopy(net)
    x, y = _batch(10)
    pynas.accelerate(net, example_inputs=x)

    def loss(m):
        def f(a):  # the buffers cloned inside the transform, so BatchNorm may update them
            tensors = {k: b.clone() for k, b in m.named_buffers()}
            tensors.update(zip(["alpha_normal", "alpha_reduce"], a))
            return F.cross_entropy(functional_call(m, tensors, (x,)), y)
        return f

    got = grad(loss(net))((net.alpha_normal, net.alpha_reduce))
    want = grad(loss(ref))((ref.alpha_normal, ref.alpha_reduce))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
