"""Backend table, selection, environment default, lean import."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pynas
from pynas import _backend
from pynas.ops._dispatch import TABLES

pytestmark = pytest.mark.gpu  # runs its CUDA cases on a GPU (benchmarks/gpu_check.sh: pytest -m gpu)


def test_backends_table():
    table = pynas.backends()
    assert list(table) == ["reference", "cpu", "triton", "cuda"]
    assert table["reference"] is None
    for name, why in table.items():
        assert why is None or (isinstance(why, str) and why)


def test_use_backend_context_and_nesting():
    before = pynas.current_backend()
    with pynas.use_backend("reference") as name:
        assert name == "reference" and pynas.current_backend() == "reference"
        with pynas.use_backend("auto"):
            assert pynas.current_backend() == "auto"
        assert pynas.current_backend() == "reference"
    assert pynas.current_backend() == before


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        with pynas.use_backend("fastest"):
            pass
    with pytest.raises(TypeError, match="backend"):
        with pynas.use_backend(3):
            pass


def test_unusable_backend_raises_its_reason():
    for name, why in pynas.backends().items():
        if why is not None:
            with pytest.raises(RuntimeError) as info:
                with pynas.use_backend(name):
                    pass
            assert why in str(info.value)


def test_auto_picks_fastest_usable_for_cpu_tensors():
    x = torch.ones(3)
    expected = "cpu" if pynas.backends()["cpu"] is None else "reference"
    assert TABLES["mixed_sum"].resolve([x], "auto").backend == expected


def test_device_not_supported_by_named_backend():
    if pynas.backends()["cpu"] is not None:
        pytest.skip("the C++ extension is not built")
    xs, w = [torch.ones(3, device="meta")], torch.ones(1, device="meta")
    with pytest.raises(RuntimeError, match="device 'meta'"):
        pynas.ops.mixed_sum(xs, w, backend="cpu")
    # auto falls back to the reference instead
    assert pynas.ops.mixed_sum(xs, w).device.type == "meta"


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=120)


def test_env_default_and_lean_import():
    res = _run("""
        import sys, torch
        import pynas
        assert "pynas._C" not in sys.modules, "import pynas loaded the extension"
        assert "triton" not in sys.modules, "import pynas imported triton"
        assert not torch.cuda.is_initialized()
        print(pynas.current_backend())
    """, PYNAS_BACKEND="reference")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"


def test_constant_marker_is_what_torch_sets():
    # pynas marks functions as torch.compiler.assume_constant_result does, without importing torch._dynamo.
    def f():
        return 0

    def g():
        return 0

    torch.compiler.assume_constant_result(f)
    _backend._constant_under_compile(g)
    assert vars(f) == vars(g) == {"_dynamo_marked_constant": True}
    assert _backend.current_backend.__dict__ == {}  # read at run time; only its helpers are constants
    assert _backend._read_backend_at_trace._dynamo_marked_constant is True
    assert _backend._dynamo_traces_contextvars._dynamo_marked_constant is True


@pytest.mark.parametrize("contextvars_traced", [True, False], ids=["contextvar-traced", "contextvar-constant"])
def test_backend_under_torch_compile(monkeypatch, contextvars_traced):
    # fullgraph: reading the backend never breaks the graph, whether or not this torch's compiler traces
    # ContextVar.get (2.11 does not: "constant" is its path, forced here on any torch).
    if contextvars_traced and not _backend._dynamo_traces_contextvars():
        importlib.import_module("torch._dynamo.source")  # what the check looks at
        if not _backend._dynamo_traces_contextvars():
            pytest.skip(f"torch {torch.__version__}'s compiler does not trace ContextVar.get")
    if not contextvars_traced:
        monkeypatch.setattr(_backend, "_dynamo_traces_contextvars", lambda: False)
    torch._dynamo.reset()
    names = {"cpu": 1.0, "reference": 2.0, "auto": 3.0}

    def f(x):
        return x + names[_backend.current_backend()]

    g = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with pynas.use_backend("cpu"):
        assert g(x).tolist() == [1.0, 1.0]
    with pynas.use_backend("reference"):
        # traced: the graph is guarded on the ContextVar and traced again; constant: the graph keeps 'cpu'
        assert g(x).tolist() == ([2.0, 2.0] if contextvars_traced else [1.0, 1.0])
    torch._dynamo.reset()


def test_missing_extension_is_a_recorded_reason():
    res = _run("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "pynas._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, pynas
        table = pynas.backends()
        assert table["reference"] is None
        assert "blocked for the test" in table["cpu"], table
        out = pynas.ops.mixed_sum([torch.ones(2), torch.ones(2)], torch.tensor([0.25, 0.5]))
        assert out.tolist() == [0.75, 0.75]
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_info_prints_table():
    res = subprocess.run([sys.executable, "-m", "pynas.info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in res.stdout


def test_bad_env_backend():
    res = _run("import pynas; pynas.current_backend()", PYNAS_BACKEND="nonsense")
    assert res.returncode != 0 and "ValueError: PYNAS_BACKEND='nonsense' is not a backend name" in res.stderr


def test_use_backend_does_not_reach_plain_threads():
    """The backend lives in a ContextVar: a thread started inside ``use_backend`` runs under the environment
    default (``auto`` here) unless it is started in a copy of the context (or enters use_backend itself).
    Asyncio tasks copy the context, so they inherit it."""
    import asyncio
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if os.environ.get("PYNAS_BACKEND", "").strip():
        pytest.skip("PYNAS_BACKEND is set")
    seen = {}

    def record(key):
        seen[key] = pynas.current_backend()

    with pynas.use_backend("reference"):
        plain = threading.Thread(target=record, args=("plain",))
        copied = threading.Thread(target=contextvars.copy_context().run, args=(record, "copied"))
        plain.start(), copied.start()
        plain.join(), copied.join()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(record, "pool").result()
            ctx = contextvars.copy_context()
            pool.submit(ctx.run, record, "pool-copied").result()

        async def task():
            record("asyncio")

        asyncio.run(task())
    assert seen == {"plain": "auto", "copied": "reference", "pool": "auto", "pool-copied": "reference",
                    "asyncio": "reference"}
    assert "copy_context" in pynas.use_backend.__doc__ and "thread" in pynas.use_backend.__doc__


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@pytest.mark.skipif(_truthy("PYNAS_NO_EXT"), reason="installed with PYNAS_NO_EXT=1")
def test_extension_was_built_with_everything_this_machine_allows():
    """The install built pynas._C, and its CUDA part wherever a toolkit and a CUDA torch are present,
    so the CUDA sources are compiled (and cannot rot) on every CI run, GPU or not."""
    import shutil

    from pynas import _ext

    assert pynas.backends()["cpu"] is None, pynas.backends()["cpu"]
    info = _ext.build_info()
    assert info["torch_version_built"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.version.cuda and (shutil.which("nvcc") or os.environ.get("CUDA_HOME")) and not _truthy("PYNAS_NO_CUDA"):
        assert info["cuda"] is True, info
        assert info["cuda_archs"]


def test_triton_kernels_load_from_a_checkout():
    """Without the install's mapping, the checkout's kernels/ folder is loaded as pynas.kernels."""
    res = _run("""
        import os, sys
        from pynas import _triton
        sys.modules.pop("pynas.kernels", None)
        mod = _triton._load_from_checkout()
        root = os.path.dirname(os.path.dirname(os.path.abspath(_triton.__file__)))
        assert os.path.samefile(mod.__file__, os.path.join(root, "kernels", "__init__.py")), mod.__file__
        assert hasattr(_triton.kernel_module("mixed_sum"), "mixed_sum_forward")
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# ---- the per-op tables of implementations ------------------------------------------------------------------------

def test_every_fused_op_has_a_table_with_a_reference():
    from pynas.ops import _dispatch

    assert set(_dispatch.TABLES) == {"mixed_sum", "rnn_mix", "cnn_edge", "rnn_cell", "multi_tensor", "sep_conv",
                                    "partial_channel", "rnn_path", "ess_cell", "linear_nll"}
    for op, table in _dispatch.TABLES.items():
        backends = [impl.backend for impl in table]
        assert backends == ["reference", "cpu", "cuda", "triton"], op
        for impl in table:
            assert impl.op == op
            # GPU implementations stay off under auto until a card has passed them
            assert impl.validated == (impl.backend in ("reference", "cpu")), (op, impl.backend)


def test_unvalidated_gpu_implementation_is_passed_over_by_auto(monkeypatch):
    from pynas.ops import _dispatch

    impl = _dispatch.TABLES["mixed_sum"]["cuda"]
    assert "not yet validated" in impl.auto_reason("cuda")
    assert _dispatch.TABLES["mixed_sum"]["cpu"].auto_reason("cpu") is None
    monkeypatch.setattr(_backend, "GPU_FUSED_AUTO", True)
    assert impl.auto_reason("cuda") is None


def test_resolve_returns_the_implementation_and_names_the_reasons():
    from pynas.ops import _dispatch

    table = _dispatch.TABLES["cnn_edge"]
    x = torch.ones(2, 3, 4, 4)
    assert table.resolve([x], "reference") is table["reference"]
    if pynas.backends()["cpu"] is None:
        assert table.resolve([x], "cpu") is table["cpu"]
        assert table.resolve([x], "auto") is table["cpu"]
        with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run cnn_edge: dtype torch.float16"):
            table.resolve([x.half()], "cpu")
        with pytest.raises(RuntimeError, match=r"x: expected a 4-D"):
            table.resolve([torch.ones(3, 4, 4)], "cpu")
        assert table.resolve([x.half()], "cpu", strict=False) is None
        # auto: the next candidate that can take them
        assert table.resolve([x.half()], "auto") is table["reference"]


def test_a_table_needs_a_reference_and_matching_ops():
    from pynas.ops import _dispatch

    cpu = _dispatch.extension("toy", "cpu")
    with pytest.raises(ValueError, match="implementations: .*'reference'"):
        _dispatch.OpTable("toy", [cpu])
    with pytest.raises(ValueError, match="implementations: 'toy'"):
        _dispatch.OpTable("other", [_dispatch.reference("other"), cpu])
    with pytest.raises(ValueError, match="op: 'mixed_sum' is already registered"):
        _dispatch.register("mixed_sum", _dispatch.every_backend("mixed_sum"))


def test_info_prints_each_ops_table():
    from pynas.info import report

    text = report()
    for op in ("mixed_sum", "rnn_mix", "cnn_edge", "rnn_cell", "multi_tensor"):
        assert f"\n{op}:\n" in text
    assert "not yet validated on a GPU" in text
