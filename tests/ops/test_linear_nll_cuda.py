"""linear_nll on CUDA tensors: the CUDA rows kernel (csrc/cuda/linear_nll.cu) and the Triton one
(kernels/linear_nll.py) against the plain-PyTorch reference on the same GPU, loss and gradients, in float64,
float32, float16 and bfloat16, at sizes with several chunks. Needs a GPU (benchmarks/gpu_check.sh runs it with
-m gpu)."""
from __future__ import annotations

import pytest
import torch

import pynas
from pynas.ops import linear_nll as ln
from pynas.ops.linear_nll import linear_nll, linear_nll_ref

pytestmark = pytest.mark.gpu

_HAS_GPU = torch.cuda.is_available()
GPU_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        not _HAS_GPU or pynas.backends()[name] is not None,
        reason=f"{name}: {'no CUDA device' if not _HAS_GPU else pynas.backends()[name]}"))
    for name in ("cuda", "triton")
]
TOL = {torch.float64: (1e-11, 1e-13), torch.float32: (2e-5, 2e-6), torch.float16: (2e-2, 2e-3),
       torch.bfloat16: (5e-2, 1e-2)}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("N,D,V", [(3, 8, 5), (560, 64, 10000)])
def test_matches_the_reference_on_the_gpu(backend, dtype, N, D, V, monkeypatch):
    monkeypatch.setattr(ln, "CHUNK_LOGITS", max(V, (N // 3) * V))  # at least 3 chunks where N allows
    g = torch.Generator(device="cuda").manual_seed(N)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (0.3 * torch.randn(V, D, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    b = (0.5 * torch.randn(V, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    rtol, atol = TOL[dtype]
    wide = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    want = linear_nll_ref(*wide, t)
    want_g = torch.autograd.grad(want, wide)
    got = linear_nll(h, w, b, t, backend=backend)
    got_g = torch.autograd.grad(got, (h, w, b))
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_out_of_range_target_gives_nan_on_the_gpu(backend):
    h, w = torch.randn(4, 3, device="cuda"), torch.randn(6, 3, device="cuda")
    got = linear_nll(h, w, None, torch.tensor([0, 1, 6, 2], device="cuda"), backend=backend)
    assert torch.isnan(got)
