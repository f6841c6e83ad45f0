"""``python -m pynas.info``: the backends, each op's table of implementations, and the build facts.

A bad ``$PYNAS_BACKEND`` or ``$PYNAS_CPU_ISA`` is reported as a line of the output (the rest of the report
still prints) and the exit status stays 0: this is a diagnostic; the pynas ops themselves raise.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _backend, _ext
from .ops import _dispatch


def report() -> str:
    lines = [f"pynas {__version__}  (python {platform.python_version()}, torch {torch.__version__})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}   TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    except Exception as exc:  # triton is optional
        lines.append(f"triton: not importable ({type(exc).__name__})")
    env = f"{_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR, '')!r}"
    env_why = _backend.env_error()
    if env_why is None:
        lines.append(f"selected backend: {_backend.current_backend()}  ({env})")
    else:  # reported, not raised: the rest of the report still helps (pynas ops raise ValueError until fixed)
        lines.append(f"selected backend: none: {env_why}; pynas ops raise ValueError until it is fixed")
    lines.append("")
    lines.append(f"{'backend':<10} {'usable':<7} reason")
    for name, why in _backend.backends().items():
        lines.append(f"{name:<10} {'yes' if why is None else 'no':<7} {why or ''}")
    lines.append("")
    gpu_auto = "every GPU implementation (PYNAS_FUSED_GPU_AUTO=1)" if _backend.GPU_FUSED_AUTO else \
        "the GPU-validated implementations only"
    lines.append(f"implementations per op (auto takes, on a GPU, {gpu_auto}):")
    lines += _dispatch.table_report()
    lines.append("")
    info = _ext.build_info()
    if info:
        lines.append("extension pynas._C:")
        for key in sorted(info):
            lines.append(f"  {key}: {info[key]}")
        isa_env = f"{_ext.CPU_ISA_VAR}={os.environ.get(_ext.CPU_ISA_VAR, '')!r}"
        isa_why = _ext.cpu_isa_error()
        if isa_why is not None:
            lines.append(f"  cpu_isa: unusable: {isa_why}")
        elif hasattr(_ext.load(), "cpu_isa"):
            lines.append(f"  cpu_isa: {_ext.load().cpu_isa()}  ({isa_env})")
    else:
        lines.append(f"extension pynas._C: unavailable ({_ext.error()})")
    lines.append(f"torch threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
