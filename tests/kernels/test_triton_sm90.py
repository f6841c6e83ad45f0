"""Every Triton launch pynas makes compiles for the GPU the project's check runs on (sm_90: H100/H200).

The interpreter (how CI runs the kernels) is lenient where Triton's compiler is not, so the Triton tests are
run once more under tests/kernels/triton_launch_recorder.py, which records each distinct specialisation launched,
and tests/kernels/triton_sm90_compile.py compiles each with the real compiler down to a cubin (ptxas), with no GPU.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
TRITON_TESTS = ["ops/test_cnn_edge_triton.py", "ops/test_mixed_sum.py", "ops/test_multi_tensor_gpu.py",
                "ops/test_rnn_mix_triton.py", "ops/test_partial_channel.py", "ops/test_rnn_path.py",
                "ops/test_linear_nll.py"]
#: Shared memory one block can use on sm_90 (227 KiB); a kernel that asks for more fails at launch.
SM90_MAX_SHARED = 227 * 1024

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is not None
                       and importlib.util.find_spec("triton.backends.nvidia") is None,
                       reason="this triton has no NVIDIA backend"),
]


def test_every_recorded_launch_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.jsonl"
    result = tmp_path / "result.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYNAS_TRITON_LAUNCHES=str(launches),
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    rec = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-p", "triton_launch_recorder", "-k", "triton or Triton",
                          *[os.path.join(TESTS, f) for f in TRITON_TESTS]],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-3000:]
    n_launches = sum(1 for line in launches.read_text().splitlines() if line.strip())
    assert n_launches > 50, f"only {n_launches} launches recorded"

    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))  # compile for real, not from a cache
    env.pop("TRITON_INTERPRET", None)
    comp = subprocess.run([sys.executable, os.path.join(HERE, "triton_sm90_compile.py"), str(launches),
                           str(result), "--arch", "90"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert result.exists(), comp.stdout[-3000:] + comp.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["failures"] == [], json.dumps(out["failures"][:3], indent=1)
    assert comp.returncode == 0, comp.stderr[-3000:]
    assert out["not_reached"] == [], "kernels no Triton test launches: " + ", ".join(out["not_reached"])
    assert out["compiled"] >= n_launches
    assert out["max_shared_bytes"] <= SM90_MAX_SHARED, out
