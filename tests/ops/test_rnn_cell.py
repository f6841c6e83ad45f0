"""The fused training cell over a sequence (pynas/ops/rnn_cell.py) on every backend.

The truth is the cell's module path on the ``reference`` backend (plain PyTorch, autograd), itself tested
against a plain cell written out in tests/rnn/test_rnn_search_cell.py. Checked here: the C++ sequence
(csrc/rnn_cell.cpp, cpu; cuda on a GPU), the Python loop around a backend's rnn_mix kernels (the Triton
backend's path; on the CPU it also runs around the C++ kernels, so the loop itself is tested everywhere),
outputs, all gradients and the running statistics, and the checks of the C++ entry points.
"""
import pytest
import torch

import pynas
from pynas import _ext
from pynas.rnn import DARTSCellSearch
from pynas.ops.rnn_cell import rnn_cell_backward_impl, rnn_cell_forward_impl

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]
C = _ext.load()
needs_cpu = pytest.mark.skipif(C is None, reason="pynas._C is not built")
HAS_CUDA = torch.cuda.is_available() and pynas.backends()["cuda"] is None
TRITON_OK = pynas.backends()["triton"] is None
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(T, B, I, H, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    xm = (torch.rand(B, I, generator=g) > 0.4).double() / 0.6
    hm = (torch.rand(B, H, generator=g) > 0.25).double() / 0.75
    probs = torch.softmax(torch.randn(36, 5, generator=g, dtype=torch.float64), -1)
    W0 = 0.3 * torch.randn(I + H, 2 * H, generator=g, dtype=torch.float64)
    Ws = [0.3 * torch.randn(H, 2 * H, generator=g, dtype=torch.float64) for _ in range(8)]
    gout = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (xs, h0, xm, hm, probs, W0)], [cast(w) for w in Ws], cast(gout)


def _module_truth(ins, Ws, gout):
    """Outputs, grads (xs, h0, probs, W0, Ws) and running stats of the module path in float64."""
    xs, h0, xm, hm, probs, W0 = [t.detach().double().cpu() for t in ins]
    T, B, I = xs.shape
    H = h0.shape[1]
    cell = DARTSCellSearch(I, H, 0.0, 0.0).double()
    with torch.no_grad():
        cell._W0.copy_(W0)
        for w, v in zip(cell._Ws, Ws):
            w.copy_(v.double().cpu())
    xs.requires_grad_(True)
    h0.requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    with pynas.use_backend("reference"):
        h, outs = h0, []
        for t in range(T):
            h = cell.cell(xs[t], h, xm, hm, probs)
            outs.append(h)
        out = torch.stack(outs)
    params = [xs, h0, probs, cell._W0] + list(cell._Ws)
    grads = torch.autograd.grad(out, params, gout.double().cpu())
    return out.detach(), grads, (cell.bn.running_mean.clone(), cell.bn.running_var.clone())


def _check(out, grads, stats, truth, rtol):
    t_out, t_grads, t_stats = truth

    def close(a, b, what):
        a = a.detach().double().cpu()
        scale = b.abs().max().item() + 1e-30
        err = (a - b).abs().max().item()
        assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"

    close(out, t_out, "hiddens")
    for i, (a, b) in enumerate(zip(grads, t_grads)):
        close(a, b, f"grad {['xs', 'h0', 'probs', 'W0'][i] if i < 4 else f'Ws[{i - 4}]'}")
    close(stats[0], t_stats[0], "running_mean")
    close(stats[1], t_stats[1], "running_var")


RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
# float32 with B = 2: BatchNorm over two samples amplifies rounding; the module path in float32 itself is off
# by up to 6e-3 of the float64 truth there, so that shape is held to 2e-2.
RTOL_B2 = {torch.float64: 1e-9, torch.float32: 2e-2}


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 2, 3, 9)])
def test_cpp_sequence_matches_the_module_path(dtype, shape):
    T, B, I, H = shape
    ins, Ws, gout = _inputs(T, B, I, H, dtype, "cpu")
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(H, dtype=dtype), torch.ones(H, dtype=dtype)
    res = C.rnn_cell_forward(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    g = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
    _check(res[0], g, (rm, rv), _module_truth(ins, Ws, gout), (RTOL_B2 if B == 2 else RTOL)[dtype])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H", [40, 64, 72])
def test_cpu_sequence_is_the_same_on_one_and_two_threads(dtype, H):
    """The CPU sequence splits the features over the threads in fixed blocks of 32 (H = 40, 72: a partial
    last block, a tail narrower than a vector) with its own GEMMs, each sum in one order: every result but
    the weight gradients (one ATen GEMM each over all steps) is bit for bit the same on one thread and on
    two, and all of them hold against the module path."""
    T, B, I = 3, 5, 7
    ins, Ws, gout = _inputs(T, B, I, H, dtype, "cpu", seed=3)
    xs, h0, xm, hm, probs, W0 = ins
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rm, rv = torch.zeros(H, dtype=dtype), torch.ones(H, dtype=dtype)
            res = C.rnn_cell_forward(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
            g = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
            runs.append((res, g, rm, rv))
    finally:
        torch.set_num_threads(before)
    (r1, g1, rm1, rv1), (r2, g2, rm2, rv2) = runs
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    assert all(torch.equal(a, b) for a, b in zip(g1[:3], g2[:3]))
    for a, b in zip(g1[3:], g2[3:]):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    _check(r2[0], g2, (rm2, rv2), _module_truth(ins, Ws, gout), RTOL[dtype])


@needs_cpu
def test_cpp_sequence_aten_node_path_on_the_cpu():
    """float16 takes the op-by-op ATen path (the one CUDA takes) instead of the CPU sequence;
    held to what float16 rounding through 8 BatchNorms allows (measured ~1e-2)."""
    ins, Ws, gout = _inputs(3, 4, 5, 6, torch.float16, "cpu")
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(6), torch.ones(6)  # float32 statistics, as BatchNorm keeps them for float16
    res = C.rnn_cell_forward(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    g = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
    _check(res[0], g, (rm, rv), _module_truth(ins, Ws, gout), 5e-2)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_python_loop_matches_the_module_path(dtype):
    T, B, I, H = 3, 4, 5, 6
    ins, Ws, gout = _inputs(T, B, I, H, dtype, "cpu", seed=1)
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(H, dtype=dtype), torch.ones(H, dtype=dtype)
    res = rnn_cell_forward_impl(C, 8, 0.1, 1e-5, xs, h0, xm, hm, probs, rm, rv, W0, Ws)
    g = rnn_cell_backward_impl(C, gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
    _check(res[0], g, (rm, rv), _module_truth(ins, Ws, gout), RTOL[dtype])


@pytest.mark.skipif(not TRITON_OK, reason="triton is unusable here")
def test_triton_loop_matches_the_module_path():
    from pynas._triton import kernel_module

    K = kernel_module("rnn_mix")
    T, B, I, H = 2, 3, 4, 5
    dtype = torch.float64 if DEV == "cpu" else torch.float32
    ins, Ws, gout = _inputs(T, B, I, H, dtype, DEV, seed=2)
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(H, dtype=dtype, device=DEV), torch.ones(H, dtype=dtype, device=DEV)
    res = rnn_cell_forward_impl(K, 8, 0.1, 1e-5, xs, h0, xm, hm, probs, rm, rv, W0, Ws)
    g = rnn_cell_backward_impl(K, gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
    _check(res[0], g, (rm, rv), _module_truth(ins, Ws, gout), RTOL[dtype])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and pynas._C built with its CUDA part")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_sequence_matches_the_module_path(dtype):
    T, B, I, H = 4, 8, 16, 16
    ins, Ws, gout = _inputs(T, B, I, H, dtype, "cuda", seed=3)
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(H, dtype=dtype, device="cuda"), torch.ones(H, dtype=dtype, device="cuda")
    res = C.rnn_cell_forward(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    g = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
    _check(res[0], g, (rm, rv), _module_truth(ins, Ws, gout), RTOL[dtype])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and pynas._C built with its CUDA part")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cell_on_a_gpu_takes_the_fused_sequence(backend):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton is unusable here")
    torch.manual_seed(0)
    cell = DARTSCellSearch(16, 16, 0.25, 0.75).cuda()
    cell.weights = (1e-1 * torch.randn(36, 5, device="cuda")).requires_grad_(True)
    x = torch.randn(5, 8, 16, device="cuda")
    with pynas.use_backend(backend):
        out, _ = cell(x, torch.zeros(1, 8, 16, device="cuda"))
    assert type(out.grad_fn).__name__ == "_RnnCellFunctionBackward"
    out.sum().backward()
    assert cell.weights.grad is not None and torch.isfinite(cell.weights.grad).all()


@needs_cpu
def test_cpp_entry_points_name_bad_arguments():
    ins, Ws, gout = _inputs(2, 3, 4, 5, torch.float32, "cpu")
    xs, h0, xm, hm, probs, W0 = ins
    rm, rv = torch.zeros(5), torch.ones(5)
    f = C.rnn_cell_forward
    with pytest.raises(RuntimeError, match="xs: expected \\(T, B, I\\)"):
        f(xs[:, :1], h0[:1], xm[:1], hm[:1], probs, rm, rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="h0: expected"):
        f(xs, h0.double(), xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="x_mask: expected"):
        f(xs, h0, hm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="probs: expected \\(36, 5\\)"):
        f(xs, h0, xm, hm, probs[:10], rm, rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="W0: expected"):
        f(xs, h0, xm, hm, probs, rm, rv, W0[1:], Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="Ws\\[3\\]: expected"):
        f(xs, h0, xm, hm, probs, rm, rv, W0, Ws[:3] + [Ws[3].t()] + Ws[4:], 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="Ws: expected at least one"):
        f(xs, h0, xm, hm, probs[:0], rm, rv, W0, [], 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="running_var: expected"):
        f(xs, h0, xm, hm, probs, rm, torch.ones(4), W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean: expected .* with the dtype of xs"):
        f(xs, h0, xm, hm, probs, rm.double(), rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="eps: expected a positive value"):
        f(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 0.0)
    res = f(xs, h0, xm, hm, probs, rm, rv, W0, Ws, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="saved: expected the 10 tensors"):
        C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:5], 1e-5)
    with pytest.raises(RuntimeError, match="grad_out: expected \\(T, B, H\\)"):
        C.rnn_cell_backward(gout[:1], xm, hm, probs, W0, Ws, res[1:], 1e-5)


@needs_cpu
def test_torch_compile_of_the_model_matches_eager():
    """Under torch.compile the cell takes the module path (rnn_mix as the custom op pynas::rnn_mix)."""
    from pynas.rnn import RNNModelSearch

    torch.manual_seed(0)
    m = RNNModelSearch(30, 6, 6, 6, 0.0, 0.0, 0.0, 0.0, 0.0)
    x, y = torch.randint(0, 30, (2, 3)), torch.randint(0, 30, (6,))
    h = m.init_hidden(3)
    with pynas.use_backend("cpu"):
        eager, _ = m._loss(h, x, y)
        g_eager = torch.autograd.grad(eager, [m.weights] + list(m.parameters()))
        lp, _ = torch.compile(m, fullgraph=True)(x, h)
        compiled = torch.nn.functional.nll_loss(lp.view(-1, 30), y)
        g_compiled = torch.autograd.grad(compiled, [m.weights] + list(m.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("loop", ["cpp", "python"])
def test_backward_without_weight_gradients(loop):
    """need_w=False (the architecture-only passes): the weights' gradients are None and every other gradient is
    bit for bit the one of the full backward."""
    ins, Ws, gout = _inputs(3, 4, 5, 6, torch.float64, "cpu", seed=2)
    xs, h0, xm, hm, probs, W0 = ins
    res = C.rnn_cell_forward(xs, h0, xm, hm, probs, torch.zeros(6, dtype=torch.float64),
                             torch.ones(6, dtype=torch.float64), W0, Ws, 0.1, 1e-5)
    if loop == "cpp":
        full = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
        part = C.rnn_cell_backward(gout, xm, hm, probs, W0, Ws, res[1:], 1e-5, False)
    else:
        full = rnn_cell_backward_impl(C, gout, xm, hm, probs, W0, Ws, res[1:], 1e-5)
        part = rnn_cell_backward_impl(C, gout, xm, hm, probs, W0, Ws, res[1:], 1e-5, False)
    assert all(g is None for g in part[3:]) and all(g is not None for g in full[3:])
    assert all(torch.equal(a, b) for a, b in zip(part[:3], full[:3]))
