"""The sampled-path RNN sequence (pynas/ops/rnn_path.py): the DARTS evaluation cell of one genotype over a
whole sequence as one autograd node, on every backend.

Two truths: ``rnn_path_ref`` (plain PyTorch, written from the cell's semantics, autograd), itself checked
against DARTSCell's module path on the ``reference`` backend (and by gradcheck); and that module path directly.
Checked: outputs and the gradients of xs, h0, W0 and every Ws, in training mode (masks) and eval mode (none),
for several random genotypes (nodes reading s_0, concat subsets that are not a range, a repeated index), on the
C++ sequence (csrc/rnn_path.cpp; cpu, cuda on a GPU), the Python loop around the C++ step kernels (the loop
the Triton backend runs), the Triton kernels (under TRITON_INTERPRET=1 on the CPU); DARTSCell.forward taking the
fused node and matching its module path (also with the genotype swapped between calls, as ENAS and RSWS do, and
under torch.no_grad); the RSWS RNN model's loss and gradients; the double backward (exact, through the
reference); the argument checks of the Python function and the C++ entry points.
"""
import random

import pytest
import torch

import pynas
from pynas import _ext
from pynas.ops import rnn_path as rp
from pynas.ops.rnn_path import PathCode, path_code, rnn_path, rnn_path_ref
from pynas.rnn.genotypes import PUBLISHED, Genotype
from pynas.rnn.model_eval import DARTSCell

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]
C = _ext.load()
HAS_CPP = C is not None and hasattr(C, "rnn_path_forward")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="pynas._C is not built (or predates rnn_path)")
HAS_CUDA = HAS_CPP and torch.cuda.is_available() and pynas.backends()["cuda"] is None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and pynas._C built with its CUDA part")
TRITON_OK = pynas.backends()["triton"] is None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton is unusable here: {pynas.backends()['triton']}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = ("tanh", "relu", "sigmoid", "identity")


def _random_genotype(seed, steps=8):
    """Predecessors drawn from range(i + 1) (so s_0 is read often), any activation, and a random non-empty subset
    of the states (in random order) as concat."""
    rng = random.Random(seed)
    genes = [(rng.choice(ACTS), rng.randrange(i + 1)) for i in range(steps)]
    concat = rng.sample(range(steps + 1), rng.randint(1, steps + 1))
    return Genotype(recurrent=genes, concat=concat)


GENOTYPES = {
    "darts_v2": PUBLISHED["DARTS_V2"],
    "random1": _random_genotype(1),
    "random2": _random_genotype(2),
    "random3": _random_genotype(3),
    # every node on s_0, the output a non-range subset with a repeated index
    "s0_star": Genotype(recurrent=[(ACTS[i % 4], 0) for i in range(8)], concat=[3, 0, 7, 3]),
    "short": Genotype(recurrent=[("identity", 0), ("tanh", 0), ("relu", 2)], concat=[0, 1, 3]),
}
MODES = ["train", "eval"]


def _inputs(T, B, I, H, steps, mode, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    xs, h0 = rnd(T, B, I), rnd(B, H)
    W0 = rnd(I + H, 2 * H, scale=0.5)
    Ws = [rnd(H, 2 * H, scale=0.5) for _ in range(steps)]
    gout = rnd(T, B, H)
    xm = hm = None
    if mode == "train":
        xm = ((torch.rand(B, I, generator=g) > 0.3).double() / 0.7).to(device=device, dtype=dtype)
        hm = ((torch.rand(B, H, generator=g) > 0.25).double() / 0.75).to(device=device, dtype=dtype)
    return xs, h0, W0, Ws, xm, hm, gout


def _grads(fn, xs, h0, W0, Ws, gout):
    """(output, grads of xs, h0, W0, *Ws) of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (xs, h0, W0, *Ws)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, gout, materialize_grads=True)  # zeros for a dead node


def _truth(xs, h0, W0, Ws, xm, hm, genotype, gout):
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    args = [f64(t) for t in (xs, h0, W0)] + [[f64(w) for w in Ws]]
    return _grads(lambda x, h, w0, *ws: rnn_path_ref(x, h, w0, ws, genotype, f64(xm), f64(hm)),
                  *args[:3], args[3], f64(gout))


NAMES = ["hiddens", "xs", "h0", "W0"]


def _close(got, truth, rtol):
    out, grads = got
    t_out, t_grads = truth
    for i, (a, b) in enumerate(zip([out, *grads], [t_out, *t_grads])):
        a = a.detach().double().cpu()
        scale = b.abs().max().item() + 1e-30
        err = (a - b).abs().max().item()
        what = NAMES[i] if i < 4 else f"Ws[{i - 4}]"
        assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"
    assert len(grads) == len(t_grads)


def _module_path(cell, xs, h0, xm, hm):
    """DARTSCell's own per-step cell, on the reference backend, with the given masks."""
    with pynas.use_backend("reference"):
        h, outs = h0, []
        for t in range(xs.shape[0]):
            h = cell.cell(xs[t], h, xm, hm)
            outs.append(h)
    return torch.stack(outs)


def _cell(I, H, genotype, W0, Ws, dropouth=0.0, dropoutx=0.0):
    cell = DARTSCell(I, H, dropouth, dropoutx, genotype).to(W0.dtype)
    with torch.no_grad():
        cell._W0.copy_(W0)
        for w, v in zip(cell._Ws, Ws):
            w.copy_(v)
    return cell


# ---- the reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(GENOTYPES))
def test_reference_matches_the_module_path(name, mode):
    g = GENOTYPES[name]
    steps = len(g.recurrent)
    xs, h0, W0, Ws, xm, hm, gout = _inputs(4, 3, 5, 7, steps, mode, seed=hash(name) % 1000)
    cell = _cell(5, 7, g, W0, Ws).train(mode == "train")
    leaves = [xs.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
    mod = _module_path(cell, *leaves, xm, hm)
    t_grads = torch.autograd.grad(mod, leaves + [cell._W0, *cell._Ws], gout, materialize_grads=True)
    _close(_truth(xs, h0, W0, Ws, xm, hm, g, gout), (mod.detach(), t_grads), 1e-13)


def test_reference_gradcheck():
    g = Genotype(recurrent=[("sigmoid", 0), ("relu", 0), ("tanh", 1)], concat=[1, 3, 0])
    xs, h0, W0, Ws, xm, hm, _ = _inputs(2, 2, 2, 3, 3, "train", seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (xs, h0, W0, *Ws)]
    assert torch.autograd.gradcheck(lambda x, h, w0, *ws: rnn_path_ref(x, h, w0, ws, g, xm, hm), leaves)


# ---- the fused sequence, each backend, against the reference ------------------------------------------------


def _fused(backend, xs, h0, W0, Ws, xm, hm, genotype, gout):
    return _grads(lambda x, h, w0, *ws: rnn_path(x, h, w0, ws, genotype, xm, hm, backend=backend), xs, h0, W0, Ws,
                  gout)


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(GENOTYPES))
def test_cpu_sequence_matches_the_reference(name, mode):
    g = GENOTYPES[name]
    ins = _inputs(5, 4, 6, 9, len(g.recurrent), mode, seed=11)
    _close(_fused("cpu", *ins[:6], g, ins[6]), _truth(*ins[:6], g, ins[6]), 1e-12)


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
def test_cpu_sequence_float32(mode):
    g = GENOTYPES["random1"]
    ins = _inputs(6, 5, 7, 10, 8, mode, dtype=torch.float32, seed=12)
    _close(_fused("cpu", *ins[:6], g, ins[6]), _truth(*ins[:6], g, ins[6]), 2e-5)


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
def test_python_loop_around_the_cpp_step_kernels(mode):
    """The loop the Triton backend runs (rnn_path_forward_impl / _backward_impl), around the C++ step kernels."""
    g = GENOTYPES["random2"]
    xs, h0, W0, Ws, xm, hm, gout = _inputs(4, 3, 5, 6, 8, mode, seed=13)
    code = path_code(g)
    res = rp.rnn_path_forward_impl(C, xs, h0, xm, hm, W0, Ws, code, True)
    grads = rp.rnn_path_backward_impl(C, gout, xs, h0, res[0], xm, hm, W0, Ws, code, res[1:])
    _close((res[0], grads), _truth(xs, h0, W0, Ws, xm, hm, g, gout), 1e-12)
    # the C++ sequence returns the same saved tensors
    cres = C.rnn_path_forward(xs, h0, xm, hm, W0, Ws, code.preds, code.acts, code.concat, True)
    for a, b in zip(cres, res):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    # without save: the hiddens alone, the same
    (alone,) = C.rnn_path_forward(xs, h0, xm, hm, W0, Ws, code.preds, code.acts, code.concat, False)
    torch.testing.assert_close(alone, res[0], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_triton_sequence_matches_the_reference(mode, dtype):
    # small: the interpreter is slow. Every activation, with and without masks, both accumulation modes.
    g = Genotype(recurrent=[("relu", 0), ("sigmoid", 1), ("identity", 0), ("tanh", 2)], concat=[4, 1, 2])
    ins = _inputs(2, 3, 4, 5, 4, mode, dtype=dtype, device=DEV, seed=14)
    _close(_fused("triton", *ins[:6], g, ins[6]), _truth(*ins[:6], g, ins[6]),
           1e-12 if dtype == torch.float64 else 2e-5)


@needs_triton
def test_triton_step_kernels_match_the_cpp_ones_and_check_arguments():
    from pynas._triton import kernel_module

    K = kernel_module("rnn_path")
    gen = torch.Generator().manual_seed(15)
    B, H = 3, 7
    ch = (3 * torch.randn(B, 2 * H, generator=gen, dtype=torch.float64)).to(DEV)
    prev, hm, gs = (torch.randn(B, H, generator=gen, dtype=torch.float64).to(DEV) for _ in range(3))
    for act in (1, 2, 3, 4):
        f = rp._ACT_FNS[act]
        s, m = torch.empty_like(prev), torch.empty_like(prev)
        K.rnn_path_step_forward(ch, prev, act, hm, s, m, block_size=16)
        c, x = torch.sigmoid(ch[:, :H]), ch[:, H:]
        want = prev + c * (f(x) - prev)
        torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(m, want * hm, rtol=1e-12, atol=1e-13)
        gch, gp = torch.empty_like(ch), prev.clone()
        K.rnn_path_step_backward(gs, ch, prev, act, gch, gp, True, block_size=16)
        leaves = [t.clone().requires_grad_(True) for t in (ch, prev)]
        cc, xx = torch.sigmoid(leaves[0][:, :H]), leaves[0][:, H:]
        d_ch, d_prev = torch.autograd.grad(leaves[1] + cc * (f(xx) - leaves[1]), leaves, gs)
        torch.testing.assert_close(gch, d_ch, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(gp, prev + d_prev, rtol=1e-12, atol=1e-13)
    s = torch.empty_like(prev)
    with pytest.raises(ValueError, match="act: expected an activation code 1..4"):
        K.rnn_path_step_forward(ch, prev, 0, None, s, None)
    with pytest.raises(ValueError, match=r"ch: expected shape \(3, 14\)"):
        K.rnn_path_step_forward(ch[:, :H], prev, 1, None, s, None)
    with pytest.raises(ValueError, match="ch: expected a contiguous tensor"):
        K.rnn_path_step_forward(ch.t().contiguous().t(), prev, 1, None, s, None)
    with pytest.raises(ValueError, match="h_mask, m: expected both or neither"):
        K.rnn_path_step_forward(ch, prev, 1, hm, s, None)
    with pytest.raises(TypeError, match="g_prev: expected the dtype of prev"):
        K.rnn_path_step_backward(gs, ch, prev, 1, torch.empty_like(ch), prev.float(), False)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["darts_v2", "random3", "s0_star"])
def test_cuda_sequence_matches_the_reference(name, mode, dtype):
    g = GENOTYPES[name]
    ins = _inputs(5, 16, 24, 33, len(g.recurrent), mode, dtype=dtype, device="cuda", seed=16)
    _close(_fused("cuda", *ins[:6], g, ins[6]), _truth(*ins[:6], g, ins[6]),
           1e-12 if dtype == torch.float64 else 2e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sequence_low_precision_within_twice_plain_pytorch(dtype):
    """The kernel's error against the float64 truth at most about twice that of the reference at that dtype."""
    g = GENOTYPES["random1"]
    ins = _inputs(4, 16, 32, 32, 8, "train", dtype=dtype, device="cuda", seed=17)
    truth = _truth(*ins[:6], g, ins[6])
    fused = _fused("cuda", *ins[:6], g, ins[6])
    plain = _grads(lambda x, h, w0, *ws: rnn_path_ref(x, h, w0, ws, g, ins[4], ins[5]), *ins[:3], ins[3], ins[6])
    for a, p, t in zip([fused[0], *fused[1]], [plain[0], *plain[1]], [truth[0], *truth[1]]):
        err = (a.double().cpu() - t).abs().max().item()
        err_plain = (p.double().cpu() - t).abs().max().item()
        assert err <= 2 * err_plain + 1e-3 * t.abs().max().item(), (err, err_plain)


# ---- DARTSCell.forward: the fused node, the module path's numbers --------------------------------------------


def _cell_run(cell, backend, x, hidden, seed, grad=True):
    """DARTSCell.forward under ``backend`` with the masks the seed draws: (hiddens, last, grads of x, hidden and
    the cell's parameters) and the type of the hiddens' grad_fn."""
    params = [cell._W0, *cell._Ws]
    x = x.detach().clone().requires_grad_(grad)
    hidden = hidden.detach().clone().requires_grad_(grad)
    torch.manual_seed(seed)
    with pynas.use_backend(backend), torch.set_grad_enabled(grad):
        out, last = cell(x, hidden)
    kind = type(out.grad_fn).__name__
    if not grad:
        return out, last, None, kind
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * gout).sum() + last.sum(), [x, hidden, *params], materialize_grads=True)
    return out.detach(), last.detach(), grads, kind


def _fast_backends():
    out = []
    if HAS_CPP:
        out.append(("cpu", "cpu"))
    if HAS_CUDA:
        out.append(("cuda", "cuda"))
    if TRITON_OK:
        out.append(("triton", DEV))
    return out


@pytest.mark.parametrize("backend,device", _fast_backends(), ids=[b for b, _ in _fast_backends()])
@pytest.mark.parametrize("mode", MODES)
def test_dartscell_forward_takes_the_fused_node_and_matches_the_module_path(backend, device, mode):
    g = GENOTYPES["random3"]
    small = backend == "triton"  # the interpreter is slow
    T, B, I, H = (3, 2, 4, 5) if small else (6, 4, 7, 9)
    torch.manual_seed(3)
    cell = DARTSCell(I, H, 0.3, 0.4, g).double().to(device).train(mode == "train")
    with torch.no_grad():
        for p in cell.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    hidden = torch.randn(1, B, H, dtype=torch.float64, device=device)
    ref = _cell_run(cell, "reference", x, hidden, seed=5)
    got = _cell_run(cell, backend, x, hidden, seed=5)
    assert ref[3] != "_RnnPathFunctionBackward" and got[3] == "_RnnPathFunctionBackward"
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-13)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    # under no_grad: the forward alone (no graph), the same numbers
    ng_ref, ng = _cell_run(cell, "reference", x, hidden, 5, grad=False), _cell_run(cell, backend, x, hidden, 5, False)
    assert ng[0].grad_fn is None and not ng[0].requires_grad
    torch.testing.assert_close(ng[0], ng_ref[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ng[0], ref[0], rtol=1e-12, atol=1e-13)


@needs_cpp
def test_genotype_swapped_between_calls_gives_each_genotypes_numbers():
    """As ENAS / RSWS do: one cell, one set of weights, a different genotype per batch."""
    torch.manual_seed(0)
    cell = DARTSCell(6, 8, 0.25, 0.5, GENOTYPES["darts_v2"]).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    hidden = torch.randn(1, 3, 8, dtype=torch.float64)
    previous = None
    for k, g in enumerate([_random_genotype(20), GENOTYPES["s0_star"], _random_genotype(21), GENOTYPES["darts_v2"]]):
        cell.genotype = g
        cell.train(k % 2 == 0)
        ref = _cell_run(cell, "reference", x, hidden, seed=30 + k)
        got = _cell_run(cell, "cpu", x, hidden, seed=30 + k)
        assert got[3] == "_RnnPathFunctionBackward"
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-13)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
        if previous is not None:  # the genotype changed the numbers
            assert (got[0] - previous).abs().max() > 1e-6
        previous = got[0]


@needs_cpp
def test_dartscell_short_genotype_uses_the_first_weights():
    g = GENOTYPES["short"]  # 3 nodes on a cell built for 8
    torch.manual_seed(1)
    cell = DARTSCell(4, 5, 0.2, 0.2, PUBLISHED["DARTS_V2"]).double()
    cell.genotype = g
    x, hidden = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    ref, got = _cell_run(cell, "reference", x, hidden, 7), _cell_run(cell, "cpu", x, hidden, 7)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-13)
    for a, b in zip(got[2], ref[2]):  # the unused node weights: zeros on both paths
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert all(float(w.abs().max()) == 0 for w in got[2][2 + 1 + 3:])


@needs_cpp
def test_rsws_rnn_model_loss_and_gradients_on_cpu_match_the_reference():
    from pynas.search.rnn import RNNSearchConfig
    from pynas.strategies import rsws

    cfg = RNNSearchConfig(emsize=8, nhid=8, nhidlast=8, dropout=0.3, dropouth=0.25, dropoutx=0.4, dropouti=0.2,
                          dropoute=0.1)
    torch.manual_seed(0)
    model = rsws.rnn_model(40, cfg, seed=3).double()
    tokens = torch.randint(0, 40, (7, 4))
    target = torch.randint(0, 40, (28,))
    sampler = rsws.rnn_epoch_sampler(cfg, epoch=0)

    def run(backend, seed):
        hidden = model.init_hidden(4)
        torch.manual_seed(seed)
        with pynas.use_backend(backend):
            loss, _ = model._loss(hidden, tokens, target)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    for k in range(2):  # two sampled cells, as two iterations of the search
        model.set_arch(sampler())
        model.train(True)
        (l_ref, g_ref), (l_cpu, g_cpu) = run("reference", 10 + k), run("cpu", 10 + k)
        torch.testing.assert_close(l_cpu, l_ref, rtol=1e-12, atol=1e-13)
        for (name, _), a, b in zip(model.named_parameters(), g_cpu, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)
    model.eval()  # the reward / validation path: eval mode, no grad
    with torch.no_grad():
        outs = []
        for backend in ("reference", "cpu"):
            with pynas.use_backend(backend):
                outs.append(model(tokens, model.init_hidden(4))[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-13)


# ---- double backward ------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_is_exact_through_the_reference(mode):
    g = GENOTYPES["random1"]
    xs, h0, W0, Ws, xm, hm, gout = _inputs(3, 3, 4, 5, 8, mode, seed=18)
    v = torch.randn(4 + 5, 10, generator=torch.Generator().manual_seed(19), dtype=torch.float64)

    def second(backend):
        leaves = [t.clone().requires_grad_(True) for t in (xs, h0, W0, *Ws)]
        out = rnn_path(leaves[0], leaves[1], leaves[2], leaves[3:], g, xm, hm, backend=backend)
        (gw0,) = torch.autograd.grad((out * gout).sum(), leaves[2], create_graph=True)
        return torch.autograd.grad((gw0 * v).sum(), [leaves[0], leaves[2], leaves[4]])

    ref, got = second("reference"), second("cpu")
    assert all(r.abs().max() > 1e-8 for r in ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


# ---- dispatch ---------------------------------------------------------------------------------------------------


def test_table_and_gpu_auto_policy(monkeypatch):
    from pynas import _backend

    assert [impl.backend for impl in rp.TABLE] == ["reference", "cpu", "cuda", "triton"]
    for impl in rp.TABLE:
        assert impl.validated == (impl.backend in ("reference", "cpu")), impl.backend
    assert "not yet validated" in rp.TABLE["cuda"].auto_reason("cuda")
    monkeypatch.setattr(_backend, "GPU_FUSED_AUTO", True)
    assert rp.TABLE["cuda"].auto_reason("cuda") is None


@needs_cpp
def test_auto_takes_the_cpu_sequence_and_torch_func_takes_the_module_path():
    g = GENOTYPES["random2"]
    cell = DARTSCell(3, 4, 0.0, 0.0, g).double()
    x, hidden = torch.randn(2, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    with pynas.use_backend("auto"):
        assert type(cell(x, hidden)[0].grad_fn).__name__ == "_RnnPathFunctionBackward"

        def f(inp):
            return cell(inp, hidden)[0].sum()

        gx = torch.func.grad(f)(x)  # torch.func: the module path (the kernels cannot see its wrapped tensors)
    xr = x.clone().requires_grad_(True)
    with pynas.use_backend("reference"):
        (want,) = torch.autograd.grad(cell(xr, hidden)[0].sum(), xr)
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-13)


# ---- argument checks ---------------------------------------------------------------------------------------------


def test_genotype_codes():
    code = path_code(GENOTYPES["short"])
    assert code == PathCode(preds=(0, 0, 2), acts=(4, 1, 2), concat=(0, 1, 3))
    assert path_code(code, 3) == code
    assert path_code(([(2, 0), ("tanh", 1)], torch.tensor([2, 0]))) == PathCode((0, 1), (2, 1), (2, 0))
    assert path_code((torch.tensor([[3, 0], [1, 0]]), [1])) == PathCode((0, 0), (3, 1), (1,))
    bad = [
        (Genotype([("tanh", 1)], [1]), ValueError, r"genotype.recurrent\[0\] predecessor: expected a state index in "
                                                   r"\[0, 0\], got 1"),
        (Genotype([("tanh", -1)], [1]), ValueError, r"predecessor: expected a state index in \[0, 0\], got -1"),
        (Genotype([("none", 0)], [1]), ValueError, r"activation: expected an activation \(tanh, relu, sigmoid, "
                                                   r"identity\), got 'none'"),
        (Genotype([(0, 0)], [1]), ValueError, "activation: expected an activation name or code 1..4"),
        (Genotype([("tanh", 0)], [2]), ValueError, r"genotype.concat\[0\]: expected a state index in \[0, 1\]"),
        (Genotype([("tanh", 0)], []), ValueError, "genotype.concat: expected at least one state index"),
        (Genotype([], [0]), ValueError, "genotype.recurrent: expected at least one node"),
        (Genotype([("tanh",)], [0]), ValueError, r"genotype.recurrent\[0\]: expected an \(activation, predecessor\)"),
        ("DARTS", TypeError, "genotype: expected a Genotype"),
    ]
    for genotype, exc, match in bad:
        with pytest.raises(exc, match=match):
            path_code(genotype)
    with pytest.raises(ValueError, match="genotype.recurrent: expected 8 nodes"):
        path_code(GENOTYPES["short"], 8)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPP else []))
def test_public_function_names_bad_arguments(backend):
    g = GENOTYPES["short"]
    xs, h0, W0, Ws, xm, hm, _ = _inputs(2, 3, 4, 5, 3, "train", seed=20)

    def call(**kw):
        a = dict(xs=xs, h0=h0, W0=W0, Ws=Ws, genotype=g, x_mask=xm, h_mask=hm)
        a.update(kw)
        return rnn_path(a.pop("xs"), a.pop("h0"), a.pop("W0"), a.pop("Ws"), a.pop("genotype"), **a, backend=backend)

    with pytest.raises(ValueError, match=r"xs: expected shape \(T, B, I\)"):
        call(xs=xs[0])
    with pytest.raises(TypeError, match="xs: expected a floating dtype"):
        call(xs=xs.long())
    with pytest.raises(ValueError, match=r"h0: expected shape \(B, H\) with B = 3"):
        call(h0=h0[:2])
    with pytest.raises(ValueError, match=r"W0: expected shape \(9, 10\)"):
        call(W0=W0[1:])
    with pytest.raises(ValueError, match=r"Ws\[1\]: expected shape \(5, 10\)"):
        call(Ws=[Ws[0], Ws[1].t(), Ws[2]])
    with pytest.raises(TypeError, match=r"Ws\[2\]: expected the dtype and device of xs"):
        call(Ws=[Ws[0], Ws[1], Ws[2].float()])
    with pytest.raises(ValueError, match="genotype.recurrent: expected 2 nodes"):
        call(Ws=Ws[:2])
    with pytest.raises(ValueError, match="Ws: expected at least one node weight"):
        call(Ws=[])
    with pytest.raises(ValueError, match=r"x_mask: expected shape \(3, 4\)"):
        call(x_mask=hm)
    with pytest.raises(ValueError, match="x_mask, h_mask: expected both"):
        call(x_mask=None)
    with pytest.raises(ValueError, match="predecessor: expected a state index"):
        call(genotype=Genotype([("tanh", 0), ("tanh", 2), ("tanh", 0)], [1]))


@needs_cpp
def test_cpp_entry_points_name_bad_arguments():
    xs, h0, W0, Ws, xm, hm, gout = _inputs(2, 3, 4, 5, 3, "train", seed=21)
    P, A, K = [0, 0, 2], [4, 1, 2], [0, 1, 3]
    f = C.rnn_path_forward
    with pytest.raises(RuntimeError, match=r"xs: expected \(T, B, I\)"):
        f(xs[0], h0, xm, hm, W0, Ws, P, A, K, True)
    with pytest.raises(RuntimeError, match="h0: expected \\(B, H\\) with B = 3"):
        f(xs, h0.float(), xm, hm, W0, Ws, P, A, K, True)
    with pytest.raises(RuntimeError, match=r"x_mask: expected \(B, I\) = \(3, 4\)"):
        f(xs, h0, hm, hm, W0, Ws, P, A, K, True)
    with pytest.raises(RuntimeError, match="x_mask, h_mask: expected both"):
        f(xs, h0, xm, None, W0, Ws, P, A, K, True)
    with pytest.raises(RuntimeError, match=r"W0: expected \(I \+ H, 2H\) = \(9, 10\)"):
        f(xs, h0, xm, hm, W0[1:], Ws, P, A, K, True)
    with pytest.raises(RuntimeError, match=r"Ws\[2\]: expected \(H, 2H\)"):
        f(xs, h0, xm, hm, W0, Ws[:2] + [Ws[2].t()], P, A, K, True)
    with pytest.raises(RuntimeError, match="Ws: expected at least one node weight"):
        f(xs, h0, xm, hm, W0, [], [], [], K, True)
    with pytest.raises(RuntimeError, match=r"preds: expected one predecessor per node \(3 = len\(Ws\)\), got 2"):
        f(xs, h0, xm, hm, W0, Ws, P[:2], A, K, True)
    with pytest.raises(RuntimeError, match=r"preds\[2\]: expected a state index in \[0, 2\].*got 3"):
        f(xs, h0, xm, hm, W0, Ws, [0, 0, 3], A, K, True)
    with pytest.raises(RuntimeError, match=r"acts\[1\]: expected an activation code 1..4"):
        f(xs, h0, xm, hm, W0, Ws, P, [4, 0, 2], K, True)
    with pytest.raises(RuntimeError, match=r"concat\[1\]: expected a state index in \[0, 3\], got 4"):
        f(xs, h0, xm, hm, W0, Ws, P, A, [0, 4], True)
    with pytest.raises(RuntimeError, match="concat: expected at least one state index"):
        f(xs, h0, xm, hm, W0, Ws, P, A, [], True)
    res = f(xs, h0, xm, hm, W0, Ws, P, A, K, True)
    b = C.rnn_path_backward
    with pytest.raises(RuntimeError, match="saved: expected the 3 tensors"):
        b(gout, xs, h0, res[0], xm, hm, W0, Ws, P, A, K, res[1:3])
    with pytest.raises(RuntimeError, match=r"saved\[2\] \(CH\): expected a contiguous \[4, 2, 3, 10\]"):
        b(gout, xs, h0, res[0], xm, hm, W0, Ws, P, A, K, [res[1], res[2], res[3][:, :1]])
    with pytest.raises(RuntimeError, match=r"saved\[1\] \(S\): expected a contiguous"):
        b(gout, xs, h0, res[0], xm, hm, W0, Ws, P, A, K, [res[1], res[2].transpose(2, 3).contiguous().transpose(2, 3),
                                                          res[3]])
    with pytest.raises(RuntimeError, match=r"grad_out: expected \(T, B, H\) = \(2, 3, 5\)"):
        b(gout[:1], xs, h0, res[0], xm, hm, W0, Ws, P, A, K, res[1:])
    s = torch.empty_like(h0)
    with pytest.raises(RuntimeError, match=r"rnn_path_step_forward: ch: expected a contiguous \(3, 10\) tensor"):
        C.rnn_path_step_forward(res[3][0, 0].t().contiguous().t(), h0, 1, None, s, None)
    with pytest.raises(RuntimeError, match="rnn_path_step_forward: act: expected an activation code 1..4"):
        C.rnn_path_step_forward(res[3][0, 0], h0, 5, None, s, None)
    with pytest.raises(RuntimeError, match="h_mask, m: expected both or neither"):
        C.rnn_path_step_forward(res[3][0, 0], h0, 1, hm, s, None)
    with pytest.raises(RuntimeError, match=r"rnn_path_step_backward: g_prev: expected a contiguous \(3, 5\)"):
        C.rnn_path_step_backward(h0, res[3][0, 0], h0, 1, torch.empty(3, 10, dtype=torch.float64), h0[:2], False)
