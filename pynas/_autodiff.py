"""Higher-order autodiff around pynas's kernels: exact, or through the reference.

pynas's kernels compute a first derivative fast and nothing more. Two things need more:

- A backward run with ``create_graph=True`` (a Hessian-vector product, ``torch.autograd.functional.hessian``,
  the exact hypergradient): each fused autograd node then computes its backward through differentiable
  operations instead, by recomputing its forward through the plain-PyTorch reference on the saved inputs and
  differentiating that (:func:`grad_through`). The result is exact to all orders; the kernels stay the path
  of every ordinary backward.
- ``torch.func`` transforms (grad, vmap, jvp, jacrev, jacfwd, hessian) and forward-mode AD
  (``torch.autograd.forward_ad``): the kernels cannot see through functorch's wrapped or dual tensors, so
  under them every pynas op and fused path takes the reference path (:func:`under_transform`), which
  composes with every transform.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad


def under_transform() -> bool:
    """Whether a torch.func transform or a forward-AD dual level is active (cheap: no tensor is touched)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0


def grad_through(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                 needs: Sequence[bool], grad_out: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """``d <fn(*inputs), grad_out> / d inputs[i]`` for each i with ``needs[i]``, as a differentiable graph.

    ``inputs`` are the saved inputs of a fused node (their autograd history intact), ``fn`` the node's
    reference forward. Inputs not needed get None; a needed input ``fn`` does not use gets zeros.
    """
    wrt = [i for i, n in enumerate(needs) if n]
    grads: List[Optional[torch.Tensor]] = [None] * len(inputs)
    if not wrt:
        return grads
    with torch.enable_grad():
        out = fn(*inputs)
        found = torch.autograd.grad(out, [inputs[i] for i in wrt], grad_out, create_graph=True,
                                    allow_unused=True)
    for i, g in zip(wrt, found):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads
