"""Detect host-device synchronisations: ``with no_host_sync(): ...`` raises on any.

On the CPU there is no device to wait for, but the same code on a GPU would block on every call that
moves a tensor's value to Python (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ...). This mode
intercepts those calls through a TorchFunctionMode, so a CPU test proves a step sync-free; on CUDA it
also turns on ``torch.cuda.set_sync_debug_mode("error")``, which catches syncs inside torch's own ops.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_SYNCING = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
    torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__array__,
}


class HostSyncError(RuntimeError):
    pass


class _NoSyncMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            name = getattr(func, "__name__", str(func))
            raise HostSyncError(f"host sync: Tensor.{name} called inside no_host_sync()")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Raise :class:`HostSyncError` on any call that would copy a tensor's value to the host."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    old = torch.cuda.get_sync_debug_mode() if cuda else None
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoSyncMode():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(old)
