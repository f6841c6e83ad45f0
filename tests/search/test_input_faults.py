"""Bad inputs and bad settings fail loudly, naming what is wrong.

* A MixedOp's (or a Cell's) ``weights`` of the wrong count, shape, dtype or device: ValueError naming
  ``weights`` with the expected and received counts, on the fused path (the C++ edge) and the module path.
* ``PYNAS_CPU_ISA`` other than auto/base/avx2: the cpu backend is unusable with that reason (``import pynas``
  still works, 'auto' falls back and warns, naming the backend raises).
* ``PYNAS_BACKEND`` that is no backend name: ``import pynas`` works, an op raises ValueError naming
  ``PYNAS_BACKEND``, ``python -m pynas.info`` reports it as a line and exits 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pynas
from pynas.cnn.model_search import Cell, MixedOp
from pynas.cnn.operations import PRIMITIVES

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_OK = pynas.backends()["cpu"] is None
# the module path everywhere; the fused C++ edge where the extension is built
PATHS = ["reference"] + (["cpu"] if CPU_OK else [])


def _edge(C=4, stride=1):
    torch.manual_seed(0)
    return MixedOp(C, stride).train(), torch.randn(2, C, 6, 6)


def _w(n, *, dtype=torch.float32, device="cpu"):
    return torch.softmax(torch.randn(n, dtype=torch.float64), 0).to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("n", [len(PRIMITIVES) - 1, len(PRIMITIVES) + 1, 1, 0], ids=lambda n: f"{n}-weights")
def test_mixed_op_wrong_weight_count(backend, n):
    """7 weights raised a bare IndexError on the fused path (index out of range in self) and a message about
    6 of 7 live candidates on the module path; a 9th weight was silently ignored on both."""
    op, x = _edge()
    with pynas.use_backend(backend):
        with pytest.raises(ValueError, match=rf"^weights: expected {len(PRIMITIVES)} weights .* got {n} "):
            op(x, _w(n))


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("case", ["2-D", "scalar", "int64", "bool", "meta-device"])
def test_mixed_op_weights_shape_dtype_device(backend, case):
    op, x = _edge()
    n = len(PRIMITIVES)
    weights = {
        "2-D": _w(n).reshape(1, n),
        "scalar": torch.tensor(1.0),
        "int64": torch.ones(n, dtype=torch.int64),
        "bool": torch.ones(n, dtype=torch.bool),
        "meta-device": torch.ones(n, device="meta"),
    }[case]
    with pynas.use_backend(backend):
        with pytest.raises(ValueError, match=rf"^weights: expected {n} weights \(a 1-D floating tensor on cpu"):
            op(x, weights)


def test_mixed_op_weights_not_a_tensor():
    op, x = _edge()
    with pytest.raises(TypeError, match="^weights: expected a tensor"):
        op(x, [1.0 / len(PRIMITIVES)] * len(PRIMITIVES))


@pytest.mark.parametrize("backend", PATHS)
def test_mixed_op_right_weights_still_run(backend):
    """The check passes the right weights (float64 weights with float32 x included: any floating dtype)."""
    op, x = _edge()
    with pynas.use_backend(backend):
        assert op(x, _w(len(PRIMITIVES))).shape == x.shape
        assert op(x, _w(len(PRIMITIVES), dtype=torch.float64)).shape == x.shape


@pytest.mark.parametrize("backend", PATHS)
def test_mixed_op_custom_primitives_count(backend):
    prims = ["none", "skip_connect", "avg_pool_3x3"]
    torch.manual_seed(0)
    op, x = MixedOp(4, 1, prims).train(), torch.randn(2, 4, 6, 6)
    with pynas.use_backend(backend):
        assert op(x, _w(3)).shape == x.shape
        with pytest.raises(ValueError, match="^weights: expected 3 weights .* got 8 "):
            op(x, _w(8))


@pytest.mark.parametrize("rows", [13, 15])
def test_cell_wrong_edge_count(rows):
    """A cell of 4 steps has 14 edges: 13 rows raised IndexError, 15 silently ignored the last."""
    torch.manual_seed(0)
    cell = Cell(4, 4, 4, 4, 4, False, False).train()
    s0 = s1 = torch.randn(2, 4, 6, 6)
    w = torch.softmax(torch.randn(rows, len(PRIMITIVES)), -1)
    with pytest.raises(ValueError, match=rf"^weights: expected a 2-D tensor .* 14 rows, got \({rows}, 8\)"):
        cell(s0, s1, w)
    with pytest.raises(ValueError, match="^weights: expected 8 weights .* got 7 "):
        cell(s0, s1, torch.softmax(torch.randn(14, 7), -1))


def test_network_with_wrong_alphas():
    from pynas.cnn import Network

    torch.manual_seed(0)
    net = Network(4, 10, 1, steps=2, multiplier=2, stem_multiplier=1)
    x = torch.randn(2, 3, 8, 8)
    assert net(x).shape == (2, 10)
    for a in net.arch_parameters():  # (a single cell is a reduction cell)
        a.data = a.data[:, :7].clone()
    with pytest.raises(ValueError, match="^weights: expected 8 weights .* got 7 "):
        net(x)


# ---- environment variables ---------------------------------------------------------------------------------


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("PYNAS_BACKEND", "PYNAS_CPU_ISA")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=180)


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("value", ["garbage", "AVX2", "avx512", " base"])
def test_bad_cpu_isa_is_a_recorded_reason(value):
    """PYNAS_CPU_ISA=garbage was silently ignored (the C++ kernels only compare it with 'base')."""
    res = _run("""
        import warnings, torch, pynas
        why = pynas.backends()["cpu"]
        assert why is not None, "PYNAS_CPU_ISA=%r accepted" % __import__("os").environ["PYNAS_CPU_ISA"]
        assert "PYNAS_CPU_ISA" in why and "'auto', 'base', 'avx2'" in why, why
        s = torch.zeros(1, 2, 3)
        p = torch.zeros(1, 5)
        try:
            pynas.ops.rnn_mix(s, s, s, p, backend="cpu")
        except RuntimeError as exc:
            assert "PYNAS_CPU_ISA" in str(exc), exc
        else:
            raise AssertionError("the cpu backend ran")
        try:
            with pynas.use_backend("cpu"):
                pass
        except RuntimeError as exc:
            assert "PYNAS_CPU_ISA" in str(exc), exc
        else:
            raise AssertionError("use_backend('cpu') accepted")
        assert pynas.ops.rnn_mix(s, s, s, p).shape == (2, 3)  # auto: the reference
        print("ok")
    """, PYNAS_CPU_ISA=value)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert "RuntimeWarning: PYNAS_CPU_ISA=" in res.stderr  # said once, at first use


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("value", ["", "auto", "base", "avx2"])
def test_good_cpu_isa_is_applied(value):
    res = _run("""
        import os, pynas
        from pynas import _ext
        why = pynas.backends()["cpu"]
        value = os.environ["PYNAS_CPU_ISA"]
        if value == "avx2" and why is not None:
            assert "cannot be honoured" in why and "AVX2" in why, why  # a CPU without AVX2+FMA
            print("no-avx2")
        else:
            assert why is None, why
            isa = _ext.get().cpu_isa()
            assert isa == value or value in ("", "auto"), (value, isa)
            print(isa)
    """, PYNAS_CPU_ISA=value)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("base", "avx2", "no-avx2")
    assert "Warning" not in res.stderr


def test_bad_env_backend_import_and_op():
    """import pynas works; the first op raises ValueError naming PYNAS_BACKEND and the accepted names."""
    res = _run("""
        import torch
        import pynas
        s, p = torch.zeros(1, 2, 3), torch.zeros(1, 5)
        try:
            pynas.ops.rnn_mix(s, s, s, p)
        except ValueError as exc:
            msg = str(exc)
            assert "PYNAS_BACKEND='garbage'" in msg and "auto, reference, cpu, triton, cuda" in msg, msg
        else:
            raise AssertionError("ran under PYNAS_BACKEND=garbage")
        with pynas.use_backend("reference"):  # an explicit choice still works
            assert pynas.ops.rnn_mix(s, s, s, p).shape == (2, 3)
        assert pynas.ops.rnn_mix(s, s, s, p, backend="reference").shape == (2, 3)
        print("ok")
    """, PYNAS_BACKEND="garbage")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("value", ["", "  ", "CPU", " reference "])
def test_env_backend_blank_and_case(value):
    res = _run("import pynas; print(pynas.current_backend())", PYNAS_BACKEND=value)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (value.strip().lower() or "auto")


def test_info_reports_bad_env_backend_as_a_line():
    """python -m pynas.info printed a traceback; now one line names PYNAS_BACKEND and the accepted names,
    the rest of the report still prints, and the exit status is 0 (a diagnostic)."""
    full = {k: v for k, v in os.environ.items() if k not in ("PYNAS_BACKEND", "PYNAS_CPU_ISA")}
    full["PYNAS_BACKEND"] = "garbage"
    res = subprocess.run([sys.executable, "-m", "pynas.info"], capture_output=True, text=True, env=full,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "PYNAS_BACKEND" in ln]
    assert len(lines) == 1, res.stdout
    assert lines[0].startswith("selected backend: none: PYNAS_BACKEND='garbage'") and \
        "auto, reference, cpu, triton, cuda" in lines[0], lines[0]
    for name in ("reference", "cpu", "triton", "cuda"):
        assert any(ln.startswith(name) for ln in res.stdout.splitlines()), res.stdout
