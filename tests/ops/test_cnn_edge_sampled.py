"""The fused CNN edge over a subset of its candidates (GDAS's and random search's sampled paths: the unselected
candidates never computed, with GDAS's straight-through scalar terms) and PC-DARTS's partial-channel edge, on
every backend that runs here (C++ CPU; Triton under TRITON_INTERPRET=1 on the CPU, on cuda tensors with a GPU;
CUDA with a GPU), against the same modules run one by one (the reference backend): output, the gradients of x,
of the weights and of every conv weight, and the BatchNorm running statistics, on fresh random inputs."""
from __future__ import annotations

import copy

import pytest
import torch

import pynas
from pynas import _backend
from pynas.cnn import PRIMITIVES, MixedOp
from pynas.strategies.pcdarts import PartialMixedOp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in (("cpu", "triton") if DEVICE == "cpu" else ("cuda", "triton")) if pynas.backends().get(b) is None]
DTYPE = torch.float64

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]

SELECTIONS = [(k,) for k in range(len(PRIMITIVES))] + [(1, 4), (0, 2, 6), ()]


def _run(op, backend, x, w, *args):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    with _backend.use_backend(backend):
        out = op(x, w, *args)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)).to(out.device)
    params = [p for p in op.parameters()]
    if not out.requires_grad:  # only 'none' selected, no scalar terms: a constant zero output
        assert not out.any()
        return out, [None] * (2 + len(params)), [b.detach().clone() for b in op.buffers()]
    grads = torch.autograd.grad(out, [x, w] + params, g, allow_unused=True)
    return out.detach(), grads, [b.detach().clone() for b in op.buffers()]


def _same(a, b, what):
    if a is None and b is None:
        return
    if a is None or b is None:
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= 1e-10 * max(1.0, b.abs().max().item()), f"{what}: {err:.3g}"


def _check(make, backend, x, w, *args):
    op_ref = make()
    op = copy.deepcopy(op_ref)
    want = _run(op_ref, "reference", x, w, *args)
    got = _run(op, backend, x, w, *args)
    _same(got[0], want[0], "output")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        _same(a, b, f"grad {i}")
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        _same(a.double(), b.double(), f"buffer {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("straight", [False, True], ids=["plain", "straight_through"])
def test_sampled_edge_matches_the_modules(backend, stride, straight):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=DTYPE, device=DEVICE)
    w = torch.softmax(torch.randn(len(PRIMITIVES), dtype=DTYPE), 0).to(DEVICE)
    make = lambda: MixedOp(4, stride).to(device=DEVICE, dtype=DTYPE)  # noqa: E731
    for sel in SELECTIONS:
        _check(make, backend, x, w, sel, straight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_edge_runs_fused(backend, monkeypatch):
    """The selection's plan runs through the fused op (not the modules), and computes only what is selected."""
    from pynas.ops import cnn_edge

    calls = []
    real = cnn_edge.cnn_edge
    monkeypatch.setattr(cnn_edge, "cnn_edge", lambda plan, *a: calls.append(plan.spec) or real(plan, *a))
    op = MixedOp(4, 1).to(device=DEVICE, dtype=DTYPE)
    x = torch.randn(2, 4, 5, 5, dtype=DTYPE, device=DEVICE)
    w = torch.softmax(torch.randn(len(PRIMITIVES), dtype=DTYPE), 0).to(DEVICE)
    with _backend.use_backend(backend):
        op(x, w, (PRIMITIVES.index("sep_conv_3x3"),))
    (spec,) = calls
    assert len(spec.convs) == 1 and spec.convs[0].kind == "sep" and spec.max_column < 0 and spec.skip_column < 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [2, 4])
def test_partial_channel_edge_matches_the_modules(backend, stride, k):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6, dtype=DTYPE, device=DEVICE)
    w = torch.softmax(torch.randn(len(PRIMITIVES), dtype=DTYPE), 0).to(DEVICE)
    _check(lambda: PartialMixedOp(8, stride, k).to(device=DEVICE, dtype=DTYPE), backend, x, w)
