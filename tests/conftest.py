"""Shared fixtures and the ``gpu`` marker.

Tests live in folders by layer: ``ops/`` (each fused op against its reference, per backend, and the dispatch),
``kernels/`` (the Triton kernels compiled for the GPU), ``cnn/`` and ``rnn/`` (the search spaces),
``strategies/`` (the search methods' architecture steps), ``search/`` (the loop, checkpoints, resume),
``compat/`` and ``cli/``. A module whose tests run on a CUDA device when there is one carries the ``gpu``
marker; ``benchmarks/gpu_check.sh`` runs ``pytest -m gpu``, and collection fails on a test that names CUDA
or a GPU in its id but lacks the marker, so no GPU test is left out of the check.
"""
import os
import re

import pytest
import torch

import pynas

# Keep CPU tests deterministic and the thread count as CI has it.
torch.set_num_threads(int(os.environ.get("PYNAS_TEST_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which stalls badly on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def usable_backends():
    return [name for name, why in pynas.backends().items() if why is None]


def backend_devices():
    """(backend, device) pairs that can run here; CUDA-only pairs appear only with a GPU."""
    pairs = []
    for name in usable_backends():
        if name == "reference":
            pairs.append((name, "cpu"))
            if torch.cuda.is_available():
                pairs.append((name, "cuda"))
        elif name == "cpu":
            pairs.append((name, "cpu"))
        elif name == "cuda":
            pairs.append((name, "cuda"))
        elif name == "triton":
            pairs.append((name, "cuda" if torch.cuda.is_available() else "cpu"))
    return pairs


def pytest_report_header(config):
    return "pynas backends: " + ", ".join(f"{k}={'ok' if v is None else 'no'}" for k, v in pynas.backends().items())


def gpu_backend_params():
    """pytest params 'auto', 'cuda', 'triton' for CUDA tensors, each skipped with its reason where it cannot run."""
    out = []
    for name in ("auto", "cuda", "triton"):
        why = None if torch.cuda.is_available() else "no CUDA device"
        if why is None and name != "auto":
            why = pynas.backends()[name]
        out.append(pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"{name}: {why}")))
    return out


_GPU_WORDS = re.compile(r"cuda|gpu", re.IGNORECASE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device when one is present (benchmarks/gpu_check.sh "
                                       "selects these with -m gpu)")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if _GPU_WORDS.search(item.nodeid.split("::", 1)[-1]) and item.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError("tests that name CUDA or a GPU need the gpu marker (pytestmark = "
                                "pytest.mark.gpu) so that benchmarks/gpu_check.sh runs them: " + ", ".join(unmarked[:10]))
