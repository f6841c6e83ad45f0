"""Host-side helpers shared by the Triton kernel modules: launch geometry, argument checks, tracing."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

#: Pointer arguments per launch of the kernels that take a list of tensors; longer lists go in chunks.
MAX_POINTERS = 8
#: Offsets switch to int64 once the last offset of the grid can reach this (2**31).
INT64_OFFSETS_FROM = 2**31


def launchable(kernel, tensors: Sequence[torch.Tensor]):
    """The kernel itself, or wrapped by ``wrap_triton`` when ``tensors`` are being traced.

    Plain tensors get a direct launch, without the higher-order-op dispatch behind ``wrap_triton``
    (costly per eager launch). Tensor subclasses (Fake/Functional tensors while
    ``triton_op`` or ``torch.compile`` trace) need the wrapper to appear in the graph. An
    interpreted kernel (``TRITON_INTERPRET=1``) is never wrapped: some torch releases reject it.
    """
    from triton.runtime.jit import JITFunction

    plain = (torch.Tensor, torch.nn.Parameter)
    if not isinstance(kernel, JITFunction) or all(type(t) in plain for t in tensors):
        return kernel
    return torch.library.wrap_triton(kernel)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: The dtypes the Triton kernels load and store (they accumulate in float32, float64 for float64).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The guards below keep a launch in bounds; the public checks (pynas.ops._checks) come first. Each
# message is "name: expected ..., got ...".
def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    return t


def check_supported_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """``t`` has the shape, the dtype (unless not ``dtype``) and the device of ``ref``."""
    check_shape(name, t, ref.shape, f"the shape of {ref_name}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    check_device(name, t, ref_name, ref)


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected the device of {ref_name} ({ref.device}), got {t.device}")


def check_block(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
    return block_size


def launch_geometry(numel: int, block: int) -> tuple[int, bool]:
    """(programs of ``block`` elements covering ``numel``, whether their offsets need int64)."""
    n_programs = triton.cdiv(numel, block)
    return n_programs, n_programs * block > INT64_OFFSETS_FROM - 1


def chunks(n: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in pieces of at most MAX_POINTERS ([] for n = 0)."""
    return [(c, min(c + MAX_POINTERS, n)) for c in range(0, n, MAX_POINTERS)]


def padded(ts: Sequence[torch.Tensor], dummy: torch.Tensor) -> list[torch.Tensor]:
    """``ts`` padded to MAX_POINTERS entries with ``dummy``, a never-read placeholder."""
    return list(ts) + [dummy] * (MAX_POINTERS - len(ts))
