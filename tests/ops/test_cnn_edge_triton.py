"""The Triton kernels of the fused CNN edge (kernels/cnn_edge.py) against plain PyTorch and pynas._C.

Every function of ``pynas.kernels.cnn_edge`` is checked forward and backward on fresh random inputs
against a plain-PyTorch truth computed in float64 (F.conv2d, F.max_pool2d, F.avg_pool2d,
F.batch_norm and autograd), running statistics included; in float64 also against the C++ CPU kernels
of ``pynas._C`` (same names, same argument order). On the CPU these run under ``TRITON_INTERPRET=1``
(float64, float32; tiny shapes: the interpreter is slow); on a CUDA machine the same tests run on cuda
tensors in float32, float16, bfloat16 and float64, the low-precision ones held to at most about twice
the error of plain PyTorch at the same precision.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import pynas

if pynas.backends()["triton"] is not None:
    pytest.skip(f"triton is unusable here: {pynas.backends()['triton']}", allow_module_level=True)

from pynas._triton import kernel_module  # noqa: E402

K = kernel_module("cnn_edge")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
EPS, MOMENTUM = 1e-5, 0.1

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]


def _ids(dtypes):
    return [str(d).replace("torch.", "") for d in dtypes]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(*shape, dtype=torch.float64, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(device=DEVICE, dtype=dtype)


def _flat(obj):
    """The tensors of a nested result, in order (None kept, so a missing output is noticed)."""
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat(o)]
    return [obj]


def _check(what, got, truth, plain=None, dtype=torch.float64):
    """got (kernel), truth (float64 plain PyTorch), plain (plain PyTorch at ``dtype``; low precision)."""
    got, truth = _flat(got), _flat(truth)
    plain = _flat(plain) if plain is not None else [None] * len(got)
    assert len(got) == len(truth), what
    for i, (a, b, c) in enumerate(zip(got, truth, plain)):
        name = f"{what}[{i}]"
        if b is None:
            assert a is None, name
            continue
        assert a is not None and a.shape == b.shape, f"{name}: {None if a is None else a.shape} vs {b.shape}"
        a, b = a.double(), b.double().to(a.device)
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale, msg=name)
        elif dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=name)
        else:
            err = float((a - b).abs().max())
            err_plain = float((c.double() - b).abs().max()) if c is not None else 0.0
            slack = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype] * scale
            assert err <= 2 * err_plain + slack, f"{name}: error {err:.3g}, plain PyTorch {err_plain:.3g}"


# --------------------------------------------------------------------------------------------
# Plain-PyTorch references (autograd gives their backward)
# --------------------------------------------------------------------------------------------


def _chan(v):
    return v.view(1, -1, 1, 1)


def dw_ref(x, ws, gs, strides, pads, dils, pre, mean, rstd):
    """(ys, (grad_in, grad_ws, sums)) of cnn_edge_dw_forward / cnn_edge_dw_backward."""
    C = x.shape[1]
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    if pre == 2:  # the gradient is taken w.r.t. the normalised input a
        leaf = ((x - _chan(mean.to(x.dtype))) * _chan(rstd.to(x.dtype))).detach().requires_grad_(True)
        inp = torch.relu(leaf)
    else:
        leaf = x.detach().clone().requires_grad_(True)
        inp = torch.relu(leaf) if pre == 1 else leaf
    ys = [F.conv2d(inp, w, stride=s, padding=p, dilation=d, groups=C) for w, s, p, d in zip(ws, strides, pads, dils)]
    grads = torch.autograd.grad(ys, [leaf] + ws, gs)
    gin, gws = grads[0], list(grads[1:])
    sums = torch.stack([gin.sum((0, 2, 3)), (gin * leaf.detach()).sum((0, 2, 3))]) if pre == 2 else None
    return [y.detach() for y in ys], (gin, gws, sums)


def bn_stats_ref(p, rm, rv):
    mean = p.mean((0, 2, 3))
    var = p.var((0, 2, 3), unbiased=False)
    if rm is not None or rv is not None:
        F.batch_norm(p, rm, rv, training=True, momentum=MOMENTUM, eps=EPS)
    return mean, 1.0 / torch.sqrt(var + EPS)


def bn_backward_ref(g, p):
    """Autograd of the affine-free training BatchNorm."""
    p = p.detach().clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(F.batch_norm(p, None, None, training=True, eps=EPS), [p], g)
    return gp


def mix_ref(x, ps, w, g, stride, has_max, has_avg, has_skip, rms, rvs):
    """((out, mean, rstd), (grad_x, grad_ps, grad_w)) of cnn_edge_mix_forward / cnn_edge_mix_backward."""
    x = x.detach().clone().requires_grad_(True)
    ps = [p.detach().clone().requires_grad_(True) for p in ps]
    w = w.detach().clone().requires_grad_(True)
    C = x.shape[1]
    mean = torch.zeros(2 + len(ps), C, dtype=_acc(x.dtype), device=x.device)
    rstd = torch.ones_like(mean)
    ys = [(0, has_max, lambda: F.max_pool2d(x, 3, stride, 1)),
          (1, has_avg, lambda: F.avg_pool2d(x, 3, stride, 1, count_include_pad=False))]
    ys += [(2 + j, True, (lambda p=p: p)) for j, p in enumerate(ps)]
    out = torch.zeros_like(g) + 0 * w.sum()  # (an edge with no term at all outputs zeros)
    for j, present, make in ys:
        if not present:
            continue
        y = make()
        m, r = bn_stats_ref(y.detach().to(mean.dtype), None, None)
        mean[j], rstd[j] = m, r
        out = out + w[j if j < 2 else j + 1] * F.batch_norm(y, rms[j], rvs[j], training=True,
                                                             momentum=MOMENTUM, eps=EPS)
    if has_skip:
        out = out + w[2] * x
    gx, *gps, gw = torch.autograd.grad(out, [x] + ps + [w], g, allow_unused=True)
    if gx is None and (has_max or has_avg or has_skip):
        gx = torch.zeros_like(x)
    gps = [torch.zeros_like(p) if t is None else t for p, t in zip(ps, gps)]
    return (out.detach(), mean, rstd), (gx, gps, gw)


# --------------------------------------------------------------------------------------------
# Depthwise convs
# --------------------------------------------------------------------------------------------

# (k, stride, pad, dil) per conv; "s" is the test's stride. DARTS's four, then odd ones.
DW_GEOMS = {
    "darts": [(3, "s", 1, 1), (5, "s", 2, 1), (3, "s", 2, 2), (5, "s", 4, 2)],
    "odd": [(2, 3, 0, 3), (1, "s", 0, 1), (4, "s", 3, 1)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("pre", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("geoms", list(DW_GEOMS), ids=list(DW_GEOMS))
def test_dw_forward_backward(dtype, pre, stride, geoms):
    torch.manual_seed(100 * pre + 10 * stride + len(geoms))
    N, C, H, W = 2, 3, 7, 9
    geom = [(k, stride if s == "s" else s, p, d) for k, s, p, d in DW_GEOMS[geoms]]
    x = _randn(N, C, H, W, dtype=dtype)
    ws = [_randn(C, 1, k, k, dtype=dtype) for k, _, _, _ in geom]
    strides, pads, dils = [list(t) for t in zip(*[g[1:] for g in geom])]
    acc = _acc(dtype)
    mean, rstd = (_randn(C, dtype=acc, scale=0.3), _randn(C, dtype=acc).abs() + 0.5) if pre == 2 else (None, None)
    ys = K.cnn_edge_dw_forward(x, ws, strides, pads, dils, pre, mean, rstd)
    assert isinstance(ys, list) and all(y.dtype == dtype for y in ys)
    gs = [torch.randn_like(y) for y in ys]
    gin, gws, sums = K.cnn_edge_dw_backward(x, ws, gs, strides, pads, dils, pre, mean, rstd)
    assert isinstance(gws, list) and gin.dtype == dtype and all(g.dtype == dtype for g in gws)
    assert (sums is None) == (pre != 2)
    if pre == 2:
        assert sums.shape == (2, C) and sums.dtype == acc

    d64 = lambda ts: [t.double() if t is not None else None for t in ts]  # noqa: E731
    truth = dw_ref(*d64([x]), d64(ws), d64(gs), strides, pads, dils, pre, *d64([mean, rstd]))
    plain = None
    if dtype in (torch.float16, torch.bfloat16):
        plain = dw_ref(x, ws, gs, strides, pads, dils, pre, mean, rstd)
    _check("dw", [ys, gin, gws, sums], [truth[0], *truth[1]], plain and [plain[0], *plain[1]], dtype)


def test_dw_several_tiles_per_plane():
    """Planes larger than one program's tile (1089 outputs > 512), pre = 2 with its sums."""
    torch.manual_seed(7)
    x = _randn(1, 2, 33, 35)
    ws = [_randn(2, 1, 3, 3), _randn(2, 1, 5, 5)]
    mean, rstd = _randn(2, scale=0.3), _randn(2).abs() + 0.5
    args = ([1, 2], [1, 4], [1, 2], 2, mean, rstd)
    ys = K.cnn_edge_dw_forward(x, ws, *args)
    gs = [torch.randn_like(y) for y in ys]
    got = K.cnn_edge_dw_backward(x, ws, gs, *args)
    truth = dw_ref(x, ws, gs, *args)
    _check("dw tiles", [ys, *got], [truth[0], *truth[1]])


def test_dw_empty_batch():
    x = _randn(0, 3, 5, 5)
    ws = [_randn(3, 1, 3, 3)]
    (y,) = K.cnn_edge_dw_forward(x, ws, [1], [1], [1], 1, None, None)
    assert y.shape == (0, 3, 5, 5)
    gin, (gw,), sums = K.cnn_edge_dw_backward(x, ws, [y], [1], [1], [1], 1, torch.empty(0), torch.empty(0))
    assert gin.shape == x.shape and sums is None and torch.equal(gw, torch.zeros_like(gw))


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 2, 1, 1), (1, 4, 33, 35)], ids=str)
def test_bn_stats_and_backward(dtype, shape):
    torch.manual_seed(sum(shape))
    C = shape[1]
    p = _randn(*shape, dtype=dtype, scale=2.0, shift=0.7)
    rm, rv = _randn(C, dtype=dtype), _randn(C, dtype=dtype).abs() + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    mean, rstd = K.cnn_edge_bn_stats(p, EPS, MOMENTUM, rm, rv)
    acc = _acc(dtype)
    assert mean.dtype == acc and rstd.dtype == acc and mean.shape == (C,) and rm.dtype == dtype

    rm64, rv64 = rm0.double(), rv0.double()
    truth_stats = bn_stats_ref(p.double(), rm64, rv64)
    low = dtype in (torch.float16, torch.bfloat16)
    plain_rm, plain_rv = rm0.clone(), rv0.clone()
    plain_stats = [*bn_stats_ref(p.float(), None, None)] if low else None
    if low:
        F.batch_norm(p, plain_rm, plain_rv, training=True, momentum=MOMENTUM, eps=EPS)
    _check("bn stats", [mean, rstd, rm, rv], [*truth_stats, rm64, rv64],
           plain_stats and [*plain_stats, plain_rm, plain_rv], dtype)

    # without running statistics: same numbers
    m2, r2 = K.cnn_edge_bn_stats(p, EPS, MOMENTUM, None, None)
    assert torch.equal(m2, mean) and torch.equal(r2, rstd)

    g = _randn(*shape, dtype=dtype)
    gp = K.cnn_edge_bn_backward(g, p, mean, rstd, None)
    assert gp.dtype == dtype
    truth = bn_backward_ref(g.double(), p.double())
    _check("bn backward", gp, truth, bn_backward_ref(g, p) if low else None, dtype)

    # with given sums: rstd * (g - sums[0] / M - xhat * sums[1] / M)
    sums = _randn(2, C, dtype=acc)
    gp = K.cnn_edge_bn_backward(g, p, mean, rstd, sums)
    m, r, s = mean.double(), rstd.double(), sums.double()
    M = p.numel() // C
    xhat = (p.double() - _chan(m)) * _chan(r)
    truth = _chan(r) * (g.double() - _chan(s[0]) / M - xhat * _chan(s[1]) / M)
    _check("bn backward sums", gp, truth, truth.to(dtype) if low else None, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_dw_backward_without_weight_gradients(dtype):
    torch.manual_seed(8)
    x = _randn(2, 3, 6, 5, dtype=dtype)
    ws = [_randn(3, 1, 3, 3, dtype=dtype), _randn(3, 1, 5, 5, dtype=dtype)]
    args = ([2, 2], [1, 4], [1, 2], 1, None, None)
    gs = [torch.randn_like(y) for y in K.cnn_edge_dw_forward(x, ws, *args)]
    full = K.cnn_edge_dw_backward(x, ws, gs, *args)
    gin, gws, sums = K.cnn_edge_dw_backward(x, ws, gs, *args, False)
    assert gws == [] and sums is None and torch.equal(gin, full[0])


# --------------------------------------------------------------------------------------------
# 1x1 convs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_pw_forward_backward(dtype):
    torch.manual_seed(9)
    N, Ci, Co, H, W = 2, 3, 5, 5, 7
    u = _randn(N, Ci, H, W, dtype=dtype)
    w = _randn(Co, Ci, 1, 1, dtype=dtype)
    rm, rv = _randn(Co, dtype=dtype), _randn(Co, dtype=dtype).abs() + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    p, mean, rstd = K.cnn_edge_pw_forward(u, w, True, EPS, MOMENTUM, rm, rv)
    assert p.dtype == dtype and mean.dtype == _acc(dtype)
    p2, m2, r2 = K.cnn_edge_pw_forward(u, w, False, EPS, MOMENTUM, None, None)
    assert m2 is None and r2 is None and torch.equal(p2, p)
    g = torch.randn_like(p)
    gu, gw = K.cnn_edge_pw_backward(g, u, w)
    gu2, gw2 = K.cnn_edge_pw_backward(g, u, w, False)
    assert gw2 is None and torch.equal(gu2, gu)

    def ref(u, w, g, rm, rv):
        u = u.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True)
        p = F.conv2d(u, w)
        m, r = bn_stats_ref(p.detach().to(_acc(u.dtype)), None, None)
        F.batch_norm(p.detach(), rm, rv, training=True, momentum=MOMENTUM, eps=EPS)
        return [p.detach(), m, r, *torch.autograd.grad(p, [u, w], g), rm, rv]

    truth = ref(u.double(), w.double(), g.double(), rm0.double(), rv0.double())
    low = dtype in (torch.float16, torch.bfloat16)
    _check("pw", [p, mean, rstd, gu, gw, rm, rv], truth, ref(u, w, g, rm0.clone(), rv0.clone()) if low else None,
           dtype)


# --------------------------------------------------------------------------------------------
# The mix
# --------------------------------------------------------------------------------------------

# (has_max, has_avg, has_skip, K)
MIX_CASES = [
    (True, True, True, 3),
    (True, False, False, 1),
    (False, True, True, 2),
    (False, False, True, 0),
    (False, False, False, 2),
    (True, True, False, 9),  # more ps than one launch takes
]


def _mix_case(dtype, stride, has_max, has_avg, has_skip, n_ps, shape=(2, 3, 7, 9), ints=False):
    N, C, H, W = shape
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    if ints:  # many ties in the max-pool windows
        x = torch.randint(-2, 3, shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    else:
        x = _randn(*shape, dtype=dtype)
    ps = [_randn(N, C, ho, wo, dtype=dtype, scale=1.0 + j, shift=0.1 * j) for j in range(n_ps)]
    w = torch.softmax(_randn(3 + n_ps, dtype=_acc(dtype)), 0)
    g = _randn(N, C, ho, wo, dtype=dtype)
    present = [has_max, has_avg] + [True] * n_ps
    rms = [_randn(C, dtype=dtype) if on else None for on in present]
    rvs = [_randn(C, dtype=dtype).abs() + 0.5 if on else None for on in present]
    return x, ps, w, g, rms, rvs


def _clones(ts, dtype=None):
    return [None if t is None else t.clone() if dtype is None else t.to(dtype) for t in ts]


def _run_mix(x, ps, w, g, stride, flags, rms, rvs):
    out, mean, rstd = K.cnn_edge_mix_forward(x, ps, w, stride, *flags, EPS, MOMENTUM, rms, rvs)
    gx, gps, gw = K.cnn_edge_mix_backward(g, x, ps, w, stride, *flags, mean, rstd)
    return (out, mean, rstd), (gx, gps, gw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", MIX_CASES, ids=[f"max{a:d}-avg{b:d}-skip{c:d}-K{k}" for a, b, c, k in MIX_CASES])
def test_mix_forward_backward(dtype, stride, case):
    *flags, n_ps = case
    flags[2] = flags[2] and stride == 1
    torch.manual_seed(10 * n_ps + stride)
    x, ps, w, g, rms, rvs = _mix_case(dtype, stride, *flags, n_ps)
    rms0, rvs0 = _clones(rms), _clones(rvs)
    (out, mean, rstd), (gx, gps, gw) = got = _run_mix(x, ps, w, g, stride, flags, rms, rvs)
    acc = _acc(dtype)
    J = 2 + n_ps
    assert out.dtype == dtype and mean.dtype == acc and rstd.dtype == acc and mean.shape == (J, x.shape[1])
    assert gw.dtype == w.dtype and isinstance(gps, list) and len(gps) == n_ps
    assert (gx is None) == (not any(flags))

    rms64, rvs64 = _clones(rms0, torch.float64), _clones(rvs0, torch.float64)
    truth = mix_ref(x.double(), [p.double() for p in ps], w.double(), g.double(), stride, *flags, rms64, rvs64)
    plain = None
    if dtype in (torch.float16, torch.bfloat16):
        prm, prv = _clones(rms0), _clones(rvs0)
        plain = mix_ref(x, ps, w.to(dtype), g, stride, *flags, prm, prv)
        plain = [plain, [p for p in prm if p is not None], [p for p in prv if p is not None]]
    running = [[t for t in rms if t is not None], [t for t in rvs if t is not None]]
    truth_running = [[t for t in rms64 if t is not None], [t for t in rvs64 if t is not None]]
    _check("mix", [got, running], [truth, truth_running], plain and [plain[0], plain[1:]], dtype)


def test_mix_max_pool_ties_go_to_the_first_maximum():
    """Integer inputs: many windows hold their maximum twice; the gradient goes to the first."""
    for stride in (1, 2):
        torch.manual_seed(11 + stride)
        flags = (True, False, False)
        x, ps, w, g, rms, rvs = _mix_case(torch.float64, stride, *flags, 0, shape=(2, 2, 6, 7), ints=True)
        got = _run_mix(x, ps, w, g, stride, flags, rms, rvs)
        truth = mix_ref(x, ps, w.double(), g, stride, *flags, [None] * 2, [None] * 2)
        _check(f"ties s{stride}", got, truth)


def test_mix_several_tiles_per_plane():
    torch.manual_seed(12)
    flags = (True, True, True)
    x, ps, w, g, rms, rvs = _mix_case(torch.float64, 1, *flags, 1, shape=(1, 2, 33, 35))
    got = _run_mix(x, ps, w, g, 1, flags, [None] * 3, [None] * 3)
    truth = mix_ref(x, ps, w.double(), g, 1, *flags, [None] * 3, [None] * 3)
    _check("mix tiles", got, truth)


# --------------------------------------------------------------------------------------------
# Same numbers as pynas._C (float64, CPU), same call signatures
# --------------------------------------------------------------------------------------------


def _ext_edge():
    why = pynas.backends()["cpu"]
    if why is not None:
        pytest.skip(f"pynas._C is unusable: {why}")
    from pynas import _ext

    mod = _ext.get()
    if not hasattr(mod, "cnn_edge_mix_backward"):
        pytest.skip("pynas._C has no fused-edge kernels")
    return mod


def _to(obj, device):
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


def _both(name, *args):
    """(kernels result, pynas._C result on CPU copies of the same arguments)."""
    ext = _ext_edge()
    cpu_args = [_to(a, "cpu") for a in args]
    return getattr(K, name)(*args), getattr(ext, name)(*cpu_args)


def test_same_as_cpu_extension_float64():
    _ext_edge()
    torch.manual_seed(13)
    N, C, H, W = 2, 3, 7, 8
    x = _randn(N, C, H, W)
    ws = [_randn(C, 1, 3, 3), _randn(C, 1, 5, 5)]
    mean, rstd = _randn(C, scale=0.3), _randn(C).abs() + 0.5
    for pre in (0, 1, 2):
        geo = ([2, 1], [1, 4], [1, 2], pre, mean, rstd)
        ys, ys_c = _both("cnn_edge_dw_forward", x, ws, *geo)
        _check(f"dw_forward pre{pre}", ys, ys_c)
        gs = [torch.randn_like(y) for y in ys]
        got, ref = _both("cnn_edge_dw_backward", x, ws, gs, *geo)
        assert type(got) is type(ref) and type(got[1]) is type(ref[1])
        _check(f"dw_backward pre{pre}", got, ref)

    p = _randn(N, C, 5, 3, scale=2.0, shift=1.0)
    rm, rv = _randn(C), _randn(C).abs() + 0.5
    rm_c, rv_c = rm.cpu().clone(), rv.cpu().clone()
    stats = K.cnn_edge_bn_stats(p, EPS, MOMENTUM, rm, rv)
    stats_c = _ext_edge().cnn_edge_bn_stats(p.cpu(), EPS, MOMENTUM, rm_c, rv_c)
    assert type(stats) is type(stats_c)
    _check("bn_stats", [stats, rm, rv], [stats_c, rm_c, rv_c])
    g = torch.randn_like(p)
    for sums in (None, _randn(2, C)):
        got, ref = _both("cnn_edge_bn_backward", g, p, stats[0], stats[1], sums)
        _check("bn_backward", got, ref)

    u, wp = _randn(N, C, 4, 5), _randn(5, C, 1, 1)
    rm, rv = _randn(5), _randn(5).abs() + 0.5
    rm_c, rv_c = rm.cpu().clone(), rv.cpu().clone()
    pw = K.cnn_edge_pw_forward(u, wp, True, EPS, MOMENTUM, rm, rv)
    ref = _ext_edge().cnn_edge_pw_forward(u.cpu(), wp.cpu(), True, EPS, MOMENTUM, rm_c, rv_c)
    _check("pw_forward", [pw, rm, rv], [ref, rm_c, rv_c])
    gp = torch.randn_like(pw[0])
    for need in (True, False):
        got, ref = _both("cnn_edge_pw_backward", gp, u, wp, need)
        _check(f"pw_backward {need}", got, ref)
        got, ref = _both("cnn_edge_dw_backward", x, ws, gs, *geo, need)
        assert type(got[1]) is type(ref[1]) and len(got[1]) == len(ref[1])
        _check(f"dw_backward need_grad_w={need}", got, ref)

    for stride in (1, 2):
        flags = (True, True, stride == 1)
        x, ps, w, g, rms, rvs = _mix_case(torch.float64, stride, *flags, 2, ints=stride == 2)
        rms_c, rvs_c = [t.cpu().clone() for t in rms], [t.cpu().clone() for t in rvs]
        fwd = K.cnn_edge_mix_forward(x, ps, w, stride, *flags, EPS, MOMENTUM, rms, rvs)
        fwd_c = _ext_edge().cnn_edge_mix_forward(_to(x, "cpu"), _to(ps, "cpu"), w.cpu(), stride, *flags, EPS, MOMENTUM,
                                             rms_c, rvs_c)
        assert type(fwd) is type(fwd_c)
        _check(f"mix_forward s{stride}", [fwd, rms, rvs], [fwd_c, rms_c, rvs_c])
        got, ref = _both("cnn_edge_mix_backward", g, x, ps, w, stride, *flags, fwd[1], fwd[2])
        assert type(got) is type(ref) and type(got[1]) is type(ref[1])
        _check(f"mix_backward s{stride}", got, ref)


def test_deterministic():
    torch.manual_seed(14)
    flags = (True, True, True)
    x, ps, w, g, _, _ = _mix_case(torch.float32, 1, *flags, 2)
    a = _run_mix(x, ps, w, g, 1, flags, [None] * 4, [None] * 4)
    b = _run_mix(x, ps, w, g, 1, flags, [None] * 4, [None] * 4)
    for u, v in zip(_flat(a), _flat(b)):
        assert torch.equal(u, v)
    ws = [_randn(3, 1, 3, 3, dtype=torch.float32)]
    gs = [torch.randn_like(x)]
    mean, rstd = _randn(3, dtype=torch.float32), _randn(3, dtype=torch.float32).abs() + 0.5
    a = K.cnn_edge_dw_backward(x, ws, gs, [1], [1], [1], 2, mean, rstd)
    b = K.cnn_edge_dw_backward(x, ws, gs, [1], [1], [1], 2, mean, rstd)
    for u, v in zip(_flat(a), _flat(b)):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument
# --------------------------------------------------------------------------------------------


def _dw_args(**kw):
    C = 3
    args = dict(x=_randn(2, C, 5, 5), ws=[_randn(C, 1, 3, 3)], strides=[1], pads=[1], dils=[1], pre=2,
                mean=_randn(C), rstd=_randn(C).abs())
    args.update(kw)
    return args


def _mix_args(**kw):
    x = _randn(2, 3, 5, 5)
    args = dict(x=x, ps=[_randn(2, 3, 5, 5)], w=_randn(4), stride=1, has_max=True, has_avg=True, has_skip=True,
                eps=EPS, momentum=MOMENTUM, running_means=[None] * 3, running_vars=[None] * 3)
    args.update(kw)
    return args


BAD = [
    ("cnn_edge_dw_forward", lambda: _dw_args(x=_randn(2, 3, 5)), "x", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(x=_randn(2, 3, 5, 5).long()), "x", TypeError),
    ("cnn_edge_dw_forward", lambda: _dw_args(ws=[]), "ws", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(ws=[_randn(4, 1, 3, 3)]), "ws[0]", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(ws=[_randn(3, 1, 3, 3, dtype=torch.float32)]), "ws[0]", TypeError),
    ("cnn_edge_dw_forward", lambda: _dw_args(pads=[1, 1]), "pads", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(pre=3), "pre", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(mean=_randn(4)), "mean", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(rstd=None), "rstd", TypeError),
    ("cnn_edge_dw_forward", lambda: _dw_args(strides=[0]), "strides[0]", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(ws=[_randn(3, 1, 9, 9)], pads=[0]), "x", ValueError),
    ("cnn_edge_dw_backward", lambda: dict(_dw_args(), gs=[_randn(2, 3, 4, 5)]), "gs[0]", ValueError),
    ("cnn_edge_dw_backward", lambda: dict(_dw_args(), gs=[]), "gs", ValueError),
    ("cnn_edge_bn_stats", lambda: dict(p=_randn(1, 3, 1, 1), eps=EPS, momentum=0.1, running_mean=None,
                                   running_var=None), "p", ValueError),
    ("cnn_edge_bn_stats", lambda: dict(p=_randn(2, 3, 2, 2), eps=0.0, momentum=0.1, running_mean=None,
                                   running_var=None), "eps", ValueError),
    ("cnn_edge_bn_stats", lambda: dict(p=_randn(2, 3, 2, 2), eps=EPS, momentum=0.1, running_mean=_randn(2),
                                   running_var=None), "running_mean", ValueError),
    ("cnn_edge_bn_backward", lambda: dict(g=_randn(2, 3, 2, 3), p=_randn(2, 3, 2, 2), mean=_randn(3), rstd=_randn(3),
                                      sums=None), "g", ValueError),
    ("cnn_edge_bn_backward", lambda: dict(g=_randn(2, 3, 2, 2), p=_randn(2, 3, 2, 2), mean=_randn(3), rstd=_randn(3),
                                      sums=_randn(3, 3)), "sums", ValueError),
    ("cnn_edge_dw_forward", lambda: _dw_args(x=_randn(2, 3, 0, 5), pads=[2]), "x", ValueError),
    ("cnn_edge_pw_forward", lambda: dict(u=_randn(2, 3, 4, 4), w=_randn(5, 2, 1, 1), stats=False, eps=EPS, momentum=0.1,
                                     running_mean=None, running_var=None), "w", ValueError),
    ("cnn_edge_pw_forward", lambda: dict(u=_randn(2, 3, 4, 4), w=_randn(5, 3, 1, 1), stats=True, eps=EPS, momentum=0.1,
                                     running_mean=_randn(3), running_var=None), "running_mean", ValueError),
    ("cnn_edge_pw_backward", lambda: dict(g=_randn(2, 3, 4, 4), u=_randn(2, 3, 4, 4), w=_randn(5, 3, 1, 1)), "g",
     ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(stride=3), "stride", ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(stride=2, ps=[_randn(2, 3, 3, 3)]), "has_skip", ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(ps=[_randn(2, 3, 4, 5)]), "ps[0]", ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(w=_randn(3)), "w", ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(running_means=[None] * 2), "running_means", ValueError),
    ("cnn_edge_mix_forward", lambda: _mix_args(running_vars=[None, None, _randn(5)]), "running_vars[2]", ValueError),
]


@pytest.mark.parametrize("fn,make,name,exc", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(fn, make, name, exc):
    with pytest.raises(exc) as info:
        getattr(K, fn)(**make())
    # the message opens with the op and names the argument: "op: name: expected ..." (or "op: a, name, b: ...")
    assert re.match(rf"{fn}: (\w+, )*{re.escape(name)}[:, ]", str(info.value)), str(info.value)


def test_mix_backward_bad_stats_named():
    a = _mix_args()
    kw = dict(g=_randn(2, 3, 5, 5), x=a["x"], ps=a["ps"], w=a["w"], stride=1, has_max=True, has_avg=True,
              has_skip=True, mean=_randn(2, 3), rstd=_randn(3, 3))
    with pytest.raises(ValueError, match="cnn_edge_mix_backward: mean: expected"):
        K.cnn_edge_mix_backward(**kw)
    kw["mean"], kw["g"] = _randn(3, 3), _randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match="cnn_edge_mix_backward: g: expected"):
        K.cnn_edge_mix_backward(**kw)
