"""Lazy access to the compiled extension ``pynas._C``.

Importing pynas never imports the extension: it is loaded on first use, and a
missing or broken build becomes a recorded reason instead of an ImportError.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_isa_error: Optional[str] = None
_tried = False

#: The environment variable that picks the instruction set of the CPU kernels, read when the extension
#: loads (first use): unset, '' or 'auto' detect it; 'base' forces the baseline x86-64 loops; 'avx2' the
#: AVX2+FMA ones (the CPU must have them). Any other value makes the cpu backend unusable, with that reason.
CPU_ISA_VAR = "PYNAS_CPU_ISA"
CPU_ISA_CHOICES = ("auto", "base", "avx2")


def _apply_cpu_isa(mod: ModuleType) -> Optional[str]:
    """Check $PYNAS_CPU_ISA and apply it to the loaded extension; the reason it is unusable, else None."""
    raw = os.environ.get(CPU_ISA_VAR, "")
    if raw == "" or raw == "auto":
        return None
    if raw not in CPU_ISA_CHOICES:
        return (f"{CPU_ISA_VAR}={raw!r} is not one of {', '.join(repr(c) for c in CPU_ISA_CHOICES)} "
                f"(unset it for 'auto'; 'base' forces the baseline loops, 'avx2' the AVX2+FMA ones)")
    setter = getattr(mod, "set_cpu_isa", None)
    if setter is None:  # an older build: it reads PYNAS_CPU_ISA=base itself
        return None
    try:
        setter(raw)
    except Exception as exc:  # 'avx2' on a CPU (or a build) without it
        return f"{CPU_ISA_VAR}={raw!r} cannot be honoured: {exc}"
    return None


def load() -> Optional[ModuleType]:
    """Return ``pynas._C`` or ``None`` if it cannot be imported (see :func:`error`)."""
    global _module, _error, _isa_error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)

                _module = importlib.import_module("pynas._C")
            except Exception as exc:  # ImportError, OSError (bad .so), undefined symbols
                _error = f"pynas._C could not be imported: {type(exc).__name__}: {exc}"
            if _module is not None:
                _isa_error = _apply_cpu_isa(_module)
                if _isa_error is not None:
                    warnings.warn(f"{_isa_error}: the 'cpu' backend is unusable until it is fixed ('auto' runs "
                                  "the reference ops on CPU tensors instead)", RuntimeWarning, stacklevel=3)
            _tried = True
    return _module


def error() -> Optional[str]:
    """Why the extension is unusable, or ``None`` when it loaded."""
    load()
    return _error


def cpu_isa_error() -> Optional[str]:
    """Why $PYNAS_CPU_ISA makes the CPU kernels unusable (an unknown value, or 'avx2' without AVX2), or None."""
    load()
    return _isa_error


def get() -> ModuleType:
    """Return the extension or raise RuntimeError with the recorded reason."""
    mod = load()
    if mod is None:
        raise RuntimeError(_error)
    return mod


def build_info() -> dict:
    """Facts recorded by the build (empty dict when the extension is missing)."""
    mod = load()
    if mod is None:
        return {}
    try:
        return dict(mod.build_info())
    except Exception as exc:  # an old build without build_info
        return {"error": str(exc)}
