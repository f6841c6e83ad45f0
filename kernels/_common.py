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

    Plain tensors get a direct launch: the higher-order-op dispatch behind ``wrap_triton`` costs
    about a millisecond per eager launch. Tensor subclasses (Fake/Functional tensors while
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


def check_block(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
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
