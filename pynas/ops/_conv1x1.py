"""The 1x1 convolution as a batched matmul, forward and backward: what the GPU backends of the CNN edge use
for the pointwise convs of its candidates (cuBLAS serves them better than a hand-written kernel would)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def conv1x1(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``p[n] = w u[n]`` for u (N, Ci, H, W) and w (Co, Ci, 1, 1): p (N, Co, H, W) in u's dtype."""
    n, ci, h, wd = u.shape
    co = w.shape[0]
    return torch.matmul(w.detach().reshape(co, ci), u.detach().reshape(n, ci, h * wd)).view(n, co, h, wd)


def conv1x1_backward(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                     need_grad_w: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_u = w^T g, grad_w = sum_n g[n] u[n]^T)`` of :func:`conv1x1`; grad_w (shaped and typed like w) is
    None unless ``need_grad_w``."""
    n, ci, h, wd = u.shape
    co = w.shape[0]
    g3 = g.detach().reshape(n, co, h * wd)
    gu = torch.matmul(w.detach().reshape(co, ci).t(), g3).view(n, ci, h, wd)
    if not need_grad_w:
        return gu, None
    gw = torch.matmul(g3, u.detach().reshape(n, ci, h * wd).transpose(1, 2)).sum(0).view(co, ci, 1, 1).to(w.dtype)
    return gu, gw
