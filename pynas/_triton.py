"""Lazy access to the Triton kernels, and whether they are interpreted (the top-level ``kernels/`` folder, installed as ``pynas.kernels``).

An install maps ``kernels/`` to ``pynas.kernels``; a source checkout used without installing (or one
whose own folder shadows the editable install, as ``python -m`` from the checkout's root does) has no
such mapping, so the checkout's ``kernels/`` folder is loaded under that name instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType


def interpreting() -> bool:
    """Whether Triton runs its kernels through the interpreter (``TRITON_INTERPRET`` set, not 0): on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_from_checkout() -> ModuleType:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ModuleNotFoundError("pynas.kernels is not installed and no kernels/ folder is beside pynas/")
    spec = importlib.util.spec_from_file_location("pynas.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pynas.kernels"] = module
    spec.loader.exec_module(module)
    return module


def kernel_module(name: str) -> ModuleType:
    """``pynas.kernels.<name>`` (imports triton)."""
    if "pynas.kernels" not in sys.modules:
        try:
            importlib.import_module("pynas.kernels")
        except ModuleNotFoundError as exc:
            if exc.name not in ("pynas.kernels",):
                raise
            _load_from_checkout()
    return importlib.import_module(f"pynas.kernels.{name}")
