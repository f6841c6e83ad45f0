"""Second derivatives, torch.func transforms and forward-mode AD through pynas's ops and fused paths.

The truth is the ``reference`` backend (plain PyTorch, autograd by torch) on the same tensors, in float64.
Each fused node (mixed_sum, rnn_mix, the fused CNN edge, the fused RNN sequence) must give exact second
derivatives when a backward runs with ``create_graph=True``, through every route (the incoming gradient,
and the saved inputs: a softmax of alpha, a function of the weights), and every torch.func transform must
work through them.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.functional import hessian

import pynas
from pynas.cnn import Network
from pynas.ops import mixed_sum, rnn_mix
from pynas.rnn import RNNModelSearch

pytestmark = [
    pytest.mark.skipif(pynas.backends()["cpu"] is not None, reason="the C++ CPU backend is not built"),
    pytest.mark.usefixtures("one_thread"),
]
TRITON_OK = pynas.backends()["triton"] is None and not torch.cuda.is_available()
FAST = ["cpu"] + (["triton"] if TRITON_OK else [])
TOL = dict(rtol=1e-8, atol=1e-10)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _on(backend, fn, *args):
    with pynas.use_backend(backend):
        return fn(*args)


# ---- mixed_sum ---------------------------------------------------------------------------------------


def _mixed_sum_fn(xs, alpha):
    # the mix of softmax weights, a nonlinear readout: every block of the Hessian is non-zero
    return torch.tanh(mixed_sum(list(xs), torch.softmax(alpha, 0))).pow(2).sum()


@pytest.mark.parametrize("backend", FAST)
def test_mixed_sum_hessian_equals_reference(backend):
    xs, alpha = _rand(4, 3, 5, seed=1), _rand(4, seed=2)
    h = _on(backend, hessian, _mixed_sum_fn, (xs, alpha))
    h_ref = _on("reference", hessian, _mixed_sum_fn, (xs, alpha))
    for i in range(2):
        for j in range(2):
            assert h_ref[i][j].abs().max() > 1e-3  # not a trivially zero block
            torch.testing.assert_close(h[i][j], h_ref[i][j], **TOL)


@pytest.mark.parametrize("backend", FAST)
def test_mixed_sum_second_derivative_through_the_saved_inputs(backend):
    # out is linear in the incoming gradient: the cross term d(grad_w)/d(xs) comes only from the saved xs
    def grads(be):
        xs = _rand(3, 7, seed=3).requires_grad_(True)
        w = _rand(3, seed=4).requires_grad_(True)
        with pynas.use_backend(be):
            loss = (mixed_sum(list(torch.sin(xs)), w) * _rand(7, seed=5)).sum()
            (gw,) = torch.autograd.grad(loss, w, create_graph=True)
            (gx,) = torch.autograd.grad((gw * _rand(3, seed=6)).sum(), xs)
        return gx

    ref = grads("reference")
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(grads(backend), ref, **TOL)


@pytest.mark.parametrize("backend", FAST)
def test_mixed_sum_gradgradcheck(backend):
    xs = [_rand(2, 3, seed=k).requires_grad_(True) for k in range(3)]
    w = _rand(3, seed=9).requires_grad_(True)
    with pynas.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda w_, *x_: mixed_sum(list(x_), w_), (w, *xs))


# ---- rnn_mix -------------------------------------------------------------------------------------------


def _rnn_inputs(J=3, B=2, H=4, seed=0):
    s, c, h = (_rand(J, B, H, seed=seed + k) for k in range(3))
    return s, torch.sigmoid(c), h, torch.softmax(_rand(J, 5, seed=seed + 3), -1)


@pytest.mark.parametrize("backend", FAST)
def test_rnn_mix_hessians_equal_reference(backend):
    s, c, h, p = _rnn_inputs()

    def by_probs(p_):
        return torch.tanh(rnn_mix(s, c, h, p_)).sum()

    def by_h(h_):
        return torch.tanh(rnn_mix(s, c, h_, p)).sum()

    for fn, arg in ((by_probs, p), (by_h, h)):
        ref = _on("reference", hessian, fn, arg)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(_on(backend, hessian, fn, arg), ref, **TOL)


@pytest.mark.parametrize("backend", FAST)
def test_rnn_mix_gradgradcheck(backend):
    s, c, h, p = (t.clone().requires_grad_(True) for t in _rnn_inputs(J=2, B=2, H=3, seed=4))
    with pynas.use_backend(backend):
        assert torch.autograd.gradgradcheck(rnn_mix, (s, c, h, p))


# ---- the CNN network: fused edge (train mode) and mixed_sum (eval mode) ----------------------------------


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = Network(2, 3, 3).double()
    x = _rand(2, 3, 8, 8, seed=seed + 1)
    y = torch.tensor([0, 2])
    return model, x, y


def _cnn_alpha_hvp(model, x, y, v):
    alphas = model.arch_parameters()
    g = torch.autograd.grad(model._loss(x, y), alphas, create_graph=True)
    return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), alphas)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_edge_hessian_wrt_alpha_and_mixed_term(backend, stride, monkeypatch):
    # one training-mode MixedOp (every candidate; stride 2 has the FactorizedReduce) through the fused edge
    from pynas.ops import cnn_edge as fused
    from pynas.cnn.model_search import MixedOp

    calls = []
    apply = fused._CnnEdgeFunction.apply
    monkeypatch.setattr(fused._CnnEdgeFunction, "apply", lambda *a: calls.append(1) or apply(*a))

    torch.manual_seed(stride)
    op = MixedOp(2, stride).double()
    x0 = _rand(2, 2, 6, 6, seed=stride)

    def second(be):
        x = x0.clone().requires_grad_(True)
        with pynas.use_backend(be):
            h = hessian(lambda a: torch.tanh(op(x, torch.softmax(a, 0))).sum(), _rand(8, seed=3))
            a = _rand(8, seed=4).requires_grad_(True)
            (g,) = torch.autograd.grad(torch.tanh(op(x, torch.softmax(a, 0))).pow(2).sum(), a, create_graph=True)
            mixed = torch.autograd.grad((g * _rand(8, seed=5)).sum(), [x] + list(op.parameters()))
        return [h, *mixed]

    ref = second("reference")
    assert ref[0].abs().max() > 1e-6 and ref[1].abs().max() > 1e-6 and not calls
    out = second(backend)
    assert calls  # the fused edge ran
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train-fused-edge", "eval-mixed-sum"])
def test_cnn_hessian_vector_product_wrt_alpha(train):
    backend = "cpu"
    model, x, y = _cnn()
    model.train(train)
    v = [_rand(*a.shape, seed=11 + k) for k, a in enumerate(model.arch_parameters())]
    ref = _on("reference", _cnn_alpha_hvp, model, x, y, v)
    out = _on(backend, _cnn_alpha_hvp, model, x, y, v)
    assert sum(r.abs().max() for r in ref) > 1e-6
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_cnn_mixed_second_derivative_alpha_weights():
    # d (g_alpha . v) / d w: the term of DARTS's exact second-order hypergradient
    backend = "cpu"
    model, x, y = _cnn(seed=3)
    v = [_rand(*a.shape, seed=21 + k) for k, a in enumerate(model.arch_parameters())]
    weights = [p for p in model.parameters()]

    def mixed(be):
        with pynas.use_backend(be):
            g = torch.autograd.grad(model._loss(x, y), model.arch_parameters(), create_graph=True)
            return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), weights, allow_unused=True)

    ref, out = mixed("reference"), mixed(backend)
    assert sum(float(r.abs().max()) for r in ref if r is not None) > 1e-6
    for a, b in zip(out, ref):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_cnn_functional_hessian_wrt_alpha_is_exact_and_nonzero():
    # torch.autograd.functional.hessian over two rows of alphas_normal (the rest fixed), train mode (fused edge)
    model, x, y = _cnn(seed=5)
    an, ar = (a.detach() for a in model.arch_parameters())

    def loss(rows):
        model.alphas_normal = torch.cat([rows, an[2:]])
        try:
            return model._loss(x, y)
        finally:
            model.alphas_normal = model.arch_parameters()[0]

    h = _on("cpu", hessian, loss, an[:2].clone())
    h_ref = _on("reference", hessian, loss, an[:2].clone())
    assert h.abs().max() > 1e-8
    torch.testing.assert_close(h, h_ref, rtol=1e-7, atol=1e-12)


# ---- the RNN model: fused sequence (train mode) ------------------------------------------------------------


def _rnn(seed=0):
    torch.manual_seed(seed)
    model = RNNModelSearch(11, 4, 4, 4, 0.0, 0.0, 0.0, 0.0, 0.0).double()
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    inp = torch.randint(0, 11, (3, 2), generator=g)
    target = torch.randint(0, 11, (6,), generator=g)
    return model, inp, target


def _rnn_loss(model, inp, target):
    return model._loss(model.init_hidden(2), inp, target)[0]


@pytest.mark.parametrize("backend", FAST)
def test_rnn_fused_sequence_hvp_and_mixed_term(backend):
    model, inp, target = _rnn()
    alpha = model.arch_parameters()[0]
    v = _rand(*alpha.shape, seed=7)
    W0 = model.rnns[0]._W0

    def second(be):
        with pynas.use_backend(be):
            (g,) = torch.autograd.grad(_rnn_loss(model, inp, target), alpha, create_graph=True)
            return torch.autograd.grad((g * v).sum(), (alpha, W0))

    (hv_ref, dw_ref), (hv, dw) = second("reference"), second(backend)
    assert hv_ref.abs().max() > 1e-8 and dw_ref.abs().max() > 1e-8
    torch.testing.assert_close(hv, hv_ref, rtol=1e-7, atol=1e-14)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-7, atol=1e-14)


def test_rnn_fused_sequence_is_the_path_taken():
    # the test above must go through the fused node on 'cpu', not the module path
    from pynas.ops import rnn_cell as fused

    model, inp, target = _rnn()
    calls = []
    orig = fused._RnnCellFunction.apply
    fused._RnnCellFunction.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        with pynas.use_backend("cpu"):
            _rnn_loss(model, inp, target)
    finally:
        fused._RnnCellFunction.apply = orig
    assert calls


def test_cnn_fused_edge_is_the_path_taken():
    from pynas.ops import cnn_edge as fused

    model, x, y = _cnn()
    calls = []
    orig = fused._CnnEdgeFunction.apply
    fused._CnnEdgeFunction.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        with pynas.use_backend("cpu"):
            model._loss(x, y)
    finally:
        fused._CnnEdgeFunction.apply = orig
    assert calls


# ---- torch.func and forward-mode AD ---------------------------------------------------------------------


def _transforms():
    f = torch.func
    return {
        "grad": lambda fn, a: f.grad(lambda t: fn(t).sum())(a),
        "vmap": lambda fn, a: f.vmap(fn, randomness="same")(torch.stack([a, 2 * a])),
        "jvp": lambda fn, a: f.jvp(fn, (a,), (torch.ones_like(a),))[1],
        "jacrev": lambda fn, a: f.jacrev(fn)(a),
        "jacfwd": lambda fn, a: f.jacfwd(fn)(a),
        "hessian": lambda fn, a: f.hessian(lambda t: fn(t).sum())(a),
    }


@pytest.mark.parametrize("transform", sorted(_transforms()))
@pytest.mark.parametrize("op", ["mixed_sum", "rnn_mix"])
def test_torch_func_transforms(op, transform):
    if op == "mixed_sum":
        xs = _rand(3, 4, seed=1)

        def fn(w):
            return torch.tanh(mixed_sum(list(xs), torch.softmax(w, 0)))

        arg = _rand(3, seed=2)
    else:
        s, c, h, _ = _rnn_inputs(J=2, B=2, H=3)

        def fn(p):
            return torch.tanh(rnn_mix(s, c, h, torch.softmax(p, -1)))

        arg = _rand(2, 5, seed=5)
    t = _transforms()[transform]
    ref = _on("reference", t, fn, arg)
    torch.testing.assert_close(_on("cpu", t, fn, arg), ref, **TOL)


def _cnn_of_alpha(model, x):
    """model(x) as a function of alphas_normal (the model's own tensor restored after each call)."""
    def fn(a):
        model.alphas_normal = a
        try:
            return model(x)
        finally:
            model.alphas_normal = model.arch_parameters()[0]

    return fn


def _rnn_of_alpha(rnn, inp):
    """The RNN model's log-probabilities on inp as a function of its arch tensor (restored after each call)."""
    def fn(a):
        for cell in rnn.rnns:
            cell.weights = a
        try:
            return rnn(inp, rnn.init_hidden(inp.shape[1]))[0]
        finally:
            for cell in rnn.rnns:
                cell.weights = rnn.weights

    return fn


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "vmap"])
def test_torch_func_over_the_networks(transform):
    """The CNN in eval mode, the RNN model in train mode (with functorch's BatchNorm recipe)."""
    model, x, y = _cnn(seed=2)
    rnn, inp, target = _rnn(seed=2)
    a_cnn = model.arch_parameters()[0].detach()
    a_rnn = rnn.arch_parameters()[0].detach()
    model.eval()
    # functorch's recipe for the training-mode RNN: BatchNorm without running statistics (nothing mutated)
    torch.func.replace_all_batch_norm_modules_(rnn)
    t = _transforms()[transform]
    for fn, a in ((_cnn_of_alpha(model, x), a_cnn), (_rnn_of_alpha(rnn, inp), a_rnn)):
        ref = _on("reference", t, fn, a)
        torch.testing.assert_close(_on("cpu", t, fn, a), ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("op", ["mixed_sum", "rnn_mix", "cnn-train", "rnn-train"])
def test_forward_mode_ad(op):
    if op == "mixed_sum":
        xs = _rand(3, 4, seed=1)
        fn, arg = (lambda w: mixed_sum(list(xs), w)), _rand(3, seed=2)
    elif op == "rnn_mix":
        s, c, h, _ = _rnn_inputs(J=2, B=2, H=3)
        fn, arg = (lambda p: rnn_mix(s, c, h, p)), _rand(2, 5, seed=5)
    elif op == "cnn-train":
        model, x, _ = _cnn(seed=4)
        fn, arg = _cnn_of_alpha(model, x), model.arch_parameters()[0].detach()
    else:
        rnn, inp, _ = _rnn(seed=4)
        fn, arg = _rnn_of_alpha(rnn, inp), rnn.arch_parameters()[0].detach()
    tangent = _rand(*arg.shape, seed=8)

    def jvp(be):
        with pynas.use_backend(be), fwAD.dual_level():
            out = fn(fwAD.make_dual(arg, tangent))
            return fwAD.unpack_dual(out).tangent

    ref = jvp("reference")
    assert ref.abs().max() > 0
    torch.testing.assert_close(jvp("cpu"), ref, rtol=1e-7, atol=1e-12)


# ---- the custom ops (what torch.compile sees) -----------------------------------------------------------


def test_custom_ops_double_backward_exact():
    xs = [_rand(2, 3, seed=k).requires_grad_(True) for k in range(3)]
    w = _rand(3, seed=9).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda w_, *x_: torch.ops.pynas.mixed_sum(list(x_), w_, "cpu"), (w, *xs))
    s, c, h, p = (t.clone().requires_grad_(True) for t in _rnn_inputs(J=2, B=2, H=3, seed=4))
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.pynas.rnn_mix(*a, "cpu"), (s, c, h, p))


def test_cnn_edge_custom_op_double_backward_exact():
    from pynas.ops import cnn_edge as fused
    from pynas.cnn.model_search import MixedOp

    torch.manual_seed(0)
    op = MixedOp(2, 2).double()
    op(_rand(2, 2, 4, 4, seed=0), torch.softmax(_rand(8, seed=1), 0))  # builds the plan
    plan = op._plan
    x = _rand(2, 2, 4, 4, seed=2).requires_grad_(True)

    def through(fn):
        a = _rand(8, seed=3).requires_grad_(True)
        (g,) = torch.autograd.grad(torch.tanh(fn(x, torch.softmax(a, 0))).sum(), a, create_graph=True)
        return torch.autograd.grad((g * _rand(8, seed=4)).sum(), (a, x, *plan.params()))

    def custom(x_, w_):
        return torch.ops.pynas.cnn_edge(x_, w_, plan.params(), [r.clone() for r in plan.running()], plan.encoded,
                                        "cpu")[0]

    ref = through(lambda x_, w_: fused.cnn_edge_ref(plan.spec, x_, w_, plan.params()))
    for a, b in zip(through(custom), ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_compiled_backward_keeps_the_kernels():
    # the create_graph branch must not leak into torch.compile's ordinary backward
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    xs = [_rand(3, 4, seed=k).requires_grad_(True) for k in range(2)]
    w = _rand(2, seed=5).requires_grad_(True)
    s, c, h, p = (t.clone().requires_grad_(True) for t in _rnn_inputs(J=2, B=2, H=4, seed=1))

    def f(xs_, w_, s_, c_, h_, p_):
        return (mixed_sum(xs_, w_, backend="cpu").sum() + rnn_mix(s_, c_, h_, p_, backend="cpu").sum())

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(xs, w, s, c, h, p)
    mode = Ops()
    with mode:
        loss.backward()
    assert {"pynas.mixed_sum_backward", "pynas.rnn_mix_backward"} <= mode.names, mode.names


def test_rnn_mix_with_no_inputs_is_zeros_on_every_backend():
    s = torch.zeros(0, 2, 3, dtype=torch.float64, requires_grad=True)
    p = torch.zeros(0, 5, dtype=torch.float64)
    for backend in ["reference"] + FAST:
        out = _on(backend, rnn_mix, s, s, s, p)
        assert isinstance(out, torch.Tensor) and torch.equal(out, torch.zeros(2, 3, dtype=torch.float64)), backend


def test_multi_tensor_sum_squares_refuses_to_be_differentiated():
    # an optimizer-side pass: a silently constant result inside a graph would be a wrong derivative
    from pynas.ops import multi_tensor

    xs = [torch.randn(3, requires_grad=True), torch.randn(2)]
    with pytest.raises(RuntimeError, match="sum_squares: .*not differentiable"):
        multi_tensor.sum_squares(xs)
    with torch.no_grad():
        assert float(multi_tensor.sum_squares(xs)) == pytest.approx(float(sum((x * x).sum() for x in xs)))
    assert float(multi_tensor.sum_squares([x.detach() for x in xs])) > 0
