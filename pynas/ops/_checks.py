"""The public ops' input checks, in one place and one wording: ``argument: expected ..., got ...``, naming the
argument (the backends keep only guards against reading out of bounds)."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

TensorSeq = Union[torch.Tensor, Sequence[torch.Tensor]]

#: The columns of rnn_mix's ``probs``.
RNN_FUNCS = ("none", "tanh", "relu", "sigmoid", "identity")


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


def check_rnn_mix_args(states, c, h, probs) -> None:
    """rnn_mix's inputs: states, c, h (J, B, H) of one floating dtype and device, probs (J, 5) floating."""
    for name, t in (("states", states), ("c", c), ("h", h), ("probs", probs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if states.dim() != 3:
        raise ValueError(f"states: expected shape (J, B, H), got {tuple(states.shape)}")
    if not states.is_floating_point():
        raise TypeError(f"states: expected a floating dtype, got {states.dtype}")
    for name, t in (("c", c), ("h", h)):
        if t.shape != states.shape or t.dtype != states.dtype or t.device != states.device:
            raise ValueError(f"{name}: expected the shape, dtype and device of states "
                             f"({tuple(states.shape)}, {states.dtype}, {states.device}), got "
                             f"({tuple(t.shape)}, {t.dtype}, {t.device})")
    if probs.shape != (states.shape[0], len(RNN_FUNCS)) or not probs.is_floating_point() \
            or probs.device != states.device:
        raise ValueError(f"probs: expected a floating ({states.shape[0]}, 5) tensor over {', '.join(RNN_FUNCS)} "
                         f"on {states.device}, got {tuple(probs.shape)} {probs.dtype} on {probs.device}")


def check_cnn_edge_args(x: torch.Tensor, params: Sequence[torch.Tensor], halves: bool) -> None:
    """The fused edge's input: x of its parameters' dtype and device; with ``halves`` (a stride-2 skip_connect,
    FactorizedReduce, which takes the even and the odd pixels) an even height and width."""
    for p in params:
        if p.dtype != x.dtype or p.device != x.device:
            raise TypeError(f"x: dtype {x.dtype} on {x.device} does not match the edge's parameters "
                            f"({p.dtype} on {p.device}); move the module with .to()")
    if halves and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(
            f"x: a stride-2 skip_connect (FactorizedReduce) needs an even height and width, got {tuple(x.shape)}")
