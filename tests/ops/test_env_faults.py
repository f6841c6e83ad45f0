"""Bad environment variables fail loudly, naming what is wrong.

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

import pynas

CPU_OK = pynas.backends()["cpu"] is None


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
