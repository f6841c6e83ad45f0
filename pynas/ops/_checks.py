"""Input checks shared by pynas's public ops: clear errors that name the argument."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

TensorSeq = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_tensor_list(value: TensorSeq, name: str) -> List[torch.Tensor]:
    """Accept a sequence of tensors or one tensor stacked on dim 0; return a list of K tensors."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(f"{name}: a stacked tensor needs a leading dim of K candidates, got a 0-dim tensor")
        items = list(value.unbind(0))
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"{name}: expected a sequence of tensors or a stacked tensor, got {type(value).__name__}")
    if not items:
        raise ValueError(f"{name}: expected at least one tensor, got an empty sequence")
    for k, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(t).__name__}")
    return items


def check_floating(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_same(items: Sequence[torch.Tensor], name: str) -> None:
    """All tensors of ``items`` share the first one's shape, dtype, device and layout."""
    first = items[0]
    check_floating(first, f"{name}[0]")
    if first.layout != torch.strided:
        raise ValueError(f"{name}[0]: expected a dense (strided) tensor, got layout {first.layout}")
    for k, t in enumerate(items[1:], start=1):
        if t.shape != first.shape:
            raise ValueError(f"{name}[{k}]: shape {tuple(t.shape)} differs from {name}[0]'s {tuple(first.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}[{k}]: dtype {t.dtype} differs from {name}[0]'s {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}[{k}]: device {t.device} differs from {name}[0]'s {first.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}[{k}]: expected a dense (strided) tensor, got layout {t.layout}")


def check_weights(weights, k: int, device: torch.device, name: str = "weights") -> None:
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(weights).__name__}")
    check_floating(weights, name)
    if weights.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of {k} weights, got shape {tuple(weights.shape)}")
    if weights.shape[0] != k:
        raise ValueError(f"{name}: expected {k} weights (one per candidate), got {weights.shape[0]}")
    if weights.device != device:
        raise ValueError(f"{name}: device {weights.device} differs from the inputs' {device}")
