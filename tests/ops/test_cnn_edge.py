"""The fused CNN edge (pynas.ops.cnn_edge, C++ CPU kernels) against the module-by-module reference path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pynas
from pynas import _ext
from pynas.cnn import Network
from pynas.cnn.edge_plan import EdgePlan
from pynas.ops import cnn_edge as fused
from pynas.cnn.model_search import MixedOp
from pynas.cnn.operations import PRIMITIVES

pytestmark = [
    pytest.mark.gpu,  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)
    pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built"),
    pytest.mark.usefixtures("one_thread"),
]

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _isas():
    k = _ext.load()
    if k is None:
        return ["base"]
    cur = k.cpu_isa()
    out = ["base"]
    try:
        k.set_cpu_isa("avx2")
        out.append("avx2")
    except RuntimeError:
        pass
    finally:
        k.set_cpu_isa("auto")
    assert cur in out
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    k = _ext.get()
    k.set_cpu_isa(request.param)
    yield request.param
    k.set_cpu_isa("auto")


def _randomize(module: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype) + 0.5)


def _run(module, x, w, g, backend, calls=None):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    with pynas.use_backend(backend):
        y = module(x, w)
    grads = torch.autograd.grad(y, [x, w] + list(module.parameters()), g)
    return y.detach(), grads


def _compare_mixed_op(C, stride, shape, dtype, primitives=PRIMITIVES, seed=0, steps=2):
    torch.manual_seed(seed)
    fused_op = MixedOp(C, stride, primitives).to(dtype)
    _randomize(fused_op, seed)
    ref_op = copy.deepcopy(fused_op)
    n, h, wd = shape
    for step in range(steps):  # two steps: the second starts from the updated running statistics
        x = torch.randn(n, C, h, wd, dtype=dtype)
        w = torch.softmax(torch.randn(len(primitives), dtype=dtype), 0)
        out_shape = (n, C, (h - 1) // stride + 1, (wd - 1) // stride + 1)
        g = torch.randn(out_shape, dtype=dtype)
        y_ref, g_ref = _run(ref_op, x, w, g, "reference")
        y, gr = _run(fused_op, x, w, g, "cpu")
        assert y.shape == out_shape
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        names = ["x", "weights"] + [n for n, _ in fused_op.named_parameters()]
        for name, a, b in zip(names, gr, g_ref):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"grad of {name}: {m}")
        for (name, a), (_, b) in zip(fused_op.named_buffers(), ref_op.named_buffers()):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"buffer {name}: {m}")


def test_fused_path_is_taken(monkeypatch):
    calls = []
    real = fused._CnnEdgeFunction.apply
    monkeypatch.setattr(fused._CnnEdgeFunction, "apply", lambda *a: calls.append(1) or real(*a))
    op = MixedOp(4, 1).double()
    with pynas.use_backend("cpu"):
        op(torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.softmax(torch.randn(8, dtype=torch.float64), 0))
    with pynas.use_backend("reference"):
        op(torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.softmax(torch.randn(8, dtype=torch.float64), 0))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stride,shape", [(1, (3, 7, 5)), (1, (2, 8, 8)), (2, (3, 6, 10)), (2, (2, 8, 8)),
                                          (1, (1, 1, 9)), (2, (4, 2, 2))], ids=str)
def test_mixed_op_matches_reference(isa, dtype, stride, shape):
    _compare_mixed_op(6, stride, shape, dtype, seed=hash((stride, shape)) % 1000)


@pytest.mark.parametrize("primitives", [
    ["none", "max_pool_3x3", "skip_connect"],
    ["avg_pool_3x3", "sep_conv_3x3"],
    ["none", "sep_conv_7x7", "dil_conv_5x5", "skip_connect"],
    ["dil_conv_3x3"],
    ["max_pool_3x3", "avg_pool_3x3"],
], ids=lambda p: "+".join(p))
@pytest.mark.parametrize("stride", [1, 2])
def test_primitive_subsets(primitives, stride):
    _compare_mixed_op(4, stride, (2, 6, 6), torch.float64, primitives=primitives)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stride,primitives", [
    (1, PRIMITIVES), (2, PRIMITIVES), (1, ["avg_pool_3x3", "sep_conv_5x5"]), (2, ["skip_connect", "dil_conv_3x3"]),
    (2, ["none", "skip_connect"]), (1, ["dil_conv_5x5", "none"])], ids=str)
def test_one_call_edge_is_the_python_sequence_bit_for_bit(dtype, stride, primitives):
    """The cpu backend's one-call forward and backward (cnn_edge_forward / cnn_edge_backward in the extension) make
    the same kernel calls in the same order as the Python sequence: identical outputs, saved tensors, running
    statistics, counters and gradients (with and without the weight gradients)."""
    torch.manual_seed(5)
    op = MixedOp(4, stride, primitives).to(dtype)
    _randomize(op, 5)
    plan = EdgePlan(op, primitives, stride)
    spec = plan.spec
    whole = fused._kernels("cpu")
    assert whole.edge_forward is not None and whole.edge_backward is not None
    split = whole._replace(edge_forward=None, edge_backward=None)
    x = torch.randn(3, 4, 6, 6, dtype=dtype)
    w = torch.softmax(torch.randn(len(primitives), dtype=dtype), 0)
    params = plan.params()
    results = []
    for k in (whole, split):
        running = [t.clone() for t in plan.running()]
        counters = [t.clone() for t in plan.counters()]
        out, wr, mean, rstd, ps, saved = fused.cnn_edge_forward_impl(spec, k, x, w, params, running, counters)
        g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        grads = [fused.cnn_edge_backward_impl(spec, k, g, x, w, wr, mean, rstd, params, ps, saved, need_w)
                 for need_w in (True, False)]
        results.append(([out, wr, mean, rstd, *ps, *saved, *running, *counters], grads))
    (fa, ga), (fb, gb) = results
    assert len(fa) == len(fb)
    for a, b in zip(fa, fb):
        assert torch.equal(a, b)
    for (gx1, gw1, gp1), (gx2, gw2, gp2) in zip(ga, gb):
        assert torch.equal(gx1, gx2) and torch.equal(gw1, gw2)
        assert len(gp1) == len(gp2) == len(params)
        for a, b in zip(gp1, gp2):
            assert (a is None and b is None) or torch.equal(a, b)
    assert all(p is None for p in ga[1][2]) and all(p is not None for p in ga[0][2])


def test_one_call_edge_names_bad_arguments():
    m = _ext.get()
    op = MixedOp(2, 1)
    plan = EdgePlan(op, PRIMITIVES, 1)
    spec = plan.spec
    x, w = torch.randn(2, 2, 4, 4), torch.softmax(torch.randn(8), 0)
    kinds, pads, dils = spec.conv_args
    args = dict(x=x, weights=w, params=plan.params(), running=plan.running(), counters=[], index=spec.index,
                stride=1, has_max=True, has_avg=True, has_skip=True, kinds=kinds, pads=pads, dils=dils, eps=1e-5,
                momentum=0.1)
    with pytest.raises(RuntimeError, match="kinds: expected 0"):
        m.cnn_edge_forward(**{**args, "kinds": [7] * len(kinds)})
    with pytest.raises(RuntimeError, match="params: expected 12 conv weights"):
        m.cnn_edge_forward(**{**args, "params": plan.params()[:-1]})
    with pytest.raises(RuntimeError, match="running: expected"):
        m.cnn_edge_forward(**{**args, "running": plan.running()[:-2]})
    with pytest.raises(RuntimeError, match="index: expected"):
        m.cnn_edge_forward(**{**args, "index": spec.index[:-1]})
    with pytest.raises(RuntimeError, match="kinds, pads, dils: expected one entry per conv each"):
        m.cnn_edge_forward(**{**args, "pads": pads[:-1]})


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 9, 3), (3, 1, 7), (2, 5, 1)], ids=str)
def test_odd_planes(isa, stride, shape):
    """Odd heights and widths (the pools' padded rows and, at stride 2, their four phases of unequal sizes): every
    candidate but the FactorizedReduce skip, which needs even sides."""
    prims = ["none", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    _compare_mixed_op(4, stride, shape, torch.float64, primitives=prims, seed=sum(shape) + stride)


def test_max_pool_ties_go_to_the_first_maximum():
    # integer-valued inputs: many ties inside the 3x3 windows
    torch.manual_seed(3)
    for stride in (1, 2):
        op = MixedOp(3, stride, ["max_pool_3x3"]).double()
        ref = copy.deepcopy(op)
        x = torch.randint(0, 3, (2, 3, 6, 6)).double()
        w = torch.ones(1, dtype=torch.float64)
        g = torch.randn(2, 3, (6 - 1) // stride + 1, (6 - 1) // stride + 1, dtype=torch.float64)
        y1, g1 = _run(ref, x, w, g, "reference")
        y2, g2 = _run(op, x, w, g, "cpu")
        torch.testing.assert_close(y2, y1)
        torch.testing.assert_close(g2[0], g1[0])


def test_gradcheck_float64():
    torch.manual_seed(0)
    op = MixedOp(2, 1).double()
    _randomize(op, 1)
    plan = EdgePlan(op, PRIMITIVES, 1)
    params = plan.params()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0).requires_grad_(True)

    def f(x, w, *ps):
        return fused._CnnEdgeFunction.apply(plan, "cpu", x, w, *ps)

    assert torch.autograd.gradcheck(f, (x, w, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_state_dict_is_the_reference_layout():
    a, b = Network(4, 10, 2), Network(4, 10, 2)
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with pynas.use_backend("cpu"):
        a(x)
    with pynas.use_backend("reference"):
        b.load_state_dict(a.state_dict(), strict=True)  # same keys and shapes after a fused forward
    assert int(a.cells[0]._ops[0]._ops[1][1].num_batches_tracked) == 1


def test_eval_mode_uses_the_reference_path():
    torch.manual_seed(0)
    op = MixedOp(4, 1).double()
    _randomize(op, 2)
    op.eval()
    plan = EdgePlan(op, PRIMITIVES, 1)
    assert not fused.fusable(plan, torch.randn(1, 4, 5, 5, dtype=torch.float64))
    ref = copy.deepcopy(op)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0)
    with pynas.use_backend("cpu"):
        y = op(x, w)
    with pynas.use_backend("reference"):
        y_ref = ref(x, w)
    torch.testing.assert_close(y, y_ref)


def _trajectory_backends():
    out = []
    for name in ("cpu", "cuda", "triton"):
        why = pynas.backends()[name]
        if why is None and name == "triton" and not torch.cuda.is_available():
            why = "whole networks through the Triton interpreter take minutes; runs on a GPU"
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"{name}: {why}")))
    return out


@pytest.mark.parametrize("backend", _trajectory_backends())
def test_search_iterations_follow_the_reference(backend):
    from pynas.strategies.darts import CNNArchitect as Architect

    dev = "cpu" if backend == "cpu" else "cuda"

    def run(backend):
        torch.manual_seed(0)
        model = Network(4, 10, 3, nn.CrossEntropyLoss()).double().to(dev)
        opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=3e-4)
        arch = Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-3, arch_weight_decay=1e-3)
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(dev),
                 torch.randint(0, 10, (4,), generator=g).to(dev)) for _ in range(4)]
        with pynas.use_backend(backend):
            for i, unrolled in enumerate([False, True, True]):
                (x, y), (xv, yv) = data[i], data[i + 1]
                arch.step(x, y, xv, yv, 0.05, opt, unrolled)
                opt.zero_grad()
                model._loss(x, y).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
        return model

    calls = []
    real = fused._CnnEdgeFunction.apply
    fused._CnnEdgeFunction.apply = lambda *a: calls.append(a[1]) or real(*a)
    try:
        a = run(backend)
    finally:
        fused._CnnEdgeFunction.apply = real
    assert calls and set(calls) == {backend}  # every edge of every pass went through the fused kernels
    b = run("reference")
    for x, y in zip(a.arch_parameters(), b.arch_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_saves_less_than_half_of_the_reference():
    """What the autograd graph holds for one training-mode edge (bytes of distinct saved tensors)."""

    def saved_bytes(backend):
        torch.manual_seed(0)
        op = MixedOp(8, 1)
        x = torch.randn(4, 8, 16, 16, requires_grad=True)
        w = torch.softmax(torch.randn(8), 0).requires_grad_(True)
        seen = {}

        def pack(t):
            if t.data_ptr() != x.data_ptr():  # the edge's input is held by the caller anyway
                seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pynas.use_backend(backend):
            op(x, w)
        return sum(seen.values())

    fused_bytes, ref_bytes = saved_bytes("cpu"), saved_bytes("reference")
    assert fused_bytes < 0.5 * ref_bytes, (fused_bytes, ref_bytes)


def test_opcheck():
    pytest.importorskip("expecttest", reason="torch.library.opcheck needs expecttest")
    torch.manual_seed(0)
    op = MixedOp(3, 1).double()
    plan = EdgePlan(op, PRIMITIVES, 1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in plan.params()]
    running = [r.clone() for r in plan.running()]
    torch.library.opcheck(torch.ops.pynas.cnn_edge.default, (x, w, params, running, plan.encoded, "cpu"))


def test_works_under_torch_compile():
    torch.manual_seed(0)
    ops = [MixedOp(4, s).double() for s in (1, 2)]
    refs = [copy.deepcopy(o) for o in ops]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0)

    def f(op, x, w):
        y = op(x, w)
        return (y * y).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for op, ref in zip(ops, refs):
        xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with pynas.use_backend("cpu"):
            la = compiled(op, xa, wa)
            ga = torch.autograd.grad(la, [xa, wa] + list(op.parameters()))
        with pynas.use_backend("reference"):
            lb = f(ref, xb, wb)
            gb = torch.autograd.grad(lb, [xb, wb] + list(ref.parameters()))
        torch.testing.assert_close(la, lb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
        for a, b in zip(op.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b)


def test_dtype_mismatch_names_x():
    op = MixedOp(4, 1)
    with pytest.raises(TypeError, match="x: dtype torch.float64"):
        with pynas.use_backend("cpu"):
            op(torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.softmax(torch.randn(8), 0))


def test_odd_input_to_a_stride_2_skip_names_x():
    op = MixedOp(4, 2)
    with pytest.raises(ValueError, match="x: a stride-2 skip_connect"):
        with pynas.use_backend("cpu"):
            op(torch.randn(2, 4, 5, 6), torch.softmax(torch.randn(8), 0))


# ---- the kernels one by one, against plain torch ------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, "mixed"])
@pytest.mark.parametrize("pre", [0, 1, 2])
def test_depthwise_kernels_against_conv2d(isa, stride, pre):
    """Every conv at stride 1, at stride 2 (the phase-split loops), or the strides mixed in one call (one
    input gradient gathered from both layouts)."""
    k = _ext.get()
    torch.manual_seed(hash((stride, pre)) % 1000)
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64, requires_grad=True)
    mean, rstd = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    geo = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2), (7, 3, 1)]  # (k, pad, dil)
    ws = [torch.randn(5, 1, kk, kk, dtype=torch.float64, requires_grad=True) for kk, _, _ in geo]

    def pre_fn(t):
        if pre == 0:
            return t
        if pre == 1:
            return F.relu(t)
        return F.relu((t - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1))

    strides = [1, 2, 2, 1, 2] if stride == "mixed" else [stride] * len(geo)
    refs = [F.conv2d(pre_fn(x), w, stride=s, padding=p, dilation=d, groups=5)
            for w, s, (_, p, d) in zip(ws, strides, geo)]
    args = (strides, [p for _, p, _ in geo], [d for _, _, d in geo], pre, mean, rstd)
    ys = k.cnn_edge_dw_forward(x.detach(), [w.detach() for w in ws], *args)
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r.detach())
    gs = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(refs, [x] + ws, gs)
    gx, gws, sums = k.cnn_edge_dw_backward(x.detach(), [w.detach() for w in ws], gs, *args)
    if pre == 2:  # gx is the gradient w.r.t. the normalised input
        torch.testing.assert_close(gx * rstd.view(1, -1, 1, 1), grads[0])
        xhat = (x.detach() - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
        torch.testing.assert_close(sums[0], gx.sum((0, 2, 3)))
        torch.testing.assert_close(sums[1], (gx * xhat).sum((0, 2, 3)))
    else:
        torch.testing.assert_close(gx, grads[0])
    for a, b in zip(gws, grads[1:]):
        torch.testing.assert_close(a, b)
    gx2, gws2, _ = k.cnn_edge_dw_backward(x.detach(), [w.detach() for w in ws], gs, *args, need_grad_w=False)
    assert gws2 == [] and torch.equal(gx2, gx)


def test_pw_and_bn_kernels_against_torch(isa):
    k = _ext.get()
    torch.manual_seed(0)
    u = torch.randn(3, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    p_ref = F.conv2d(u, w)
    y_ref = F.batch_norm(p_ref, rm2, rv2, training=True, momentum=0.1, eps=1e-5)
    p, mean, rstd = k.cnn_edge_pw_forward(u.detach(), w.detach(), True, 1e-5, 0.1, rm, rv)
    torch.testing.assert_close(p, p_ref.detach())
    torch.testing.assert_close((p - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1), y_ref.detach())
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    g = torch.randn_like(y_ref)
    gu_ref, gw_ref, = torch.autograd.grad(y_ref, [u, w], g)
    gp = k.cnn_edge_bn_backward(g, p, mean, rstd, None)
    gu, gw = k.cnn_edge_pw_backward(gp, u.detach(), w.detach())
    torch.testing.assert_close(gu, gu_ref)
    torch.testing.assert_close(gw, gw_ref)
    gu2, gw2 = k.cnn_edge_pw_backward(gp, u.detach(), w.detach(), need_grad_w=False)
    assert gw2 is None and torch.equal(gu2, gu)


def test_kernel_bad_inputs_name_the_argument():
    k = _ext.get()
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(3, 1, 3, 3)
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="cnn_edge_dw_forward: x: expected 4-D"):
        k.cnn_edge_dw_forward(torch.randn(3, 5, 5), [w], [1], [1], [1], 1, e, e)
    with pytest.raises(RuntimeError, match=r"ws\[0\]: expected a depthwise weight"):
        k.cnn_edge_dw_forward(x, [torch.randn(4, 1, 3, 3)], [1], [1], [1], 1, e, e)
    with pytest.raises(RuntimeError, match="strides, pads, dils: expected one entry per weight"):
        k.cnn_edge_dw_forward(x, [w], [1, 1], [1], [1], 1, e, e)
    with pytest.raises(RuntimeError, match="pre: expected"):
        k.cnn_edge_dw_forward(x, [w], [1], [1], [1], 7, e, e)
    with pytest.raises(RuntimeError, match="mean: expected 1-D"):
        k.cnn_edge_dw_forward(x, [w], [1], [1], [1], 2, e, e)
    with pytest.raises(RuntimeError, match=r"ws\[0\]: expected at most 9x9 taps \(the kernels' limit\), got 11x11"):
        k.cnn_edge_dw_forward(x, [torch.randn(3, 1, 11, 11)], [1], [5], [1], 1, e, e)
    with pytest.raises(RuntimeError, match="x: expected dtype torch.float32 or torch.float64"):
        k.cnn_edge_dw_forward(x.int(), [w.int()], [1], [1], [1], 1, e, e)
    with pytest.raises(RuntimeError, match=r"cnn_edge_mix_forward: ps\[0\]: expected"):
        k.cnn_edge_mix_forward(x, [torch.randn(2, 3, 4, 4)], torch.ones(4), 1, True, True, True, 1e-5, 0.1,
                           [None] * 3, [None] * 3)
    with pytest.raises(RuntimeError, match="w: expected 1-D with 4 elements"):
        k.cnn_edge_mix_forward(x, [x], torch.ones(3), 1, True, True, True, 1e-5, 0.1, [None] * 3, [None] * 3)
    with pytest.raises(RuntimeError, match=r"has_skip: expected stride 1 \(identity\)"):
        k.cnn_edge_mix_forward(x, [], torch.ones(3), 2, True, True, True, 1e-5, 0.1, [None] * 2, [None] * 2)
    with pytest.raises(RuntimeError, match=r"p: expected more than one value per channel \(BatchNorm in training\)"):
        k.cnn_edge_bn_stats(torch.randn(1, 3, 1, 1), 1e-5, 0.1, None, None)
    with pytest.raises(RuntimeError, match="w: expected a 1x1 conv weight"):
        k.cnn_edge_pw_forward(x, torch.randn(4, 2, 1, 1), False, 1e-5, 0.1, None, None)
    with pytest.raises(RuntimeError, match="set_cpu_isa: name: expected"):
        k.set_cpu_isa("sse9")


@pytest.mark.skipif(pynas.backends()["triton"] is not None, reason="triton unusable here (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_backend_composes_the_same_edge(stride):
    """The fused edge through the Triton kernels (the interpreter on CPU tensors, a GPU where present)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(stride)
    op = MixedOp(4, stride).double().to(dev)
    _randomize(op, 5)
    ref = copy.deepcopy(op)
    calls = []
    real = fused._CnnEdgeFunction.apply
    x = torch.randn(2, 4, 4, 6, dtype=torch.float64, device=dev)
    w = torch.softmax(torch.randn(8, dtype=torch.float64, device=dev), 0)
    g = torch.randn(2, 4, (4 - 1) // stride + 1, (6 - 1) // stride + 1, dtype=torch.float64, device=dev)
    y_ref, g_ref = _run(ref, x, w, g, "reference")
    fused._CnnEdgeFunction.apply = lambda *a: calls.append(a[1]) or real(*a)
    try:
        y, gr = _run(op, x, w, g, "triton")
    finally:
        fused._CnnEdgeFunction.apply = real
    assert calls == ["triton"]
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    for a, b in zip(gr, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    for a, b in zip(op.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
