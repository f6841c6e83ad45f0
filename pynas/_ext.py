"""Lazy access to the compiled extension ``pynas._C``.

Importing pynas never imports the extension: it is loaded on first use, and a
missing or broken build becomes a recorded reason instead of an ImportError.
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """Return ``pynas._C`` or ``None`` if it cannot be imported (see :func:`error`)."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)

                _module = importlib.import_module("pynas._C")
            except Exception as exc:  # ImportError, OSError (bad .so), undefined symbols
                _error = f"pynas._C could not be imported: {type(exc).__name__}: {exc}"
            _tried = True
    return _module


def error() -> Optional[str]:
    """Why the extension is unusable, or ``None`` when it loaded."""
    load()
    return _error


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
