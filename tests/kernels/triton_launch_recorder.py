"""pytest plugin: records every Triton kernel launch made under ``TRITON_INTERPRET=1``.

Loaded with ``-p triton_launch_recorder`` (this folder on ``sys.path``) by tests/kernels/test_triton_sm90.py: the
interpreted Triton tests then double as the list of specialisations that pynas launches, written as JSON
lines to the file named by ``$PYNAS_TRITON_LAUNCHES`` when the session ends; tests/kernels/triton_sm90_compile.py
compiles each for a GPU. A launch is kept as Triton's JIT tells launches apart: the kernel, each pointer's
dtype and 16-byte alignment, the constexprs, and of a runtime integer only whether it is 1, a multiple of 16,
or neither (and whether it needs 64 bits), recorded as 1, 16 or 7 (2**31 + 7 / 2**32 for 64 bits).
"""
import inspect
import json
import os

import torch

_records = {}


def encode(value):
    """A launch argument as JSON data (tensors by dtype and alignment; the interpreter sees no other types)."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if value is None:
        return None
    raise TypeError(f"triton_launch_recorder: cannot record a launch argument of type {type(value).__name__}")


def specialisation(value: int) -> int:
    """A stand-in for runtime integer ``value`` that Triton's JIT specialises as it does ``value``."""
    wide = not -2**31 <= value < 2**31
    if value == 1:
        return 1
    if value % 16 == 0:
        return 2**32 if wide else 16
    return 2**31 + 7 if wide else 7


def _constexprs(fn):
    return {name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}


def pytest_configure(config):
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        const = _constexprs(self.fn)
        names = list(inspect.signature(self.fn).parameters)

        def arg(name, value):
            runtime_int = isinstance(value, int) and not isinstance(value, bool) and name not in const
            return encode(specialisation(value) if runtime_int else value)

        record = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                  "args": [arg(n, a) for n, a in zip(names, args)],
                  "kwargs": {k: arg(k, v) for k, v in sorted(kwargs.items())}}
        _records.setdefault(json.dumps(record, sort_keys=True), record)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PYNAS_TRITON_LAUNCHES")
    if path:
        with open(path, "w") as f:
            for key in sorted(_records):
                f.write(key + "\n")
