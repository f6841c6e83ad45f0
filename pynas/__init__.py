"""pynas: a custom-kernel accelerated engine for differentiable architecture search (DARTS).

Importing pynas compiles nothing and touches no GPU: the compiled extension and
the Triton kernels load on first use, and a missing one is a recorded reason
(see :func:`backends` and ``python -m pynas.info``).
"""
from ._backend import backends, current_backend, use_backend
from . import ops

__version__ = "0.1.0"

__all__ = ["backends", "current_backend", "use_backend", "ops", "__version__"]
