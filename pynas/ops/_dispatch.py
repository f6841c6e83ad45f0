"""Which implementation computes a fused op: each op's table of implementations, and the choice among them.

Every fused op (mixed_sum, rnn_mix, cnn_edge, rnn_cell, multi_tensor, ...) declares one :class:`Implementation`
per backend that can compute it: the devices and dtypes it takes, what else it needs of its inputs
(``not_supported_reasons``), the kernels it calls, and whether it has been ``validated`` on the hardware it
targets. :meth:`OpTable.resolve` returns the implementation itself: the one named (``backend=``, else the
innermost :func:`pynas.use_backend`, else ``$PYNAS_BACKEND``), or under ``auto`` the first of the device's
preference order that can take the inputs and, on a GPU, has been validated there. When none can, the error
lists every candidate's reasons. ``python -m pynas.info`` prints the tables.

An implementation that has not passed the GPU check on a real card (benchmarks/gpu_check.sh) stays
``validated=False``: ``auto`` leaves it alone on GPU tensors, naming its backend still runs it, and
``PYNAS_FUSED_GPU_AUTO=1`` lets ``auto`` take every GPU implementation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backend
from .._triton import interpreting

FLOATS: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WIDE_FLOATS: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# Fastest first. Triton on the CPU is the interpreter: correct but slow, so ``auto`` never picks it there.
PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

Needs = Callable[[Sequence[torch.Tensor]], List[str]]


def _no_needs(tensors: Sequence[torch.Tensor]) -> List[str]:
    return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True, eq=False)
class Implementation:
    """One backend's implementation of one op.

    ``kernels()`` returns what the op calls (loaded on first use: the extension, a Triton module, or a
    namespace of functions); the reference implementation has none. ``layout`` says, for the table, what it
    needs of its inputs' memory layout; ``needs(tensors)`` lists the reasons, other than backend, device and
    dtype, why it cannot take these inputs.
    """

    op: str
    backend: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    loader: Optional[Callable[[], Any]] = None
    validated: bool = True
    layout: str = "strided (made contiguous)"
    needs: Needs = _no_needs
    _cache: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def kernels(self) -> Any:
        if "k" not in self._cache:
            if self.loader is None:
                raise RuntimeError(f"{self.op}: the {self.backend!r} implementation has no kernels")
            self._cache["k"] = self.loader()
        return self._cache["k"]

    def unavailable_reason(self) -> Optional[str]:
        """Why this implementation's backend cannot run on this machine at all (None when it can)."""
        return _backend.BACKENDS[self.backend].unavailable_reason()

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor]) -> List[str]:
        """Every reason this implementation cannot take these tensors (empty when it can)."""
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        for t in tensors:
            dev = t.device.type
            if dev == "cpu" and self.backend == "triton" and not interpreting():
                reasons.append(f"{self.backend} runs on CPU tensors only under TRITON_INTERPRET=1")
            elif dev not in self.devices:
                reasons.append(f"device {dev!r} is not supported by backend {self.backend!r}")
            if t.dtype not in self.dtypes:
                reasons.append(f"dtype {t.dtype} is not supported by backend {self.backend!r}")
        if not reasons:
            reasons += self.needs(tensors)
        return list(dict.fromkeys(reasons))

    def auto_reason(self, device: str) -> Optional[str]:
        """Why ``auto`` passes over this implementation for tensors on ``device`` although it could run them."""
        if device != "cpu" and not self.validated and not _backend.GPU_FUSED_AUTO:
            return (f"not yet validated on a GPU (benchmarks/gpu_check.sh); PYNAS_FUSED_GPU_AUTO=1 or naming "
                    f"{self.backend!r} runs it")
        return None


class OpTable:
    """The implementations of one op, by backend name."""

    def __init__(self, op: str, implementations: Sequence[Implementation]):
        self.op = op
        self.implementations: Dict[str, Implementation] = {}
        for impl in implementations:
            if impl.op != op:
                raise ValueError(f"implementations: {impl.op!r}'s implementation given to the {op!r} table")
            self.implementations[impl.backend] = impl
        if "reference" not in self.implementations:
            raise ValueError(f"implementations: the {op!r} table needs a 'reference' implementation")

    def __getitem__(self, backend: str) -> Implementation:
        return self.implementations[backend]

    def __iter__(self):
        return iter(self.implementations.values())

    def resolve(self, tensors: Sequence[torch.Tensor], backend: Optional[str] = None,
                strict: bool = True) -> Optional[Implementation]:
        """The implementation that computes this op on ``tensors`` under ``backend`` (None: the one in force).

        A named backend that cannot take the tensors raises RuntimeError with its reasons, or with
        ``strict=False`` gives None (for a caller with another way to compute the same thing).
        """
        key = _backend._check_name(backend) if backend is not None else _backend.current_backend()
        if key != "auto":
            impl = self.implementations.get(key)
            reasons = impl.not_supported_reasons(tensors) if impl is not None else [f"it has no {self.op} kernels"]
            if not reasons:
                return impl
            if not strict:
                return None
            raise RuntimeError(f"backend {key!r} cannot run {self.op}: " + "; ".join(reasons))
        dev = tensors[0].device.type if tensors else "cpu"
        passed = []
        for name in PREFERENCE.get(dev, ("reference",)):
            impl = self.implementations.get(name)
            if impl is None:
                continue
            reasons = impl.not_supported_reasons(tensors)
            why = reasons or ([impl.auto_reason(dev)] if impl.auto_reason(dev) else [])
            if not why:
                return impl
            passed.append(f"{name}: " + "; ".join(why))
        ref = self.implementations["reference"]
        if not ref.not_supported_reasons(tensors):
            return ref
        raise RuntimeError(f"{self.op}: no implementation can take these inputs ({' | '.join(passed)})")


TABLES: Dict[str, OpTable] = {}


def register(op: str, implementations: Sequence[Implementation]) -> OpTable:
    """Declare ``op``'s implementations (once, at the import of the op's module)."""
    if op in TABLES:
        raise ValueError(f"op: {op!r} is already registered")
    table = TABLES[op] = OpTable(op, implementations)
    return table


def reference(op: str, needs: Needs = _no_needs) -> Implementation:
    """The plain-PyTorch implementation: any device and floating dtype, the source of truth."""
    return Implementation(op, "reference", ("cpu", "cuda", "meta"), FLOATS, None, True, "any input", needs)


def extension(op: str, backend: str, dtypes: Tuple[torch.dtype, ...] = FLOATS, loader: Optional[Callable] = None,
              layout: str = "strided (made contiguous)", needs: Needs = _no_needs) -> Implementation:
    """An implementation in pynas._C: ``backend`` 'cpu' (validated by CI) or 'cuda' (not yet validated)."""
    from .. import _ext

    devices = ("cpu",) if backend == "cpu" else ("cuda",)
    return Implementation(op, backend, devices, dtypes, loader or _ext.get, backend == "cpu", layout, needs)


def triton(op: str, module: str, dtypes: Tuple[torch.dtype, ...] = FLOATS, loader: Optional[Callable] = None,
           layout: str = "strided (made contiguous)", needs: Needs = _no_needs) -> Implementation:
    """An implementation in kernels/<module>.py: GPU tensors, or CPU tensors under TRITON_INTERPRET=1."""
    from .._triton import kernel_module

    return Implementation(op, "triton", ("cuda", "cpu"), dtypes, loader or functools.partial(kernel_module, module),
                          False, layout, needs)


def every_backend(op: str) -> List[Implementation]:
    """The reference, the C++ and CUDA kernels of pynas._C and the Triton kernels of kernels/<op>.py, each
    taking every floating dtype: the table of an elementwise op whose kernels all share one API."""
    return [reference(op), extension(op, "cpu"), extension(op, "cuda"), triton(op, op)]


def table_report() -> List[str]:
    """The tables as text lines: per op and implementation, whether it runs here (else why not), whether ``auto``
    takes it on a GPU, its devices, dtypes and what it needs of its inputs."""
    lines = []
    for op in sorted(TABLES):
        lines.append(f"{op}:")
        lines.append(f"  {'backend':<10} {'here':<5} {'gpu auto':<9} {'devices':<9} {'dtypes':<33} needs")
        for impl in TABLES[op]:
            why = impl.unavailable_reason()
            dtypes = ",".join(_dtype_name(d) for d in impl.dtypes)
            devices = ",".join(d for d in impl.devices if d != "meta")
            gpu_auto = "-" if "cuda" not in impl.devices else "yes" if impl.auto_reason("cuda") is None else "no*"
            lines.append(f"  {impl.backend:<10} {'yes' if why is None else 'no':<5} {gpu_auto:<9} {devices:<9} "
                         f"{dtypes:<33} {impl.layout}")
            if why:
                lines.append(f"  {'':<10} why not here: {why}")
    lines.append("  * not yet validated on a GPU (benchmarks/gpu_check.sh): auto passes over it on GPU tensors; "
                 "naming its backend, or PYNAS_FUSED_GPU_AUTO=1, runs it")
    return lines
