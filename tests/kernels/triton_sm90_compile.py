"""Compile recorded Triton launches for an NVIDIA GPU with Triton's real compiler, with no GPU present.

    python tests/kernels/triton_sm90_compile.py LAUNCHES.jsonl RESULT.json [--arch 90]

LAUNCHES holds the launches that tests/kernels/triton_launch_recorder.py recorded under the interpreter. Each is
compiled (TTIR -> TTGIR -> LLVM -> PTX -> cubin through ptxas) as Triton's JIT would for a launch with those
argument types, alignments, integer values and constexprs, for the target ``cuda:<arch>``; a launch that
passes ``USE_INT64=False`` is also compiled with ``USE_INT64=True`` (the int64-offset variant that only
tensors past 2**31 elements reach). The interpreter accepts code that the compiler rejects (types, shapes,
constexpr use), so this is the CPU's check that the kernels build for the GPU. RESULT (JSON): the number of
compiles, the failures with their errors, the ``*_kernel`` functions of the kernel modules that no launch
reached, and the largest shared-memory use of a compiled kernel.

Runs in its own process: ``triton.jit`` makes interpreted functions when TRITON_INTERPRET is set at import.
"""
import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pynas._triton import kernel_module  # noqa: E402


class CompileOnlyDriver(DriverBase):
    """Names the target GPU to Triton's JIT; launches nothing (``warmup`` only compiles)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise NotImplementedError("compile only")

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError("compile only")

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile only")


def decode(spec):
    """A stand-in launch argument: a small CPU tensor of the dtype, at the recorded 16-byte alignment."""
    if spec is None:
        return None
    (kind, value), = ((k, v) for k, v in spec.items() if k != "aligned")
    if kind == "tensor":
        dtype = getattr(torch, value)
        buf = torch.zeros(64, dtype=dtype)  # the allocator aligns to >= 64 bytes
        return buf if spec["aligned"] else buf[1:]  # itemsize < 16: one element off is misaligned
    if kind == "tl":
        return tl.dtype(value)
    return value  # bool, int, float


def variants(record):
    yield record["kwargs"]
    if record["kwargs"].get("USE_INT64") == {"bool": False}:
        yield {**record["kwargs"], "USE_INT64": {"bool": True}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches")
    parser.add_argument("result")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    args = parser.parse_args(argv)

    driver.set_active(CompileOnlyDriver(args.arch))
    with open(args.launches) as f:
        records = [json.loads(line) for line in f if line.strip()]
    modules = {r["module"].rsplit(".", 1)[-1] for r in records} | {"mixed_sum", "cnn_edge", "multi_tensor",
                                                                  "rnn_mix", "rnn_path", "linear_nll"}
    kernels = {}
    for name in sorted(modules):
        mod = kernel_module(name)
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and attr.endswith("_kernel"):
                kernels[f"{name}.{attr}"] = obj

    compiled, failures, reached, max_shared = 0, [], set(), (0, None)
    for record in records:
        key = f"{record['module'].rsplit('.', 1)[-1]}.{record['kernel']}"
        if key not in kernels:
            failures.append({"kernel": key, "error": "not a *_kernel JIT function of its module"})
            continue
        launch_args = [decode(a) for a in record["args"]]
        for kw in variants(record):
            try:
                k = kernels[key].warmup(*launch_args, grid=(1,), **{n: decode(v) for n, v in kw.items()})
                assert k is not None and "cubin" in k.asm, "no cubin produced"
            except Exception as exc:  # noqa: BLE001  (every failure is reported, the run goes on)
                failures.append({"kernel": key, "kwargs": kw, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                continue
            compiled += 1
            reached.add(key)
            if k.metadata.shared > max_shared[0]:
                max_shared = (k.metadata.shared, key)
    result = {"triton": triton.__version__, "arch": args.arch, "launches": len(records), "compiled": compiled,
              "failures": failures, "not_reached": sorted(set(kernels) - reached),
              "max_shared_bytes": max_shared[0], "max_shared_kernel": max_shared[1]}
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}), f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
