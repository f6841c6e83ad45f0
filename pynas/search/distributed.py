"""Data-parallel searches on torch.distributed: one process per device, launched by ``torchrun`` (or
``pynas search ... --nproc N``, which runs torchrun), gloo on CPUs, NCCL on GPUs.

Semantics: an N-rank search follows the single-process search on the same global batches.

* **Data.** Every rank draws the same global batch (the same seeded order and augmentation as one process) and
  keeps its share: rows ``[r * b, (r + 1) * b)`` with ``b = len // N`` (CNN: images; RNN: the columns of the
  batchified text, so each rank carries its own columns' hidden states). DARTS's split of the training data in
  two halves is unchanged. A batch whose length N does not divide loses its last ``len % N`` rows (the CNN's
  last batch of an epoch); the RNN's batch sizes must be multiples of N.
* **Gradients.** Every gradient a step computes is averaged over the ranks (one all-reduce of one flat buffer per
  gradient list): the weight step's before its clipping, the architecture gradient, and in the second-order step
  the training gradient of the virtual step, the validation gradients (dalpha and v, so R = r / ||v|| comes from
  the global v) and both finite-difference gradients. Each rank's loss is the mean over its equal share, so the
  average is the gradient of the global batch's mean loss. The weights, alphas and optimizer states stay
  identical on every rank.
* **Randomness.** All ranks keep the same generator state (the same seed and the same draws); a dropout mask of
  the batch (the RNN's) is drawn for the whole global batch and each rank keeps its rows, as one process would
  have drawn it.
* **BatchNorm.** By default each rank normalises with its own batch statistics (as DataParallel code does): the
  run then matches one process only up to that; the running statistics of rank 0 are broadcast to every rank
  before each evaluation and checkpoint. With ``sync_bn`` every BatchNorm is :class:`SyncBatchNorm`: the batch
  statistics (and their gradients) are those of the global batch, so the run equals one process's to rounding;
  its BatchNorms run op by op (the fused kernels compute BatchNorm statistics inside the kernel), so sync_bn
  uses the reference backend.
* **Rank 0** alone logs, shows the progress bar and writes checkpoints (atomically); a checkpoint holds nothing
  per rank, so ``--resume`` works for any world size. Collectives time out after ``timeout`` seconds: a rank that
  dies ends the others with an error naming the timeout, not a hang (torchrun also stops the group).

Only the processes' group is made here (``torch.distributed.init_process_group`` from torchrun's environment);
nothing manages processes beyond torchrun.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

DEFAULT_TIMEOUT_S = 300.0

_ACTIVE: Optional["Group"] = None


class Group:
    """This process's place in a data-parallel search: ``rank`` of ``world`` processes, the collectives' backend,
    their timeout."""

    def __init__(self, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S, sync_bn: bool = False):
        self.rank, self.world, self.timeout_s, self.sync_bn = rank, world, float(timeout_s), bool(sync_bn)

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- data ----------------------------------------------------------------------------------------
    def rows(self, n: int) -> slice:
        """This rank's share of ``n`` rows (the first ``N * (n // N)`` split evenly)."""
        b = n // self.world
        if b < 1:
            raise ValueError(f"batch_size: a batch of {n} rows cannot be shared by {self.world} processes")
        return slice(self.rank * b, (self.rank + 1) * b)

    def shard(self, *tensors: torch.Tensor, dim: int = 0):
        """Each tensor's share along ``dim`` (:meth:`rows`)."""
        out = []
        for t in tensors:
            s = self.rows(t.size(dim))
            out.append(t.narrow(dim, s.start, s.stop - s.start).contiguous())
        return out[0] if len(out) == 1 else tuple(out)

    # -- collectives ---------------------------------------------------------------------------------
    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise RuntimeError(f"distributed: rank {self.rank} of {self.world}: {what} did not complete (within the "
                               f"{self.timeout_s:g} s timeout): another process died or stopped "
                               f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") \
                from None

    def average(self, tensors: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """The mean over the ranks of each tensor (None stays None: the same on every rank), as new tensors; one
        all-reduce of one flat buffer per dtype."""
        import torch.distributed as dist

        out: List[Optional[torch.Tensor]] = list(tensors)
        by_dtype = {}  # insertion order: the tensors' order, the same on every rank
        for i, t in enumerate(tensors):
            if t is not None:
                by_dtype.setdefault((t.dtype, t.device), []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
            self._wait(work, "averaging the gradients")
            flat.div_(self.world)
            at = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = flat[at:at + n].view_as(tensors[i])
                at += n
        return out

    def average_grads_(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each parameter's ``.grad`` by its mean over the ranks (parameters without one skipped)."""
        ps = [p for p in params if p.grad is not None]
        for p, g in zip(ps, self.average([p.grad for p in ps])):
            p.grad = g

    def sum_floats(self, values: Sequence[float]) -> List[float]:
        """The sums over the ranks of a few host numbers (figures for the log)."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        self._wait(dist.all_reduce(t, async_op=True), "summing the epoch's figures")
        return [float(v) for v in t.cpu()]

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        import torch.distributed as dist

        ts = [t for t in tensors if t.numel()]
        if not ts:
            return
        for dtype in sorted({t.dtype for t in ts}, key=str):  # the same order on every rank
            group = [t for t in ts if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self._wait(dist.broadcast(flat, src=0, async_op=True), "broadcasting rank 0's state")
            at = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[at:at + t.numel()].view_as(t))
                    at += t.numel()

    def barrier(self) -> None:
        import torch.distributed as dist

        self._wait(dist.barrier(async_op=True), "the barrier")


def active() -> Optional[Group]:
    """The data-parallel group of this process's search, or None (one process)."""
    return _ACTIVE


@contextlib.contextmanager
def using(group: Optional[Group]) -> Iterator[Optional[Group]]:
    """Make ``group`` the active one inside (the process group itself must exist)."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, group
    try:
        yield group
    finally:
        _ACTIVE = before


def world_from_env() -> int:
    """WORLD_SIZE from torchrun's environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(raw), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer (torchrun sets it), got {raw!r}") from None


def setup(device: str, timeout_s: float = DEFAULT_TIMEOUT_S, sync_bn: bool = False) -> Optional[Group]:
    """Join torchrun's process group (gloo for CPU devices, NCCL for CUDA ones) and make it active; None when this
    process is alone (no WORLD_SIZE above 1). A CUDA ``device`` becomes ``cuda:LOCAL_RANK``."""
    import torch.distributed as dist

    global _ACTIVE
    world = world_from_env()
    if world <= 1:
        return None
    if not (timeout_s > 0):
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout_s!r}")
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _ACTIVE = Group(dist.get_rank(), dist.get_world_size(), timeout_s, sync_bn)
    return _ACTIVE


@contextlib.contextmanager
def joined(device: str, timeout_s: float = DEFAULT_TIMEOUT_S, sync_bn: bool = False) -> Iterator[Optional[Group]]:
    """:func:`setup` on entry; on leaving, a barrier when the body ended normally (every rank is done before any
    tears its group down under a peer's last collective), then :func:`teardown` in every case."""
    group = setup(device, timeout_s, sync_bn)
    try:
        yield group
        if group is not None:
            group.barrier()
    finally:
        teardown()


def place(device: str) -> str:
    """The device a rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if _ACTIVE is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def teardown() -> None:
    import torch.distributed as dist

    global _ACTIVE
    _ACTIVE = None
    if dist.is_initialized():
        dist.destroy_process_group()


# -- synchronised BatchNorm ------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, differentiable: the gradient of every rank's input is the sum over the ranks of
    the output gradients (itself this function, so double backward works). Each all-reduce is waited for at once
    through the group (its timeout and error); no collective is left pending when the process ends."""

    @staticmethod
    def forward(ctx, group: "Group", x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.detach().clone(memory_format=torch.contiguous_format)
        group._wait(dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True), "a synchronised BatchNorm")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, _AllReduceSum.apply(ctx.group, grad)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm over the global batch of a data-parallel search (any backend, gloo included): the per-channel
    mean and variance are all-reduced (two differentiable all-reduces: the sum, then the centred sum of squares),
    so the output, the gradients and the running statistics are those of one process on the whole batch. Alone
    (no active group) or in eval mode it is a plain BatchNorm. Same parameters, buffers and state_dict keys as
    the module it replaces (:func:`convert_sync_batchnorm`)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = _ACTIVE
        if group is None or not self.training or not self.track_running_stats or self.momentum is None:
            return super().forward(x)
        all_reduce = functools.partial(_AllReduceSum.apply, group)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = (x.numel() // x.size(1)) * group.world
        mean = all_reduce(x.sum(dims)) / n
        d = x - mean.view(shape)
        var = all_reduce((d * d).sum(dims)) / n
        y = d * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d, 2d, 3d) in ``module`` by a :class:`SyncBatchNorm` holding the same tensors;
    returns the module (the root itself replaced when it is one)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=None)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
