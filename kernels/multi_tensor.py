"""Triton kernels of the multi-tensor ops of the second-order architect step: ``virtual_step_``,
``sum_squares``, ``perturb_`` and ``copy_``, with the contracts (math, shapes) stated in
``pynas.ops.multi_tensor``, whose ``torch._foreach`` formulation is the reference.

How ALL tensors reach ONE launch: the wrappers cut every tensor into chunks of at most ``CHUNK``
elements (a chunk never spans two tensors) and write one row per chunk into an int64 table,
``[address a, address b, address c, length]`` (addresses of the chunk's first element; 0 where a
tensor is absent, e.g. a parameter without a momentum buffer), after a header row that holds the op's
float scalars (eta, momentum, weight_decay / r, sign, tiny) as float64 bits, since Triton would pass
Python floats as float32. Program ``i`` reads chunk row ``i`` (table row i + 1) and turns
the addresses back into typed pointers (``int64.to(tl.pointer_type(DTYPE), bitcast=True)``, the
pattern of Triton's grouped-GEMM tutorial), so the number of tensors never changes the number of
launches. On a GPU the table goes to the device through pinned memory with ``non_blocking=True``
(no host sync). Launches per call: virtual_step_ 1, sum_squares 2 (per-chunk float64 partials, then
``torch.sum`` of the partials: fixed order, no atomics), perturb_ 1 (R is computed in every program
from the 0-d ``sum_sq`` tensor; program 0 stores it), copy_ 1 (the elements moved as integers of their
size, so every bit pattern, NaN payloads included, arrives unchanged).

Arithmetic is in float32 (float64 for float64 tensors); the partial sums of squares are stored in
float64. Data-dependent scalars (``sum_sq``, ``grad_scale``) are read by the kernels, never on the
host. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the addresses are host
addresses there).
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["CHUNK", "BLOCK", "virtual_step_", "sum_squares", "perturb_", "copy_"]

#: Elements per program (one table row).
CHUNK = 16384
#: Elements one program handles per loop step.
BLOCK = 1024
#: Smallest positive normal float64: R's denominator never reaches zero.
_TINY = torch.finfo(torch.float64).tiny

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _row(table_ptr, pid, col: tl.constexpr, DTYPE: tl.constexpr):
    """Column ``col`` of the chunk row of program ``pid`` (table row pid + 1) as a pointer to DTYPE."""
    return tl.load(table_ptr + (pid + 1) * 4 + col).to(tl.pointer_type(DTYPE), bitcast=True)


@triton.jit
def _length(table_ptr, pid):
    """Length of the chunk of program ``pid``."""
    return tl.load(table_ptr + (pid + 1) * 4 + 3)


@triton.jit
def _header(table_ptr, col: tl.constexpr):
    """Float64 scalar ``col`` of the header row (row 0; the bits of a float64 stored as int64)."""
    return tl.load(table_ptr + col).to(tl.float64, bitcast=True)


@triton.jit
def _virtual_step_kernel(table_ptr, scale_ptr, HAS_SCALE: tl.constexpr, HAS_BUF: tl.constexpr, DTYPE: tl.constexpr,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    """w <- w - eta * (s * g + weight_decay * w + momentum * buf) on the chunk of row ``pid``.

    table_ptr: (1 + n_rows, 4) int64: header [eta, momentum, weight_decay, -] (float64 bits), then rows
    [w, g, buf (0: none), length]. scale_ptr: 0-d float64 s
    (read if HAS_SCALE, else s = 1). HAS_BUF: some row has a buffer and momentum != 0.
    Grid: (n_rows,).
    """
    pid = tl.program_id(0)
    w_ptr = _row(table_ptr, pid, 0, DTYPE)
    g_ptr = _row(table_ptr, pid, 1, DTYPE)
    n = _length(table_ptr, pid)
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(ACC)
    else:
        s = 1.0
    e = _header(table_ptr, 0).to(ACC)
    wd = _header(table_ptr, 2).to(ACC)
    if HAS_BUF:
        b_addr = tl.load(table_ptr + (pid + 1) * 4 + 2)
        b_ptr = b_addr.to(tl.pointer_type(DTYPE), bitcast=True)
        m = _header(table_ptr, 1).to(ACC)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = s * g + wd * w
        if HAS_BUF:
            buf = tl.load(b_ptr + offs, mask=mask & (b_addr != 0), other=0.0).to(ACC)
            d = d + m * buf
        tl.store(w_ptr + offs, (w - e * d).to(DTYPE), mask=mask)


@triton.jit
def _sum_squares_kernel(table_ptr, partial_ptr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    """partial[pid] = sum of x^2 over the chunk of program ``pid`` (table: header, then rows
    [x, -, -, length]), in ACC, stored as float64. Grid: (n_rows,)."""
    pid = tl.program_id(0)
    x_ptr = _row(table_ptr, pid, 0, DTYPE)
    n = _length(table_ptr, pid)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(ACC)
        acc += x * x
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _perturb_kernel(table_ptr, n_rows, sum_sq_ptr, r_out_ptr,
                    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """R = r / max(sqrt(sum_sq), tiny) (float64); w <- base + sign * R * v on the chunk of program
    ``pid`` (table: header [r, sign, tiny, -] as float64 bits, then rows [w, base, v, length]);
    program 0 stores R to r_out (0-d float64). Grid: (max(n_rows, 1),)."""
    pid = tl.program_id(0)
    norm = tl.sqrt(tl.load(sum_sq_ptr).to(tl.float64))
    # not tl.maximum (max.f64 on a GPU returns the non-NaN operand): a NaN norm gives a NaN R, as on the CPU
    R = _header(table_ptr, 0) / tl.where(norm < _header(table_ptr, 2), _header(table_ptr, 2), norm)
    if pid == 0:
        tl.store(r_out_ptr, R)
    if pid < n_rows:
        w_ptr = _row(table_ptr, pid, 0, DTYPE)
        b_ptr = _row(table_ptr, pid, 1, DTYPE)
        v_ptr = _row(table_ptr, pid, 2, DTYPE)
        n = _length(table_ptr, pid)
        a = (_header(table_ptr, 1) * R).to(ACC)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            w0 = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(w_ptr + offs, (w0 + a * v).to(DTYPE), mask=mask)


@triton.jit
def _copy_kernel(table_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """dst <- src on the chunk of program ``pid`` (table: header, then rows [dst, src, -, length]), moved as
    BITS, the integer dtype of the element size. Grid: (n_rows,)."""
    pid = tl.program_id(0)
    d_ptr = _row(table_ptr, pid, 0, BITS)
    s_ptr = _row(table_ptr, pid, 1, BITS)
    n = _length(table_ptr, pid)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(d_ptr + offs, tl.load(s_ptr + offs, mask=mask), mask=mask)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(op: str, name: str, ts: Sequence[torch.Tensor], ref: Optional[torch.Tensor]) -> None:
    """Each ``ts[i]`` is a dense contiguous float tensor, of ref's dtype and device when ref is given."""
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}]: expected a dense contiguous tensor")
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"{op}: {name}[{i}]: expected float16, bfloat16, float32 or float64, got {t.dtype}")
        if ref is not None and (t.dtype != ref.dtype or t.device != ref.device):
            raise ValueError(f"{op}: {name}[{i}]: expected the dtype and device of the first parameter "
                             f"({ref.dtype} on {ref.device}), got {t.dtype} on {t.device}")


def _check_like(op: str, name: str, ts, params, allow_none: bool = False) -> None:
    """``ts`` holds one tensor per parameter (None allowed if allow_none), each like its parameter."""
    if len(ts) != len(params):
        raise ValueError(f"{op}: {name}: expected {len(params)} tensors (one per parameter), got {len(ts)}")
    for i, (t, p) in enumerate(zip(ts, params)):
        if t is None and allow_none:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}]: expected a dense contiguous tensor")
        if t.dtype != p.dtype or t.device != p.device or t.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}]: expected the shape, dtype and device of params[{i}] "
                             f"({tuple(p.shape)}, {p.dtype} on {p.device}), got ({tuple(t.shape)}, {t.dtype} "
                             f"on {t.device})")


def _bits(x: float) -> int:
    """The bits of float64 ``x`` as an int64 (Triton would pass a Python float as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _table(lists: Sequence[Sequence[Optional[torch.Tensor]]], device: torch.device,
           header: Sequence[float] = ()) -> tuple[torch.Tensor, int]:
    """The table on ``device``: a header row (up to 3 float64 scalars, as bits), then one row per chunk
    of ``lists[0][i]`` (partners ``lists[j][i]``, None -> address 0); and the number of chunk rows."""
    rows = [_bits(h) for h in header] + [0] * (4 - len(header))
    first = lists[0]
    for i, t in enumerate(first):
        n = t.numel()
        if n == 0:
            continue
        item = t.element_size()
        addrs = [0, 0, 0]
        for j, lst in enumerate(lists[:3]):
            if lst[i] is not None:
                addrs[j] = lst[i].data_ptr()
        for b in range(0, n, CHUNK):
            off = b * item
            rows.extend([a + off if a else 0 for a in addrs] + [min(CHUNK, n - b)])
    n_rows = len(rows) // 4 - 1
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return host, n_rows
    # pinned + non_blocking: an async copy on the current stream, no host sync
    return host.pin_memory().to(device, non_blocking=True), n_rows


def _scalar_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A one-value tensor as a 0-d float64 tensor on ``device`` (no copy when it already is one; a CPU value
    goes to a GPU through pinned memory, non_blocking: from pageable memory the copy would sync the host)."""
    s = t.reshape(()).to(dtype=torch.float64)
    if s.device.type == "cpu" and device.type != "cpu":
        s = s.pin_memory()
    return s.to(device=device, non_blocking=True)


@torch.no_grad()
def virtual_step_(params, grads, bufs, eta: float, momentum: float, weight_decay: float,
                  grad_scale: Optional[torch.Tensor] = None) -> None:
    """w <- w - eta * (momentum * buf + s * g + weight_decay * w) for every tensor, in place (one launch).

    params, grads: lists of N same-dtype contiguous tensors, grads[i] shaped like params[i];
    bufs: None, or N entries (a tensor like params[i], or None: no buffer yet, counts as zero);
    grad_scale: None (s = 1) or a one-value tensor s, read on the device.
    """
    params, grads = list(params), list(grads)
    bufs = list(bufs) if bufs is not None else [None] * len(params)
    op = "virtual_step_"
    if not params:
        return
    _check(op, "params", params, params[0])
    _check_like(op, "grads", grads, params)
    if len(bufs) == 0:
        bufs = [None] * len(params)
    _check_like(op, "bufs", bufs, params, allow_none=True)
    if grad_scale is not None and grad_scale.numel() != 1:
        raise ValueError(f"{op}: grad_scale: expected one value, got {grad_scale.numel()}")
    device, dtype = params[0].device, params[0].dtype
    has_buf = momentum != 0.0 and any(b is not None for b in bufs)
    table, n_rows = _table([params, grads, bufs if has_buf else [None] * len(params)], device,
                           (eta, momentum, weight_decay))
    if n_rows == 0:
        return
    scale = _scalar_on(grad_scale, device) if grad_scale is not None else table
    _virtual_step_kernel[(n_rows,)](
        table, scale, HAS_SCALE=grad_scale is not None, HAS_BUF=has_buf, DTYPE=_TL_DTYPES[dtype],
        ACC=_acc(dtype), BLOCK=BLOCK)


@torch.no_grad()
def sum_squares(xs) -> torch.Tensor:
    """Sum over all tensors of sum(x^2), a 0-d float64 tensor on their device (two launches).

    xs: non-empty list of same-dtype contiguous tensors of any shapes.
    """
    xs = list(xs)
    if not xs:
        raise ValueError("sum_squares: no tensor to place the result on")
    _check("sum_squares", "xs", xs, xs[0])
    device, dtype = xs[0].device, xs[0].dtype
    table, n_rows = _table([xs], device)
    if n_rows == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    partial = torch.empty(n_rows, dtype=torch.float64, device=device)
    _sum_squares_kernel[(n_rows,)](table, partial, DTYPE=_TL_DTYPES[dtype], ACC=_acc(dtype), BLOCK=BLOCK)
    return partial.sum()


@torch.no_grad()
def perturb_(params, base, v, sum_sq: torch.Tensor, r: float, sign: float) -> torch.Tensor:
    """w <- base + sign * R * v for every tensor, R = r / max(sqrt(sum_sq), tiny); returns R (0-d
    float64, on the device). One launch.

    params, base, v: lists of N same-dtype contiguous tensors shaped alike; sum_sq: one-value tensor;
    r > 0; sign: +1 or -1 (any float).
    """
    params, base, v = list(params), list(base), list(v)
    op = "perturb_"
    if params:
        _check(op, "params", params, params[0])
    _check_like(op, "base", base, params)
    _check_like(op, "v", v, params)
    if sum_sq.numel() != 1:
        raise ValueError(f"{op}: sum_sq: expected one value, got {sum_sq.numel()}")
    if not r > 0:
        raise ValueError(f"{op}: r: expected a positive value, got {r}")
    device = params[0].device if params else sum_sq.device
    dtype = params[0].dtype if params else torch.float32
    ss = _scalar_on(sum_sq, device)
    R = torch.empty((), dtype=torch.float64, device=device)
    table, n_rows = _table([params, base, v], device, (r, sign, _TINY))
    _perturb_kernel[(max(n_rows, 1),)](
        table, n_rows, ss, R, DTYPE=_TL_DTYPES[dtype], ACC=_acc(dtype), BLOCK=BLOCK)
    return R


_BIT_DTYPES = {2: tl.int16, 4: tl.int32, 8: tl.int64}


@torch.no_grad()
def copy_(dst, src) -> None:
    """dst[i] <- src[i] for every tensor, bit for bit (one launch).

    dst, src: lists of N same-dtype contiguous tensors shaped alike.
    """
    dst, src = list(dst), list(src)
    if not dst:
        return
    _check("copy_", "dst", dst, dst[0])
    _check_like("copy_", "src", src, dst)
    table, n_rows = _table([dst, src], dst[0].device)
    if n_rows == 0:
        return
    _copy_kernel[(n_rows,)](table, BITS=_BIT_DTYPES[dst[0].element_size()], BLOCK=BLOCK)
