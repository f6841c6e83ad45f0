"""The CUDA kernels of the fused CNN edge (csrc/cuda/cnn_edge.cu) against the CPU ones (csrc/cpu/cnn_edge.cpp).

Every `pynas._C.cnn_edge_*` function that has a CUDA kernel runs on the GPU and on the CPU with the same inputs
(float16/bfloat16 values go to the CPU as float32, which holds them exactly) and the results must agree:
float64 to 1e-9, float32 to 1e-4, float16/bfloat16 to a few units of their rounding, relative to the largest
value. Both kernels accumulate in float32 (float64 for float64), so the low-precision results differ only by
the final rounding. The CUDA tests need a GPU (they run in benchmarks/gpu_check.sh); the checks of bad
arguments run everywhere.
"""
import pytest
import torch

import pynas
from pynas import _ext

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)

C = _ext.load()

needs_ext = pytest.mark.skipif(C is None, reason=f"pynas._C is not available: {_ext.error()}")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or pynas.backends()["cuda"] is not None,
    reason="needs a CUDA device and pynas._C built with its CUDA part",
)

# The kernels under test: pynas._C's, called with tensors on DEV (it dispatches on the device).
DEV = "cuda"
GPU = C

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
PRE_NONE, PRE_RELU, PRE_NORM_RELU = 0, 1, 2


def _id(dtype):
    return str(dtype).replace("torch.", "")


def acc_of(dtype):
    """The accumulation dtype: that of mean/rstd, and of `sums` on a GPU."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(gen, shape, dtype, scale=1.0, shift=0.0):
    """Normal values rounded to `dtype`, on the CPU."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def on_gpu(t):
    return None if t is None else t.to(DEV)


def on_cpu(t):
    """The CPU kernels' copy: float16/bfloat16 as float32 (exact)."""
    if t is None:
        return None
    return t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.clone()


def check(got, want, dtype, what):
    assert got is not None and want is not None, what
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# ---- depthwise convs ---------------------------------------------------------------------------------------

# (k, stride, pad, dilation) per conv
CONV_SETS = {
    "darts-s1": [(3, 1, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (5, 1, 4, 2)],
    "darts-s2": [(3, 2, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 2, 4, 2)],
    "sep-second": [(5, 1, 2, 1)],
    "odd": [(1, 1, 0, 1), (4, 3, 3, 2), (2, 2, 0, 1), (3, 1, 4, 1)],
    "k9": [(9, 2, 4, 1), (7, 1, 1, 1)],
}
# (N, C, H, W); the last two exceed the default 48 KiB of shared memory per block (opt-in, and for the
# backward of the largest the global scratch path)
DW_SHAPES = [(2, 3, 7, 9), (3, 5, 12, 11), (2, 2, 1, 1), (1, 3, 64, 48), (1, 2, 130, 120)]


def _fits(shape, convs):
    _, _, h, w = shape
    return all(min(h, w) + 2 * p >= d * (k - 1) + 1 for k, _, p, d in convs)


def _dw_cases():
    for name, convs in CONV_SETS.items():
        for shape in DW_SHAPES:
            if not _fits(shape, convs):
                continue
            big = shape[2] * shape[3] > 1000
            for dtype in FLOATS:
                if big and dtype in (torch.float16, torch.bfloat16):
                    continue  # the big planes test the memory paths, not the rounding
                yield pytest.param(name, shape, dtype, id=f"{name}-{'x'.join(map(str, shape))}-{_id(dtype)}")


def _dw_inputs(seed, convs, shape, dtype, pre):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = rand(gen, shape, dtype, scale=1.5, shift=0.2)
    ws = [rand(gen, (c, 1, k, k), dtype, scale=0.4) for k, _, _, _ in convs]
    strides = [s for _, s, _, _ in convs]
    pads = [p for _, _, p, _ in convs]
    dils = [d for _, _, _, d in convs]
    if pre == PRE_NORM_RELU:
        mean = rand(gen, (c,), acc_of(dtype), scale=0.5)
        rstd = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(acc_of(dtype))
    else:
        mean = rstd = torch.empty(0)
    return x, ws, strides, pads, dils, mean, rstd


def _dw_out_shape(shape, k, s, p, d):
    n, c, h, w = shape
    return (n, c, (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1)


@needs_cuda
@pytest.mark.parametrize("pre", [PRE_NONE, PRE_RELU, PRE_NORM_RELU])
@pytest.mark.parametrize("name,shape,dtype", list(_dw_cases()))
def test_dw_forward_matches_cpu(name, shape, dtype, pre):
    convs = CONV_SETS[name]
    x, ws, strides, pads, dils, mean, rstd = _dw_inputs(11 + pre, convs, shape, dtype, pre)
    got = GPU.cnn_edge_dw_forward(on_gpu(x), [on_gpu(w) for w in ws], strides, pads, dils, pre, on_gpu(mean),
                              on_gpu(rstd))
    want = C.cnn_edge_dw_forward(on_cpu(x), [on_cpu(w) for w in ws], strides, pads, dils, pre, mean, rstd)
    assert len(got) == len(convs)
    for m, (g, wnt) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.device.type == torch.device(DEV).type
        assert tuple(g.shape) == _dw_out_shape(shape, *convs[m])
        check(g, wnt, dtype, f"ys[{m}]")


@needs_cuda
@pytest.mark.parametrize("pre", [PRE_NONE, PRE_RELU, PRE_NORM_RELU])
@pytest.mark.parametrize("name,shape,dtype", list(_dw_cases()))
def test_dw_backward_matches_cpu(name, shape, dtype, pre):
    convs = CONV_SETS[name]
    x, ws, strides, pads, dils, mean, rstd = _dw_inputs(23 + pre, convs, shape, dtype, pre)
    gen = torch.Generator().manual_seed(5)
    gs = [rand(gen, _dw_out_shape(shape, *cv), dtype) for cv in convs]
    gx, gws, sums = GPU.cnn_edge_dw_backward(on_gpu(x), [on_gpu(w) for w in ws], [on_gpu(g) for g in gs], strides, pads,
                                         dils, pre, on_gpu(mean), on_gpu(rstd))
    wgx, wgws, wsums = C.cnn_edge_dw_backward(on_cpu(x), [on_cpu(w) for w in ws], [on_cpu(g) for g in gs], strides, pads,
                                          dils, pre, mean, rstd)
    assert gx.dtype == dtype
    check(gx, wgx, dtype, "grad_in")
    assert len(gws) == len(convs)
    for m, (g, wnt) in enumerate(zip(gws, wgws)):
        assert g.dtype == dtype and g.shape == ws[m].shape
        check(g, wnt, dtype, f"grad_ws[{m}]")
    if pre == PRE_NORM_RELU:
        # the CPU gives float64, a GPU the accumulation dtype
        assert sums.dtype == acc_of(dtype) and tuple(sums.shape) == (2, shape[1])
        check(sums, wsums, dtype, "sums")
    else:
        assert sums is None and wsums is None


@needs_cuda
@pytest.mark.parametrize("pre", [PRE_RELU, PRE_NORM_RELU])
def test_dw_backward_without_weight_gradients(pre):
    convs = CONV_SETS["darts-s2"]
    shape = (2, 3, 9, 10)
    x, ws, strides, pads, dils, mean, rstd = _dw_inputs(7, convs, shape, torch.float32, pre)
    gen = torch.Generator().manual_seed(8)
    gs = [rand(gen, _dw_out_shape(shape, *cv), torch.float32) for cv in convs]
    args = (strides, pads, dils, pre)
    gx, gws, sums = GPU.cnn_edge_dw_backward(on_gpu(x), [on_gpu(w) for w in ws], [on_gpu(g) for g in gs], *args,
                                         on_gpu(mean), on_gpu(rstd), need_grad_w=False)
    fgx, fgws, fsums = GPU.cnn_edge_dw_backward(on_gpu(x), [on_gpu(w) for w in ws], [on_gpu(g) for g in gs], *args,
                                            on_gpu(mean), on_gpu(rstd))
    assert list(gws) == [] and len(fgws) == len(convs)
    assert torch.equal(gx, fgx)
    if pre == PRE_NORM_RELU:
        assert torch.equal(sums, fsums)
    else:
        assert sums is None


# ---- BatchNorm ---------------------------------------------------------------------------------------------

BN_SHAPES = [(2, 3, 7, 9), (4, 5, 1, 1), (1, 3, 33, 17), (16, 8, 16, 16)]


def _bn_cases():
    for shape in BN_SHAPES:
        for dtype in FLOATS:
            yield pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{_id(dtype)}")


@needs_cuda
@pytest.mark.parametrize("tracked", [True, False], ids=["running", "untracked"])
@pytest.mark.parametrize("shape,dtype", list(_bn_cases()))
def test_bn_stats_matches_cpu(shape, dtype, tracked):
    gen = torch.Generator().manual_seed(31)
    c = shape[1]
    p = rand(gen, shape, dtype, scale=2.0, shift=3.0)  # an offset mean, as BN inputs have
    rm = rand(gen, (c,), dtype, scale=0.3) if tracked else None
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if tracked else None
    rm_g, rv_g, rm_c, rv_c = on_gpu(rm), on_gpu(rv), on_cpu(rm), on_cpu(rv)
    rv_before = None if rv is None else rv.clone()
    mean, rstd = GPU.cnn_edge_bn_stats(on_gpu(p), 1e-5, 0.1, rm_g, rv_g)
    wmean, wrstd = C.cnn_edge_bn_stats(on_cpu(p), 1e-5, 0.1, rm_c, rv_c)
    assert mean.dtype == acc_of(dtype) and rstd.dtype == acc_of(dtype)
    check(mean, wmean, dtype, "mean")
    check(rstd, wrstd, dtype, "rstd")
    if tracked:
        assert rm_g.dtype == dtype and rv_g.dtype == dtype
        check(rm_g, rm_c, dtype, "running_mean")
        check(rv_g, rv_c, dtype, "running_var")
        # the update happened (and used the unbiased variance, as the CPU kernel does)
        assert not torch.equal(rv_g.cpu(), rv_before)


@needs_cuda
@pytest.mark.parametrize("with_sums", [False, True], ids=["own-sums", "given-sums"])
@pytest.mark.parametrize("shape,dtype", list(_bn_cases()))
def test_bn_backward_matches_cpu(shape, dtype, with_sums):
    gen = torch.Generator().manual_seed(37)
    c = shape[1]
    p = rand(gen, shape, dtype, scale=2.0, shift=1.0)
    g = rand(gen, shape, dtype)
    mean = rand(gen, (c,), acc_of(dtype), shift=1.0)
    rstd = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.3).to(acc_of(dtype))
    sums = rand(gen, (2, c), torch.float64, scale=5.0) if with_sums else None
    got = GPU.cnn_edge_bn_backward(on_gpu(g), on_gpu(p), on_gpu(mean), on_gpu(rstd),
                               None if sums is None else sums.to(DEV, acc_of(dtype)))
    want = C.cnn_edge_bn_backward(on_cpu(g), on_cpu(p), mean, rstd,
                              None if sums is None else sums.to(acc_of(dtype)).double())
    assert got.dtype == dtype
    check(got, want, dtype, "grad_p")


# ---- the mix ------------------------------------------------------------------------------------------------

# (stride, has_max, has_avg, has_skip, K)
MIX_TERMS = {
    "normal": (1, True, True, True, 4),
    "reduce": (2, True, True, False, 5),
    "avg-one-conv-s2": (2, False, True, False, 1),
    "max-only": (1, True, False, False, 0),
    "skip-convs": (1, False, False, True, 2),
    "convs-only-s2": (2, False, False, False, 2),
}
MIX_SHAPES = [(2, 3, 7, 9), (3, 4, 8, 8), (2, 3, 1, 1), (1, 2, 5, 6), (1, 2, 130, 120), (1, 1, 260, 250)]


def _mix_cases():
    for name in MIX_TERMS:
        for shape in MIX_SHAPES:
            big = shape[2] * shape[3] > 1000
            if big and name not in ("normal", "reduce"):
                continue
            for dtype in FLOATS:
                if big and dtype in (torch.float16, torch.bfloat16):
                    continue
                yield pytest.param(name, shape, dtype, id=f"{name}-{'x'.join(map(str, shape))}-{_id(dtype)}")


def _mix_out_shape(shape, stride):
    n, c, h, w = shape
    return (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1)


def _mix_inputs(seed, name, shape, dtype, ties=False):
    stride, has_max, has_avg, has_skip, k = MIX_TERMS[name]
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: windows with several maxima (the gradient goes to the first)
        x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    else:
        x = rand(gen, shape, dtype, scale=1.3, shift=0.4)
    out_shape = _mix_out_shape(shape, stride)
    ps = [rand(gen, out_shape, dtype, scale=0.5 + j, shift=0.1 * j) for j in range(k)]
    w = torch.softmax(torch.randn(3 + k, generator=gen, dtype=torch.float64), 0)
    w = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x, ps, w, (stride, has_max, has_avg, has_skip)


def _running(gen, name, shape, dtype, tracked):
    _, has_max, has_avg, _, k = MIX_TERMS[name]
    present = [has_max, has_avg] + [True] * k
    c = shape[1]
    rms, rvs = [], []
    for j, there in enumerate(present):
        keep = there and tracked and j != 2 + k - 1  # leave one conv untracked as well
        rms.append(rand(gen, (c,), dtype, scale=0.2) if keep else None)
        rvs.append((torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if keep else None)
    return rms, rvs


@needs_cuda
@pytest.mark.parametrize("tracked", [True, False], ids=["running", "untracked"])
@pytest.mark.parametrize("name,shape,dtype", list(_mix_cases()))
def test_mix_forward_matches_cpu(name, shape, dtype, tracked):
    x, ps, w, (stride, has_max, has_avg, has_skip) = _mix_inputs(41, name, shape, dtype)
    gen = torch.Generator().manual_seed(43)
    rms, rvs = _running(gen, name, shape, dtype, tracked)
    rms_g, rvs_g = [on_gpu(t) for t in rms], [on_gpu(t) for t in rvs]
    rms_c, rvs_c = [on_cpu(t) for t in rms], [on_cpu(t) for t in rvs]
    flags = (stride, has_max, has_avg, has_skip, 1e-5, 0.1)
    out, mean, rstd = GPU.cnn_edge_mix_forward(on_gpu(x), [on_gpu(p) for p in ps], on_gpu(w), *flags, rms_g, rvs_g)
    wout, wmean, wrstd = C.cnn_edge_mix_forward(on_cpu(x), [on_cpu(p) for p in ps], w, *flags, rms_c, rvs_c)
    assert out.dtype == dtype and tuple(out.shape) == _mix_out_shape(shape, stride)
    assert mean.dtype == acc_of(dtype) and rstd.dtype == acc_of(dtype)
    check(out, wout, dtype, "out")
    check(mean, wmean, dtype, "mean")
    check(rstd, wrstd, dtype, "rstd")
    for j, (a, b) in enumerate(zip(rms_g + rvs_g, rms_c + rvs_c)):
        if a is not None:
            assert a.dtype == dtype
            check(a, b, dtype, f"running statistics {j}")


@needs_cuda
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
@pytest.mark.parametrize("name,shape,dtype", list(_mix_cases()))
def test_mix_backward_matches_cpu(name, shape, dtype, ties):
    if ties and shape[2] * shape[3] > 1000:
        pytest.skip("ties are checked on the small shapes")
    x, ps, w, (stride, has_max, has_avg, has_skip) = _mix_inputs(47, name, shape, dtype, ties=ties)
    gen = torch.Generator().manual_seed(53)
    g = rand(gen, _mix_out_shape(shape, stride), dtype)
    flags = (stride, has_max, has_avg, has_skip)
    # the statistics as the forward gives them (the CPU's, shared by both, in the accumulation dtype)
    _, mean, rstd = C.cnn_edge_mix_forward(on_cpu(x), [on_cpu(p) for p in ps], w, *flags, 1e-5, 0.1,
                                       [None] * (2 + len(ps)), [None] * (2 + len(ps)))
    gx, gps, gw = GPU.cnn_edge_mix_backward(on_gpu(g), on_gpu(x), [on_gpu(p) for p in ps], on_gpu(w), *flags,
                                        on_gpu(mean), on_gpu(rstd))
    wgx, wgps, wgw = C.cnn_edge_mix_backward(on_cpu(g), on_cpu(x), [on_cpu(p) for p in ps], w, *flags, mean, rstd)
    if has_max or has_avg or has_skip:
        assert gx.dtype == dtype
        check(gx, wgx, dtype, "grad_x")
    else:
        assert gx is None and wgx is None
    assert len(gps) == len(ps)
    for j, (a, b) in enumerate(zip(gps, wgps)):
        assert a.dtype == dtype
        check(a, b, dtype, f"grad_ps[{j}]")
    assert gw.dtype == w.dtype and tuple(gw.shape) == (3 + len(ps),)
    check(gw, wgw, dtype, "grad_w")
    absent = [i for i, there in enumerate([has_max, has_avg, has_skip]) if not there]
    assert torch.all(gw.cpu()[absent] == 0)


@needs_cuda
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mix_takes_w_of_any_float_dtype(w_dtype):
    name, shape, dtype = "normal", (2, 3, 6, 5), torch.float32
    x, ps, w, flags = _mix_inputs(59, name, shape, dtype)
    w = w.to(w_dtype)
    none = [None] * (2 + len(ps))
    out, mean, rstd = GPU.cnn_edge_mix_forward(on_gpu(x), [on_gpu(p) for p in ps], on_gpu(w), *flags, 1e-5, 0.1, none,
                                           none)
    wout, wmean, wrstd = C.cnn_edge_mix_forward(x, ps, w, *flags, 1e-5, 0.1, none, none)
    check(out, wout, dtype, "out")
    g = rand(torch.Generator().manual_seed(61), tuple(out.shape), dtype)
    _, _, gw = GPU.cnn_edge_mix_backward(on_gpu(g), on_gpu(x), [on_gpu(p) for p in ps], on_gpu(w), *flags, mean.to(DEV),
                                     rstd.to(DEV))
    _, _, wgw = C.cnn_edge_mix_backward(g, x, ps, w, *flags, wmean, wrstd)
    assert gw.dtype == w_dtype
    # both round the same float sums to w's dtype: at most a unit of it apart
    check(gw.float(), wgw.float(), torch.float32 if w_dtype == torch.float64 else w_dtype, "grad_w")


# ---- properties of the CUDA kernels -------------------------------------------------------------------------

def _six_inputs(dtype=torch.float32):
    """Inputs of _run_six, already on DEV."""
    shape = (3, 4, 9, 8)
    x, ws, strides, pads, dils, mean, rstd = _dw_inputs(67, CONV_SETS["darts-s1"], shape, dtype, PRE_NORM_RELU)
    xm, ps, w, flags = _mix_inputs(71, "normal", shape, dtype)
    return dict(x=on_gpu(x), ws=[on_gpu(t) for t in ws], conv=(strides, pads, dils, PRE_NORM_RELU),
                mean=on_gpu(mean), rstd=on_gpu(rstd), xm=on_gpu(xm), ps=[on_gpu(p) for p in ps], w=on_gpu(w),
                flags=flags)


def _run_six(a):
    """Every kernel once, on device tensors only (no host-device copies); all their outputs."""
    x, ws, conv = a["x"], a["ws"], a["conv"]
    outs = list(GPU.cnn_edge_dw_forward(x, ws, *conv, a["mean"], a["rstd"]))
    gs = [y * 0.5 + 0.3 for y in outs]
    gx, gws, sums = GPU.cnn_edge_dw_backward(x, ws, gs, *conv, a["mean"], a["rstd"])
    outs += [gx, *gws, sums]
    m, r = GPU.cnn_edge_bn_stats(x, 1e-5, 0.1, None, None)
    outs += [m, r, GPU.cnn_edge_bn_backward(gx, x, m, r, None), GPU.cnn_edge_bn_backward(gx, x, m, r, sums)]
    none = [None] * (2 + len(a["ps"]))
    out, mm, mr = GPU.cnn_edge_mix_forward(a["xm"], a["ps"], a["w"], *a["flags"], 1e-5, 0.1, none, none)
    gx2, gps, gw = GPU.cnn_edge_mix_backward(out * 0.5 + 0.1, a["xm"], a["ps"], a["w"], *a["flags"], mm, mr)
    return outs + [out, mm, mr, gx2, *gps, gw]


@needs_cuda
def test_cuda_results_are_deterministic():
    inputs = _six_inputs()
    first = _run_six(inputs)
    for _ in range(2):
        again = _run_six(inputs)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"output {i} changed between runs"


@needs_cuda
def test_cuda_kernels_do_not_sync_with_the_host():
    from pynas._sync import no_host_sync

    inputs = [_six_inputs(), _six_inputs(torch.float16)]
    _run_six(inputs[0])  # warm up (lazy initialisation may sync)
    torch.cuda.synchronize()
    with no_host_sync():
        for a in inputs:
            _run_six(a)
    torch.cuda.synchronize()


@needs_cuda
def test_cuda_kernels_run_on_the_current_stream():
    inputs = _six_inputs()
    want = _run_six(inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _run_six(inputs)
    stream.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_accepts_non_contiguous_inputs():
    shape = (2, 3, 6, 7)
    convs = CONV_SETS["darts-s1"]
    x, ws, strides, pads, dils, mean, rstd = _dw_inputs(73, convs, shape, torch.float32, PRE_RELU)
    xt = on_gpu(x.transpose(2, 3).contiguous()).transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    got = GPU.cnn_edge_dw_forward(xt, [on_gpu(w) for w in ws], strides, pads, dils, PRE_RELU, mean, rstd)
    want = C.cnn_edge_dw_forward(x, ws, strides, pads, dils, PRE_RELU, mean, rstd)
    for a, b in zip(got, want):
        check(a, b, torch.float32, "ys")


# ---- bad arguments ------------------------------------------------------------------------------------------

def _dw_args(dtype=torch.float32, device="cpu"):
    x = torch.randn(2, 3, 6, 6, dtype=dtype, device=device)
    ws = [torch.randn(3, 1, 3, 3, dtype=dtype, device=device)]
    return x, ws


@needs_ext
def test_cpu_rejects_half_precision_naming_the_way_out():
    x, ws = _dw_args(torch.float16)
    with pytest.raises(RuntimeError, match=r"x: expected dtype torch.float32 or torch.float64 on cpu .*need a CUDA"):
        C.cnn_edge_dw_forward(x, ws, [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))


@needs_ext
def test_unsupported_device_is_named():
    x = torch.empty(2, 3, 6, 6, device="meta")
    with pytest.raises(RuntimeError, match=r"cnn_edge_bn_stats: .*device meta"):
        C.cnn_edge_bn_stats(x, 1e-5, 0.1, None, None)


@needs_ext
def test_tensors_on_another_device_are_named():
    x, ws = _dw_args()
    with pytest.raises(RuntimeError, match=r"ws\[0\]: expected a depthwise weight .*device of x"):
        C.cnn_edge_dw_forward(x, [ws[0].to("meta")], [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))
    g = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"gs\[0\]"):
        C.cnn_edge_dw_backward(x, ws, [g.to("meta")], [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))


@needs_ext
def test_statistics_must_have_the_accumulation_dtype():
    x, ws = _dw_args()
    mean, rstd = torch.zeros(3, dtype=torch.float64), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"mean: expected 1-D with one torch.float32 value per channel \(3\) on cpu"):
        C.cnn_edge_dw_forward(x, ws, [1], [1], [1], PRE_NORM_RELU, mean, rstd)
    p = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"running_var: expected 1-D with one torch.float32"):
        C.cnn_edge_bn_stats(p, 1e-5, 0.1, torch.zeros(3), torch.ones(3, dtype=torch.float64))
    m, r = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"sums: expected \(2, C\) = \(2, 3\) torch.float64 on cpu"):
        C.cnn_edge_bn_backward(p, p, m, r, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"rstd: expected \(2 \+ len\(ps\), C\) = \(3, 3\) torch.float32 on cpu"):
        C.cnn_edge_mix_backward(torch.randn(2, 3, 6, 6), x, [torch.randn(2, 3, 6, 6)], torch.ones(4), 1, True, True, True,
                            torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.float64))


@needs_ext
def test_empty_planes_and_oversized_windows_are_rejected():
    ws = [torch.randn(3, 1, 3, 3)]
    with pytest.raises(RuntimeError, match=r"cnn_edge_dw_forward: x: expected a non-empty plane"):
        C.cnn_edge_dw_forward(torch.randn(2, 3, 0, 4), ws, [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))
    # a 2x2 stride-2 window on a 1x1 plane: out_size's truncating division would claim one output
    with pytest.raises(RuntimeError, match=r"x: expected a plane that holds conv 0's window \(2 pixels with dilation 1\)"):
        C.cnn_edge_dw_forward(torch.randn(2, 3, 1, 1), [torch.randn(3, 1, 2, 2)], [2], [0], [1], PRE_RELU,
                          torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match=r"cnn_edge_mix_forward: x: expected a non-empty plane"):
        C.cnn_edge_mix_forward(torch.randn(2, 3, 4, 0), [], torch.ones(3), 2, True, True, False, 1e-5, 0.1,
                           [None, None], [None, None])


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available() or _ext.build_info().get("cuda", True),
                    reason="needs a CUDA device and a pynas._C built without its CUDA part")
def test_cpu_only_build_names_the_cuda_device():
    x, ws = _dw_args(device="cuda")
    with pytest.raises(RuntimeError, match=r"built without CUDA, got x on cuda"):
        C.cnn_edge_dw_forward(x, ws, [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))


@needs_cuda
def test_cuda_checks_name_the_argument():
    x, ws = _dw_args(device="cuda")
    with pytest.raises(RuntimeError, match=r"ws\[0\]: expected a depthwise weight .*device of x"):
        C.cnn_edge_dw_forward(x, [ws[0].cpu()], [1], [1], [1], PRE_RELU, torch.empty(0), torch.empty(0))
    xh = x.half()
    with pytest.raises(RuntimeError, match=r"mean: expected 1-D with one torch.float32 value per channel"):
        C.cnn_edge_dw_forward(xh, [ws[0].half()], [1], [1], [1], PRE_NORM_RELU, torch.zeros(3, device="cuda").half(),
                          torch.ones(3, device="cuda"))
    p = torch.randn(2, 3, 4, 4, device="cuda")
    m, r = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"sums: expected \(2, C\) = \(2, 3\) torch.float32 on cuda"):
        C.cnn_edge_bn_backward(p, p, m, r, torch.zeros(2, 3, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match=r"at most 16 weights in ws"):
        C.cnn_edge_dw_forward(x, ws * 17, [1] * 17, [1] * 17, [1] * 17, PRE_RELU, torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match=r"p: expected dtype torch.float16, torch.bfloat16"):
        C.cnn_edge_bn_stats(p.to(torch.int32), 1e-5, 0.1, None, None)
