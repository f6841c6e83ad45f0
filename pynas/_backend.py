"""Backends: who can compute pynas's fused ops on this machine, and which one is in force.

Four backends exist: ``reference`` (plain PyTorch, the source of truth), ``cpu`` (the C++ extension),
``triton`` (kernels/ through Triton) and ``cuda`` (the CUDA part of the extension). This module says whether
each can run here and why not, and holds the choice in force (:func:`use_backend`, ``$PYNAS_BACKEND``, else
``auto``). What each backend's implementation of an op takes (devices, dtypes, layout), and the choice of
implementation per call, are the op's table in pynas.ops._dispatch.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from . import _ext
from ._triton import interpreting as _triton_interpret

NAMES: Tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
CHOICES: Tuple[str, ...] = ("auto",) + NAMES
ENV_VAR = "PYNAS_BACKEND"

def _cuda_runtime_reason() -> Optional[str]:
    # Called only when a backend's availability is asked for, never at import.
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _ext_reason() -> Optional[str]:
    return _ext.error()


def _cpu_reason() -> Optional[str]:
    return _ext_reason() or _ext.cpu_isa_error()


def _cuda_reason() -> Optional[str]:
    reason = _ext_reason()
    if reason:
        return reason
    if not _ext.build_info().get("cuda", False):
        return "pynas._C was built without its CUDA part (no CUDA toolkit at build time, or PYNAS_NO_CUDA=1)"
    return _cuda_runtime_reason()


def _triton_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'pynas[triton]')"
    if _triton_interpret():
        return None
    reason = _cuda_runtime_reason()
    if reason:
        return f"{reason} (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return None


@dataclass(frozen=True)
class Backend:
    """A backend and why it cannot run on this machine (what each op's implementations of it can take is in
    that op's table, pynas.ops._dispatch)."""

    name: str
    _reason: Callable[[], Optional[str]]

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (``None`` when it can)."""
        return self._reason()


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", lambda: None),
    "cpu": Backend("cpu", _cpu_reason),
    "triton": Backend("triton", _triton_reason),
    "cuda": Backend("cuda", _cuda_reason),
}


def backends() -> Dict[str, Optional[str]]:
    """Map each backend name to ``None`` when usable here, else the reason why not."""
    return {name: BACKENDS[name].unavailable_reason() for name in NAMES}


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in CHOICES:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return key


def _env_message(raw: str) -> str:
    return f"{ENV_VAR}={raw!r} is not a backend name; choose one of {', '.join(CHOICES)} (or unset it for auto)"


def env_error() -> Optional[str]:
    """Why $PYNAS_BACKEND is not a backend name, or None (unset and blank mean 'auto')."""
    raw = os.environ.get(ENV_VAR, "")
    return None if (raw.strip().lower() or "auto") in CHOICES else _env_message(raw)


def _env_default() -> str:
    raw = os.environ.get(ENV_VAR, "")
    key = raw.strip().lower() or "auto"
    if key not in CHOICES:
        raise ValueError(_env_message(raw))
    return key


_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pynas_backend", default=None)


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (the attribute is all it sets, which
    tests/ops/test_dispatch.py checks), without importing torch._dynamo, and with it triton, at pynas import."""
    fn._dynamo_marked_constant = True
    return fn


def _read_backend() -> str:
    name = _current.get()
    return name if name is not None else _env_default()


@_constant_under_compile
def _read_backend_at_trace() -> str:
    return _read_backend()


@_constant_under_compile
def _dynamo_traces_contextvars() -> bool:
    """Whether the torch.compile in use traces ContextVar.get (and guards on its value); torch 2.11, the GPU
    machine's, does not."""
    source = sys.modules.get("torch._dynamo.source")
    return source is not None and hasattr(source, "ContextVarGetSource")


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``$PYNAS_BACKEND``, else ``auto``.

    Under torch.compile the graph records the backend in force when it was traced; with a torch whose compiler
    cannot trace ContextVar.get, that graph is reused under another ``use_backend`` (compile again to change
    it) rather than breaking the graph at every fused op.
    """
    if torch.compiler.is_compiling() and not _dynamo_traces_contextvars():
        return _read_backend_at_trace()
    return _read_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run pynas ops under backend ``name`` ('auto', 'reference', 'cpu', 'triton', 'cuda').

    Naming a backend that cannot run here raises RuntimeError with its reason.

    The choice is held in a :class:`contextvars.ContextVar`, so it covers this thread (and asyncio tasks
    created inside the block, which copy the context), not threads started inside the block: a plain
    ``threading.Thread`` (or a worker of a thread pool, or of a DataLoader) starts from an empty context
    and runs under ``$PYNAS_BACKEND`` (else ``auto``). To carry the choice into a thread, start it with
    the block's context, ``threading.Thread(target=contextvars.copy_context().run, args=(fn,))``, or
    enter ``use_backend`` inside the thread.
    """
    key = _check_name(name)
    if key != "auto":
        why = BACKENDS[key].unavailable_reason()
        if why:
            raise RuntimeError(f"backend {key!r} is not usable: {why}")
    token = _current.set(key)
    try:
        yield key
    finally:
        _current.reset(token)


#: Whether ``auto`` takes every GPU implementation, validated on a card or not (``PYNAS_FUSED_GPU_AUTO=1``). Off,
#: ``auto`` takes on GPU tensors only the implementations whose ``validated`` flag is set in their op's table
#: (pynas.ops._dispatch), set once benchmarks/gpu_check.sh has passed them on a real card; naming the 'cuda' or
#: 'triton' backend runs them regardless.
GPU_FUSED_AUTO = os.environ.get("PYNAS_FUSED_GPU_AUTO", "0") == "1"
