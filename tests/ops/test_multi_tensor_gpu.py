"""The multi-tensor ops of the second-order step on the GPU backends, against the torch._foreach reference
of pynas.ops.multi_tensor (backend="reference") and the float64 formulas.

* Triton (kernels/multi_tensor.py): on CUDA tensors where a GPU is present, else on CPU tensors under
  ``TRITON_INTERPRET=1`` (float64, float32; small lists of odd shapes, an empty tensor among them, one
  tensor longer than a chunk).
* CUDA (torch.ops.pynas.mt_*, csrc/cuda/multi_tensor.cu): skipped without a GPU or without the CUDA
  kernels in pynas._C; all four dtypes, determinism, launch count over 900 tensors, no host sync.
* The finite-difference part's kernels: counted by the profiler over 900 tensors on a GPU (both backends);
  for Triton also on the CPU, as the ops it dispatches under the interpreter for 10 and 300 tensors.
"""
import pytest
import torch

import pynas
from pynas import _ext
from pynas._sync import no_host_sync
from pynas.ops import multi_tensor as mt

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# one tensor longer than a chunk (16384 elements in both backends), an empty one, odd shapes
SHAPES = [(3, 4), (40000,), (1,), (0,), (16, 3, 3), (5, 1, 7)]
LOW = [torch.float16, torch.bfloat16]
ETA, MOMENTUM, WD = 0.025, 0.9, 3e-4


def _ids(dtypes):
    return [str(d).replace("torch.", "") for d in dtypes]


def _lists(dtype, device, n=3, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
            for _ in range(n)]


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=2e-6, atol=2e-6)
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


def _step_truth(params, grads, bufs, scale, momentum=MOMENTUM):
    s = 1.0 if scale is None else float(scale)
    out = []
    for p, g, b in zip(params, grads, bufs):
        d = s * g.double() + WD * p.double()
        if b is not None:
            d = d + momentum * b.double()
        out.append(p.double() - ETA * d)
    return out


def _sum_sq_truth(xs):
    return sum(float((x.double() ** 2).sum()) for x in xs)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------

TRITON_REASON = pynas.backends()["triton"]
triton_only = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton is unusable here: {TRITON_REASON}")
T_DTYPES = [torch.float64, torch.float32] + (LOW if CUDA else [])


@pytest.fixture(scope="module")
def K():
    from pynas._triton import kernel_module

    return kernel_module("multi_tensor")


@triton_only
@pytest.mark.parametrize("dtype", T_DTYPES, ids=_ids(T_DTYPES))
@pytest.mark.parametrize("case", ["bufs+scale", "bufs", "no-bufs", "momentum0"])
def test_triton_virtual_step(K, dtype, case):
    params, grads, bufs = _lists(dtype, DEVICE)
    bufs[1] = None  # a parameter without a momentum buffer yet (and longer than a chunk)
    scale = torch.tensor(0.37, dtype=torch.float64, device=DEVICE) if case == "bufs+scale" else None
    if case == "no-bufs":
        bufs = None
    momentum = 0.0 if case == "momentum0" else MOMENTUM
    ref = [p.clone() for p in params]
    mt.virtual_step_(ref, grads, bufs, ETA, momentum, WD, scale, backend="reference")
    out = [p.clone() for p in params]
    K.virtual_step_(out, grads, bufs, ETA, momentum, WD, scale)
    truth = _step_truth(params, grads, bufs or [None] * len(params), scale, momentum)
    for a, b, t in zip(out, ref, truth):
        if dtype not in LOW:
            torch.testing.assert_close(a, b, **_tol(dtype))
        torch.testing.assert_close(a.double(), t, **_tol(dtype))


@triton_only
@pytest.mark.parametrize("dtype", T_DTYPES, ids=_ids(T_DTYPES))
def test_triton_sum_squares_perturb_copy(K, dtype):
    params, v, _ = _lists(dtype, DEVICE)
    ss = K.sum_squares(v)
    assert ss.shape == () and ss.dtype == torch.float64 and ss.device.type == DEVICE
    ref_ss = mt.sum_squares(v, backend="reference")
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ss, ref_ss, rtol=rel, atol=0)
    assert abs(float(ss) - _sum_sq_truth(v)) <= rel * _sum_sq_truth(v)
    # deterministic: a second call gives the same bits
    assert torch.equal(K.sum_squares(v), ss)

    base = [p.clone() for p in params]
    for sign in (1.0, -2.0):
        out = [torch.full_like(p, 7.0) for p in params]  # every element must be overwritten
        R = K.perturb_(out, base, v, ss, 0.01, sign)
        ref = [p.clone() for p in params]
        ref_R = mt.perturb_(ref, base, v, ref_ss, 0.01, sign, backend="reference")
        assert R.shape == () and R.dtype == torch.float64 and R.device.type == DEVICE
        torch.testing.assert_close(R, ref_R, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
        for o, r, b, x in zip(out, ref, base, v):
            truth = b.double() + sign * float(R) * x.double()
            torch.testing.assert_close(o.double(), truth, **_tol(dtype))
            if dtype not in LOW:
                torch.testing.assert_close(o, r, **_tol(dtype))

    # sum_sq == 0: R = r / tiny, finite in float64 (in float64 tensors the weights stay base when v == 0;
    # narrower dtypes overflow sign * R to inf, as the reference does)
    if dtype == torch.float64:
        zeros = [torch.zeros_like(p) for p in params]
        out = [p.clone() for p in params]
        R = K.perturb_(out, base, zeros, torch.zeros((), dtype=torch.float64, device=DEVICE), 0.01, 1.0)
        assert torch.isfinite(R) and float(R) > 1e300
        for o, b in zip(out, base):
            assert torch.equal(o, b)

    # copy_: bit for bit, NaN included
    src = [p.clone() for p in v]
    src[0].view(-1)[1] = float("nan")
    dst = [torch.zeros_like(p) for p in v]
    K.copy_(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(_bits(d), _bits(s))


@triton_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=_ids([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_triton_copy_is_bit_exact_in_every_dtype(K, dtype):
    # random bit patterns: NaNs with payloads, infinities, subnormals, negative zero all arrive unchanged
    g = torch.Generator().manual_seed(3)
    bits = _bits(torch.empty(0, dtype=dtype)).dtype
    src = [torch.randint(torch.iinfo(bits).min, torch.iinfo(bits).max, s, generator=g, dtype=bits)
           .view(dtype).to(DEVICE) for s in SHAPES]
    dst = [torch.zeros_like(x) for x in src]
    K.copy_(dst, src)
    for d, x in zip(dst, src):
        assert torch.equal(_bits(d), _bits(x))
    with pytest.raises(ValueError, match="src"):
        K.copy_(dst, src[:-1])


# The ops that launch no kernel on a GPU (allocation, metadata, and the host-side table).
NO_KERNEL_OPS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
                 "aten.view.default", "aten.alias.default", "aten.detach.default", "aten.lift_fresh.default"}


@triton_only
@pytest.mark.skipif(CUDA, reason="counts dispatched ops under the interpreter; on a GPU "
                                 "test_triton_launch_count_900_tensors counts the real launches")
def test_triton_finite_difference_dispatches_the_same_few_kernels_for_any_tensor_count(K, monkeypatch):
    """The CPU's view of issue 5's GPU target for the Triton backend: the finite-difference part (||v||^2,
    w + R v, w - R v, the restore) dispatches the same short list of kernels for 10 and 300 tensors. A
    torch._foreach op would pass this count on the CPU while its CUDA kernel launches once per ~100 tensors,
    so none may appear."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    log, inside = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:  # the interpreter's own host copies around a launch are not GPU work
                log.append(str(func))
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        log.append("triton:" + self.fn.__name__)
        inside.append(1)
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    kernels = {}
    for n in (10, 300):
        g = torch.Generator().manual_seed(n)
        sizes = [(i * 37) % 1500 + 1 for i in range(n)]
        params, base, v = [[torch.randn(s, generator=g) for s in sizes] for _ in range(3)]
        log.clear()
        with Ops():
            _second_order_ops(params, base, v, K)
        kernels[n] = [op for op in log if op not in NO_KERNEL_OPS]
        assert not [op for op in log if "_foreach" in op], log
        for p, b in zip(params, base):
            assert torch.equal(p, b)
    assert kernels[10] == kernels[300], kernels
    assert kernels[10] == ["triton:_sum_squares_kernel", "aten.sum.default", "triton:_perturb_kernel",
                           "triton:_perturb_kernel", "triton:_copy_kernel"], kernels[10]


@triton_only
def test_triton_edge_cases(K):
    # only empty tensors: nothing to do, sum 0
    empties = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    assert float(K.sum_squares(empties)) == 0.0
    K.virtual_step_(empties, empties, None, ETA, MOMENTUM, WD)
    # no parameter at all: perturb_ still returns R
    R = K.perturb_([], [], [], torch.tensor(4.0, dtype=torch.float64, device=DEVICE), 0.5, 1.0)
    assert float(R) == pytest.approx(0.25, rel=1e-15)
    # float32 sum_sq and grad_scale are read as they are
    p, g, _ = _lists(torch.float64, DEVICE, shapes=[(7,)])
    out = [x.clone() for x in p]
    K.virtual_step_(out, g, None, ETA, 0.0, WD, torch.tensor([0.5], dtype=torch.float32, device=DEVICE))
    torch.testing.assert_close(out[0], p[0] - ETA * (0.5 * g[0] + WD * p[0]), rtol=1e-12, atol=1e-12)
    # argument checks
    a, b, _ = _lists(torch.float64, DEVICE, shapes=[(3,), (4,)])
    with pytest.raises(ValueError, match="grads"):
        K.virtual_step_(a, [b[1], b[0]], None, ETA, 0.0, WD)
    with pytest.raises(ValueError, match="expected 2 tensors"):
        K.perturb_(a, a[:1], b, torch.tensor(1.0, dtype=torch.float64), 0.1, 1.0)
    with pytest.raises(ValueError, match="r: expected a positive value"):
        K.perturb_(a, a, b, torch.tensor(1.0, dtype=torch.float64), 0.0, 1.0)
    with pytest.raises(ValueError, match="dtype and device"):
        K.sum_squares([a[0], a[1].float()])


# ------------------------------------------------------------------------------------------------
# CUDA (torch.ops.pynas.mt_*)
# ------------------------------------------------------------------------------------------------


def _cuda_reason():
    if not CUDA:
        return "no CUDA device"
    if _ext.load() is None:
        return f"pynas._C is not built: {_ext.error()}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("pynas::mt_sum_squares", "CUDA"):
        return "pynas._C was built without its CUDA kernels"
    return None


CUDA_REASON = _cuda_reason()
cuda_only = pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
C_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@cuda_only
@pytest.mark.parametrize("dtype", C_DTYPES, ids=_ids(C_DTYPES))
@pytest.mark.parametrize("with_scale", [False, True])
def test_cuda_virtual_step(dtype, with_scale):
    params, grads, bufs = _lists(dtype, "cuda")
    bufs[1] = None
    scale = torch.tensor(0.37, dtype=torch.float64, device="cuda") if with_scale else None
    out = [p.clone() for p in params]
    torch.ops.pynas.mt_virtual_step_(out, grads, bufs, ETA, MOMENTUM, WD, scale)
    ref = [p.clone() for p in params]
    mt.virtual_step_(ref, grads, bufs, ETA, MOMENTUM, WD, scale, backend="reference")
    for a, b, t in zip(out, ref, _step_truth(params, grads, bufs, scale)):
        if dtype not in LOW:
            torch.testing.assert_close(a, b, **_tol(dtype))
        torch.testing.assert_close(a.double(), t, **_tol(dtype))


@cuda_only
@pytest.mark.parametrize("dtype", C_DTYPES, ids=_ids(C_DTYPES))
def test_cuda_sum_squares_perturb_copy(dtype):
    params, v, _ = _lists(dtype, "cuda")
    ss = torch.ops.pynas.mt_sum_squares(v)
    assert ss.shape == () and ss.dtype == torch.float64 and ss.is_cuda
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    truth = _sum_sq_truth(v)
    assert abs(float(ss) - truth) <= rel * truth
    torch.testing.assert_close(ss, mt.sum_squares(v, backend="reference"), rtol=rel, atol=0)
    assert torch.equal(torch.ops.pynas.mt_sum_squares(v), ss)  # deterministic

    base = [p.clone() for p in params]
    for sign in (1.0, -1.0):
        out = [torch.full_like(p, 7.0) for p in params]
        R = torch.ops.pynas.mt_perturb_(out, base, v, ss, 0.01, sign)
        assert R.shape == () and R.dtype == torch.float64 and R.is_cuda
        assert float(R) == pytest.approx(0.01 / truth ** 0.5, rel=rel)
        ref = [p.clone() for p in params]
        mt.perturb_(ref, base, v, ss, 0.01, sign, backend="reference")
        for o, r, b, x in zip(out, ref, base, v):
            torch.testing.assert_close(o.double(), b.double() + sign * float(R) * x.double(), **_tol(dtype))
            if dtype not in LOW:
                torch.testing.assert_close(o, r, **_tol(dtype))

    src = [p.clone() for p in v]
    src[0].view(-1)[1] = float("nan")
    dst = [torch.zeros_like(p) for p in v]
    torch.ops.pynas.mt_copy_(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(_bits(d), _bits(s))


@cuda_only
def test_cuda_edge_cases_and_checks():
    empties = [torch.empty(0, device="cuda"), torch.empty(0, 3, device="cuda")]
    assert float(torch.ops.pynas.mt_sum_squares(empties)) == 0.0
    torch.ops.pynas.mt_virtual_step_(empties, empties, [], ETA, MOMENTUM, WD, None)
    torch.ops.pynas.mt_copy_(empties, empties)
    a, b, _ = _lists(torch.float32, "cuda", shapes=[(3,), (4,)])
    with pytest.raises(RuntimeError, match=r"grads\[0\]: expected the shape"):
        torch.ops.pynas.mt_virtual_step_(a, [b[1], b[0]], [], ETA, 0.0, WD, None)
    with pytest.raises(RuntimeError, match="expected 2 tensors"):
        torch.ops.pynas.mt_perturb_(a, a[:1], b, torch.ones((), device="cuda"), 0.1, 1.0)
    with pytest.raises(RuntimeError, match="r: expected a positive value"):
        torch.ops.pynas.mt_perturb_(a, a, b, torch.ones((), device="cuda"), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="dtype and device of the first parameter"):
        torch.ops.pynas.mt_sum_squares([a[0], a[1].double()])


def _many(n=900, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [(i * 37) % 1500 + 1 for i in range(n)]
    return [[torch.randn(s, generator=g, device="cuda", dtype=dtype) for s in sizes] for _ in range(3)]


def _second_order_ops(params, base, v, ops=mt._TorchOps):
    """The finite-difference part: ||v||^2, w + R v, w - R v, the restore (ops: the CUDA ops or the Triton
    kernel module, which share this interface)."""
    ss = ops.sum_squares(v)
    ops.perturb_(params, base, v, ss, 0.01, 1.0)
    ops.perturb_(params, base, v, ss, 0.01, -1.0)
    ops.copy_(params, base)
    return ss


def _launch_count_900_tensors(ops):
    from torch.profiler import ProfilerActivity, profile

    params, base, v = _many()
    _second_order_ops(params, base, v, ops)  # warm up (compiles, pinned host blocks, lazy init)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _second_order_ops(params, base, v, ops)
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e.name for e in device_events if not e.name.lower().startswith(("memcpy", "memset"))]
    assert 1 <= len(kernels) <= 10, kernels
    # and the result is right: params back to base, bit for bit
    for p, b in zip(params, base):
        assert torch.equal(p, b)


@cuda_only
def test_cuda_launch_count_900_tensors():
    _launch_count_900_tensors(mt._TorchOps)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@triton_only
def test_triton_launch_count_900_tensors(K):
    _launch_count_900_tensors(K)


@cuda_only
def test_cuda_no_host_sync():
    params, base, v = _many(50)
    grads = [x.clone() for x in v]
    torch.cuda.synchronize()
    with no_host_sync():
        ss = _second_order_ops(params, base, v)
        scale = mt.clip_coefficient(ss, 0.25)
        torch.ops.pynas.mt_virtual_step_(params, grads, list(v), ETA, MOMENTUM, WD, scale)
        # a scale on the CPU goes over through pinned memory, not a syncing pageable copy
        torch.ops.pynas.mt_virtual_step_(params, grads, list(v), ETA, MOMENTUM, WD, torch.tensor(0.5))
    torch.cuda.synchronize()
    assert torch.isfinite(ss)


@cuda_only
@triton_only
def test_triton_no_host_sync_on_cuda(K):
    params, base, v = _many(50)
    torch.cuda.synchronize()
    with no_host_sync():
        ss = K.sum_squares(v)
        K.perturb_(params, base, v, ss, 0.01, 1.0)
        K.copy_(params, base)
        K.virtual_step_(params, v, list(v), ETA, MOMENTUM, WD, mt.clip_coefficient(ss, 0.25))
        K.virtual_step_(params, v, list(v), ETA, MOMENTUM, WD, torch.tensor(0.5))  # CPU scale: pinned copy
    torch.cuda.synchronize()
    assert torch.isfinite(ss)
