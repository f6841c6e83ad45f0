"""pynas: a custom-kernel accelerated engine for differentiable architecture search (DARTS).

Importing pynas compiles nothing and touches no GPU: the compiled extension and
the Triton kernels load on first use, and a missing one is a recorded reason
(see :func:`backends` and ``python -m pynas.info``).
"""
from ._backend import backends, current_backend, use_backend
from . import ops

__version__ = "0.1.0"

__all__ = ["backends", "current_backend", "use_backend", "ops", "accelerate", "deaccelerate", "accelerated",
           "Architect", "__version__"]

_LAZY = {"accelerate": "foreign", "deaccelerate": "foreign", "accelerated": "foreign", "Architect": "strategies.darts"}


def __getattr__(name):
    # pynas.accelerate and pynas.Architect load their modules on first use (import pynas stays light).
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pynas' has no attribute {name!r}")
