"""Build of pynas: the Python package, plus the C++/CUDA extension ``pynas._C`` when torch is present.

Static metadata lives in pyproject.toml; this file decides what to compile.

    pip install --no-build-isolation -e ".[test]"    # torch must be installed first

Environment:
    PYNAS_NO_EXT=1          pure-Python install (no pynas._C)
    PYNAS_NO_CUDA=1         C++ CPU kernels only, even where a CUDA toolkit is found
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0", so no GPU is needed)
    CUDA_HOME               CUDA toolkit to use (default: found from the nvcc on PATH)
    MAX_JOBS                parallel compile jobs (used when ninja is installed; else serial)
    NVCC_THREADS            threads of one nvcc run, one GPU architecture each (default 2)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants relative source paths
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _files(pattern):
    """Paths relative to the repository (as setuptools wants them) of the files matching pattern."""
    return [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]


def _say(msg):
    print(f"pynas setup: {msg}", file=sys.stderr)


def _nvcc_behind_wrapper(path, depth=0):
    """The real nvcc behind `path`: follows symlinks, and shell scripts that `exec` another nvcc."""
    path = os.path.realpath(path)
    if depth > 4:
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return path
    if not head.startswith(b"#!"):
        return path  # a binary: the real one
    match = re.search(rb"""exec\s+["']?([^\s"']*nvcc)\b""", head)
    if match is None:
        return path
    target = os.fsdecode(match.group(1))
    if not os.path.isabs(target):
        target = shutil.which(target) or target
    if not os.path.isfile(target) or os.path.realpath(target) == path:
        return path
    return _nvcc_behind_wrapper(target, depth + 1)


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH if set; else the toolkit of the nvcc on PATH (through wrappers); else
    /usr/local/cuda. None if there is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = os.path.dirname(os.path.dirname(_nvcc_behind_wrapper(nvcc)))
        if _is_cuda_home(home):
            return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_cuda_home(home):
            return home
    return None


def nvcc_version(cuda_home):
    """(major, minor) of CUDA_HOME/bin/nvcc, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvidia_wheel_include_dirs(cuda_major):
    """Include dirs of the nvidia-* pip wheels that torch's CUDA wheels depend on (cublas, cusparse, ...
    headers that a bare toolkit may lack). nvidia/cu<major>/include first."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    dirs = []
    for root in roots:
        preferred = os.path.join(root, f"cu{cuda_major}", "include")
        found = sorted(glob.glob(os.path.join(root, "*", "include")))
        for d in ([preferred] if os.path.isdir(preferred) else []) + found:
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def extension_modules():
    """([extension], cmdclass), or ([], {}) for a pure-Python install."""
    if _flag("PYNAS_NO_EXT"):
        _say("PYNAS_NO_EXT=1: building the pure-Python package without pynas._C")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported: find the toolkit first.
    cuda_home = None if _flag("PYNAS_NO_CUDA") else find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        import torch.utils.cpp_extension as cpp_ext
    except ImportError:
        _say("WARNING: torch is not importable, so pynas._C (the C++/CUDA kernels) is NOT built; pynas "
             "will use its other backends. Install torch first, then reinstall with "
             "`pip install --no-build-isolation .` (build isolation hides the installed torch).")
        return [], {}
    cpp_ext.CUDA_HOME = cuda_home  # in case the module was imported before we set the variable

    with_cuda = False
    if _flag("PYNAS_NO_CUDA"):
        _say("PYNAS_NO_CUDA=1: building the CPU kernels only")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: building the CPU kernels only")
    elif cuda_home is None:
        _say("no CUDA toolkit found (set CUDA_HOME): building the CPU kernels only")
    else:
        found = nvcc_version(cuda_home)
        if found is None:
            _say(f"cannot run {cuda_home}/bin/nvcc: building the CPU kernels only")
        elif str(found[0]) != torch.version.cuda.split(".")[0]:
            _say(f"WARNING: CUDA toolkit {found[0]}.{found[1]} at {cuda_home} does not match torch's CUDA "
                 f"{torch.version.cuda}: building the CPU kernels only")
        else:
            with_cuda = True

    sources = _files(f"{CSRC}/*.cpp") + _files(f"{CSRC}/cpu/*.cpp")  # bindings.cpp, rnn_cell.cpp, kernels
    include_dirs = [os.path.join(ROOT, CSRC, "include")]
    # -g0: debug info (from Python's default -g) would be 80% of the binary: 11.7 MB instead of 2.3 MB.
    cxx = ["-O3", "-g0"] + os.environ.get("PYNAS_EXTRA_CXX", "").split() + [ f'-DPYNAS_TORCH_VERSION="{torch.__version__}"']
    nvcc = ["-O3"]
    link = []
    # at::parallel_for is inline: it only runs in parallel where this code is compiled with OpenMP,
    # as torch's own CPU kernels are.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it makes the -gencode flags
        sources += _files(f"{CSRC}/cuda/*.cu")
        cxx += ["-DPYNAS_WITH_CUDA", f'-DPYNAS_CUDA_ARCHS="{archs}"']
        # The toolkit's own headers first; the wheels' only fill what the toolkit lacks.
        include_dirs += [os.path.join(cuda_home, "include")] + nvidia_wheel_include_dirs(
            torch.version.cuda.split(".")[0])
        # nvcc compiles the archs of one file in parallel.
        nvcc.append(f"--threads={os.environ.get('NVCC_THREADS', '2')}")
        _say(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs})")
        make = cpp_ext.CUDAExtension
    else:
        make = cpp_ext.CppExtension
    ext = make(
        name="pynas._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else cxx,
        extra_link_args=link,
        depends=_files(f"{CSRC}/include/pynas/*.h"),
    )
    return [ext], {"build_ext": cpp_ext.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["pynas", "pynas.*"]) + ["pynas.kernels"],
    # The Triton kernels sit at the top of the repository (kernels/) and install as pynas.kernels.
    package_dir={"pynas.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
