"""Micro benchmarks of the mixed_sum op on the CPU, under pytest-benchmark.

    pytest benchmarks/test_micro.py --benchmark-only           # time them
    pytest benchmarks/test_micro.py --benchmark-disable        # smoke: run each once
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-group-by=group   # per-pass tables

What is timed: ``out = sum_k w[k] * xs[k]`` with K=7 inputs of shape (16, 8, 32, 32), float32, on
the CPU, for
  reference       the plain-PyTorch reference ``pynas.ops.mixed_sum_ref`` (autograd by torch)
  pynas-<name>    ``pynas.ops.mixed_sum(xs, w, backend=<name>)`` for each backend of
                  ``pynas.backends()``; those that cannot run CPU tensors here are skipped with
                  their reason (the triton backend runs on the CPU only under TRITON_INTERPRET=1)
and three passes:
  fwd       a training forward (inputs require grad, so the graph is built)
  bwd       the backward alone: the graph is rebuilt in an untimed setup before every round
  fwd_bwd   forward then backward
Benchmark ids read ``mixed_sum/<pass>/<provider>``; the group is ``mixed_sum <pass>``.
Torch's CPU thread count is left as it is (set OMP_NUM_THREADS or torch.set_num_threads to fix
it); it is recorded in each benchmark's extra_info.

Requires pytest-benchmark (``pip install ".[bench]"``); without it the module is skipped. This file
is outside ``tests/``, so the CI command ``pytest tests`` does not collect it.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import pynas  # noqa: E402
from pynas.ops import mixed_sum, mixed_sum_ref  # noqa: E402

K = 7
SHAPE = (16, 8, 32, 32)
DTYPE = torch.float32
# rounds of the pedantic (backward) benchmarks; their setup rebuilds the graph every round
BWD_ROUNDS = int(os.environ.get("PYNAS_MICRO_BWD_ROUNDS", "30"))

PASSES = ("fwd", "bwd", "fwd_bwd")
PROVIDERS = ["reference"] + [f"pynas-{name}" for name in pynas.backends()]


def _op(provider: str):
    if provider == "reference":
        return mixed_sum_ref
    backend = provider[len("pynas-"):]

    def run(xs, w):
        return mixed_sum(xs, w, backend=backend)

    return run


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(SHAPE, generator=gen, dtype=DTYPE).requires_grad_() for _ in range(K)]
    w = torch.softmax(torch.randn(K, generator=gen, dtype=DTYPE), 0).requires_grad_()
    grad_out = torch.randn(SHAPE, generator=gen, dtype=DTYPE)
    return xs, w, grad_out


def _usable_op(provider: str):
    """The provider's op, after checking it runs on CPU tensors and agrees with the reference."""
    if provider != "reference":
        why = pynas.backends()[provider[len("pynas-"):]]
        if why is not None:
            pytest.skip(f"{provider}: {why}")
    op = _op(provider)
    xs, w, grad_out = _inputs(1)
    try:
        out = op(xs, w)
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. a GPU-only backend
        pytest.skip(f"{provider} cannot run CPU tensors: {exc}")
    grads = torch.autograd.grad(out, [*xs, w], grad_out)
    ref_out = mixed_sum_ref(xs, w)
    ref_grads = torch.autograd.grad(ref_out, [*xs, w], grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    return op


@pytest.mark.parametrize(
    "pass_, provider",
    [(p, prov) for p in PASSES for prov in PROVIDERS],
    ids=[f"mixed_sum/{p}/{prov}" for p in PASSES for prov in PROVIDERS],
)
def test_mixed_sum(benchmark, pass_, provider):
    op = _usable_op(provider)
    xs, w, grad_out = _inputs(0)
    inputs = [*xs, w]
    benchmark.group = f"mixed_sum {pass_}"
    benchmark.extra_info.update(
        op="mixed_sum", provider=provider, **{"pass": pass_}, K=K, shape=list(SHAPE),
        dtype=str(DTYPE).replace("torch.", ""), threads=torch.get_num_threads(), torch=torch.__version__,
    )

    if pass_ == "fwd":
        out = benchmark(op, xs, w)
        assert out.shape == SHAPE and out.requires_grad

    elif pass_ == "bwd":

        def setup():
            out = op(xs, w)  # a fresh graph each round, outside the timing
            return (out,), {}

        def backward(out):
            return torch.autograd.grad(out, inputs, grad_out)

        grads = benchmark.pedantic(backward, setup=setup, rounds=BWD_ROUNDS, iterations=1, warmup_rounds=2)
        assert len(grads) == K + 1 and grads[-1].shape == (K,)

    else:

        def forward_backward():
            return torch.autograd.grad(op(xs, w), inputs, grad_out)

        grads = benchmark(forward_backward)
        assert len(grads) == K + 1 and grads[-1].shape == (K,)
