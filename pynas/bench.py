"""pynas's benchmark suite: providers side by side in one process.

Providers: ``reference`` (eager plain PyTorch), ``compiled`` (``torch.compile``
of the reference; its compile time is a figure of its own, and it is skipped
with a note when it does not finish within ``compile_timeout``), ``pynas``
(the automatic backend) and optionally ``pynas-<backend>`` for each backend by
name. Every row reports the median, min and max over repeats after warm-up,
and its ratio to the reference measured in the same run; on a CPU a benchmark's
providers take their repeats in turns (:func:`time_interleaved`), so that a
drift of the machine's speed during the run moves them alike.

Benchmarks:
  * ``cnn_search_first_order`` / ``cnn_search_second_order``: one DARTS CNN
    search iteration (architect step plus weight step, as the search loop
    runs it), with the bytes held by the autograd graph after a training
    forward and, on GPU, the peak memory and the kernels launched;
  * ``rnn_search_first_order`` / ``rnn_search_second_order``: one DARTS RNN
    search iteration (the RNN architect's step plus the weight step with the
    temporal activation regularisation, clipped SGD), on random tokens;
  * ``cnn_search_idarts`` / ``_pcdarts`` / ``_gdas`` / ``_rsws``: one iteration of each other method on the
    CNN space (pynas.strategies), first order, with the method's defaults at the search size (the reference
    provider is the method's eager path: for GDAS and RSWS it too computes only the sampled operations; their
    iterations' cost varies with the sample, so they take 15 repeats by default, every provider the same samples);
  * ``cnn_edge_fwd_bwd``: one training-mode MixedOp forward and backward;
  * ``mixed_sum_fwd`` / ``_bwd`` / ``_fwd_bwd``: the fused op against its
    reference, with the bytes it must move and the fraction of the machine's
    copy bandwidth it achieves;
  * ``roofline_fma`` / ``roofline_copy``: the machine's two roofs, measured by
    pynas._C's micro-benchmarks (provider ``pynas`` only, CPU only): the float32
    FMA peak in GFLOP/s and the bandwidth of a large copy in GB/s. The rows of
    :data:`FLOP_COUNTED` report their achieved GFLOP/s against that peak (see
    :func:`count_flops`); :func:`pynas.plot.plot_roofline` draws them.

Run it with ``pynas bench``; rows of JSON are appended to ``--out``.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import __version__, _backend
from .strategies.darts import CNNArchitect as Architect
from .cnn import Network
from .ops import mixed_sum, mixed_sum_ref

MACRO = ("cnn_search_first_order", "cnn_search_second_order", "rnn_search_first_order", "rnn_search_second_order")
MICRO = ("mixed_sum_fwd", "mixed_sum_bwd", "mixed_sum_fwd_bwd", "cnn_edge_fwd_bwd")
#: One first-order iteration of each other method on the CNN space (pynas.strategies), at the search size.
METHODS = ("cnn_search_idarts", "cnn_search_pcdarts", "cnn_search_gdas", "cnn_search_rsws")
SAMPLED_METHODS = ("cnn_search_gdas", "cnn_search_rsws")  # 15 repeats by default (the others: 5)
RNN_REPEATS = 11  # the rnn_search_* iterations' default repeats
#: One iteration of each method on the RNN space at the RNN size: ENAS (a weight step on a sampled cell and a
#: controller step), CAS (ENAS on a later task, the continual penalty in the weight step), MAS (two tasks: a weight
#: step and a controller step on the mean reward), ESS (a first-order architecture step and a weight step).
RNN_METHODS = ("rnn_search_enas", "rnn_search_cas", "rnn_search_mas", "rnn_search_ess")
#: A first-order iteration of a DARTS supernet written as other code writes it (pynas.foreign.example), eager
#: against pynas.accelerate.
FOREIGN = ("cnn_search_foreign",)
#: A first-order DARTS iteration of the search on 1 and 2 processes (torch.distributed, one thread each; gloo on
#: CPUs, NCCL on GPUs), the global batch the benchmark's: pynas only, the 2-process row's speedup against the
#: 1-process one.
DATA_PARALLEL = ("cnn_search_1proc", "cnn_search_2proc", "rnn_search_1proc", "rnn_search_2proc")
#: The machine's roofs (pynas._C.roofline_fma_gflops / roofline_copy_gbs at torch.get_num_threads() threads).
ROOFLINE = ("roofline_fma", "roofline_copy")
#: The benchmarks whose rows carry flops, gflops, gflops_fraction and arithmetic_intensity (see count_flops).
FLOP_COUNTED = ("cnn_edge_fwd_bwd", "mixed_sum_fwd", "mixed_sum_bwd", "mixed_sum_fwd_bwd", "cnn_search_first_order",
                "rnn_search_first_order")
BENCHMARKS = MACRO + METHODS + RNN_METHODS + FOREIGN + DATA_PARALLEL + MICRO + ROOFLINE
BASE_PROVIDERS = ("reference", "compiled", "pynas")

SIZES = {
    # the CPU size of the issues, and the DARTS default for GPUs
    "cpu": {"search": dict(C=8, layers=5, batch=16, image=32), "mixed_sum": dict(K=7, shape=(16, 8, 32, 32)),
            "edge": dict(C=8, batch=16, image=32, stride=1),
            "rnn": dict(emsize=64, batch=16, bptt=35, ntoken=10000),
            # the copy's buffer: 4x a 32 MiB last-level cache, so the copy measures the memory
            "roofline": dict(seconds=0.5, bytes=2 ** 27)},
    "gpu": {"search": dict(C=16, layers=8, batch=64, image=32), "mixed_sum": dict(K=7, shape=(64, 16, 32, 32)),
            "edge": dict(C=16, batch=64, image=32, stride=1),
            "rnn": dict(emsize=300, batch=256, bptt=35, ntoken=10000),
            "roofline": dict(seconds=0.5, bytes=2 ** 27)},
    # a smoke size for tests and dry runs: measures nothing of interest
    "tiny": {"search": dict(C=2, layers=2, batch=2, image=8), "mixed_sum": dict(K=3, shape=(4, 5)),
             "edge": dict(C=2, batch=2, image=4, stride=1), "rnn": dict(emsize=4, batch=4, bptt=3, ntoken=20),
             "roofline": dict(seconds=0.01, bytes=2 ** 20)},
}


def size_group(bench: str) -> str:
    """The key of SIZES[...] a benchmark reads its size from."""
    if bench.startswith("rnn_search"):
        return "rnn"
    if bench.startswith("cnn_search"):
        return "search"
    if bench.startswith("cnn_edge"):
        return "edge"
    if bench in ROOFLINE:
        return "roofline"
    return "mixed_sum"


# -- environment -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    if os.environ.get("PYNAS_GIT_SHA"):
        return os.environ["PYNAS_GIT_SHA"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        # "dirty" when the measured code differs from the commit (results files do not count)
        code = [":(top)pynas", ":(top)kernels", ":(top)csrc", ":(top)setup.py"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "pynas": __version__, "git_sha": git_sha()}


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
               min_repeat_s: float = 0.0) -> List[float]:
    """Seconds per call of ``fn``, one figure per repeat, after ``warmup`` calls.

    A repeat runs ``fn`` as many times as it takes to last ``min_repeat_s`` (calibrated once), so
    that calls of a few microseconds are timed above the clock's and the launch queue's noise.
    :func:`time_interleaved` with one provider; an exception of ``fn`` is raised.
    """
    call = Timed(fn)
    _take_turns([call], device, repeats, warmup, min_repeat_s)
    if call.error is not None:
        raise call.error
    return call.times


@dataclass
class Timed:
    """One provider's calls for :func:`time_interleaved`: ``fn`` runs inside ``context()`` (its backend), with the
    global random state that the provider's own sequence has reached (``rng``, kept between its calls; None: the
    random state is left alone)."""

    fn: Callable[[], object]
    context: Callable[[], "contextlib.AbstractContextManager"] = contextlib.nullcontext
    rng: Optional[tuple] = None
    inner: int = 1
    times: List[float] = field(default_factory=list)
    error: Optional[BaseException] = None


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda, py = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(py)


def time_interleaved(calls: Sequence[Timed], device: torch.device, repeats: int, warmup: int,
                     min_repeat_s: float = 0.0) -> None:
    """Time several providers' calls side by side: fills each ``Timed.times`` (seconds per call, one per repeat)
    or, when its calls raise, ``Timed.error`` (the others go on).

    Each provider makes its ``warmup`` calls and is calibrated (a repeat lasts ``min_repeat_s``, as in
    :func:`time_calls`), then the repeats go round by round: repeat r of every provider before repeat r + 1 of
    any, the order turned by one each round. A machine whose speed drifts during the run (a VM's neighbours, the
    clock) then slows every provider alike, and the ratios measured in one run compare like with like. Each
    provider keeps its own random state (saved after its calls, restored before them), so it draws the same
    samples as when it runs alone.
    """
    _take_turns(calls, device, repeats, warmup, min_repeat_s)


def _take_turns(calls: Sequence[Timed], device: torch.device, repeats: int, warmup: int, min_repeat_s: float) -> None:
    """The loop of :func:`time_interleaved` (and, with one call, of :func:`time_calls`)."""
    live = list(calls)

    def run(c: Timed, n: int) -> Optional[float]:
        try:
            if c.rng is not None:
                _set_rng_state(c.rng, device)
            with c.context():
                _sync(device)
                t = time.perf_counter()
                for _ in range(n):
                    c.fn()
                _sync(device)
                dt = time.perf_counter() - t
            if c.rng is not None:
                c.rng = _rng_state(device)
            return dt
        except Exception as exc:  # this provider's row becomes an error; the others go on
            c.error = exc
            live.remove(c)
            return None

    for c in list(live):
        c.times = []
        if warmup and run(c, warmup) is None:
            continue
        if min_repeat_s > 0:
            one = run(c, 1)
            if one is None:
                continue
            c.inner = max(1, int(min_repeat_s / max(one, 1e-7)))
    for r in range(repeats):
        order = list(live)
        k = r % len(order) if order else 0
        for c in order[k:] + order[:k]:
            dt = run(c, c.inner)
            if dt is not None:
                c.times.append(dt / c.inner)


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: Optional[float]):
    """Raise :class:`CompileTimeout` in this (main) thread after ``seconds``; no-op where unsupported.

    Yields a dict whose ``"fired"`` turns True when the alarm went off, since code under
    ``torch.compile`` may wrap the exception in one of its own.
    """
    state = {"fired": False}
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield state
        return

    def on_alarm(signum, frame):
        state["fired"] = True
        raise CompileTimeout(f"did not finish within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a plain tensor copy that moves ``nbytes`` (read plus write): the best a memory-bound
    op with that working set can do on this machine (caches included, as for the op)."""
    n = max(1024, nbytes // 8)  # float32 elements: n read + n written = nbytes
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, repeats=9, warmup=3, min_repeat_s=0.02)
    return 2 * n * 4 / statistics.median(times)


# -- the profiler's own output -------------------------------------------------------------------------
# torch.profiler's C++ side (kineto) logs to the process's file descriptors, below Python: "USDT:... profiler_start",
# "ERROR:... gpuGetDeviceCount failed with code 35" on a machine without a GPU, and the like. Around the profiler
# calls those descriptors go to temporary files; lines in kineto's log format (LEVEL:date time pid:tid File.cpp:line])
# are dropped (logged at debug level to the "pynas.bench" logger), everything else is written back.
_NOISE_RE = re.compile(rb"^(?:USDT|INFO|WARNING|ERROR|STAGE|VERBOSE|DEBUG):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                       rb"\d+:\d+ [\w./-]+\.(?:cpp|cc|h|cu):\d+\]")
_log = logging.getLogger("pynas.bench")


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def quiet_fds(fds=(1, 2)):
    """Send what is written to the file descriptors ``fds`` (default stdout and stderr, at the C level) to
    temporary files while the block runs; afterwards write back to each descriptor what it received, minus the
    lines of the profiler's own log format. The descriptors are restored even when the block raises."""
    _flush_python_streams()
    saved, captures = {}, {}
    try:
        for fd in fds:
            captures[fd] = tempfile.TemporaryFile()
            saved[fd] = os.dup(fd)
            os.dup2(captures[fd].fileno(), fd)
        yield
    finally:
        _flush_python_streams()
        for fd in fds:
            if fd in saved:
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
        for fd, tmp in captures.items():
            try:
                tmp.seek(0)
                data = tmp.read()
            finally:
                tmp.close()
            kept = []
            for line in data.splitlines(keepends=True):
                if _NOISE_RE.match(line):
                    _log.debug("profiler: %s", line.decode("utf-8", "replace").rstrip())
                else:
                    kept.append(line)
            if kept and fd in saved:
                try:
                    os.write(fd, b"".join(kept))
                except OSError:
                    pass


# -- memory and launches -------------------------------------------------------------------------
def graph_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes that stay allocated after ``fn()`` while its result (e.g. a loss and its graph) is alive.

    CPU: the sum of the allocator's memory events recorded by the profiler; GPU: the change in
    ``torch.cuda.memory_allocated``.
    """
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        held = torch.cuda.memory_allocated(device) - before
        del out
        return int(held)
    from torch.profiler import ProfilerActivity, profile

    with quiet_fds():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        held = sum(e.self_cpu_memory_usage for e in prof.events())
    del out
    return int(held)


def gpu_launches_and_peak(fn: Callable[[], object], device: torch.device):
    """(kernels launched, peak bytes allocated) during one call of ``fn`` on a GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    with quiet_fds():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        launches = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    peak = torch.cuda.max_memory_allocated(device)
    return launches, int(peak)


# -- the benchmarks ------------------------------------------------------------------------------
@dataclass
class Case:
    """What one provider runs for one benchmark."""

    step: Callable[[], object]
    forward: Optional[Callable[[], object]] = None  # a training forward, for graph_bytes
    bytes_moved: Optional[int] = None


def _provider_backend(provider: str) -> str:
    if provider in ("reference", "compiled"):
        return "reference"
    if provider == "pynas":
        return "auto"
    return provider.split("-", 1)[1]


def add_search_size_arguments(parser) -> None:
    """--backend, --threads and the CNN search network's size (the CPU size by default), for the scripts in
    benchmarks/ that time or profile one search iteration."""
    size = SIZES["cpu"]["search"]
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--C", type=int, default=size["C"])
    parser.add_argument("--layers", type=int, default=size["layers"])
    parser.add_argument("--batch", type=int, default=size["batch"])
    parser.add_argument("--size", type=int, default=size["image"])


def _cnn_batches(size: dict, device: torch.device, seed: int):
    """A (train, valid) pair of random image batches of the benchmark's size, 10 classes: x, y, xv, yv."""
    b, s = size["batch"], size["image"]
    g = torch.Generator().manual_seed(seed + 1)
    x, xv = (torch.randn(b, 3, s, s, generator=g).to(device) for _ in range(2))
    y, yv = (torch.randint(0, 10, (b,), generator=g).to(device) for _ in range(2))
    return x, y, xv, yv


def _darts_case(model: nn.Module, arch, batches, unrolled: bool) -> Case:
    """One DARTS iteration: the arch step (first or second order), then the SGD step of the weights, clipped."""
    x, y, xv, yv = batches
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)

    def step():
        arch.step(x, y, xv, yv, 0.025, opt, unrolled)
        opt.zero_grad()
        loss = model._loss(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    return Case(step, lambda: model._loss(x, y))


def search_case(size: dict, device: torch.device, unrolled: bool, compiled: bool, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = Network(size["C"], 10, size["layers"], nn.CrossEntropyLoss()).to(device)
    if compiled:
        model.compile()
    arch = Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    return _darts_case(model, arch, _cnn_batches(size, device, seed), unrolled)


def method_search_case(method: str, size: dict, device: torch.device, seed: int = 0) -> Case:
    """One iteration of ``method`` (pynas.strategies) as the CNN search runs it, first order, with the method's
    defaults at the benchmark's network size; architecture steps on (after PC-DARTS's warm-up)."""
    from types import SimpleNamespace

    from .search.cnn import CNNSearchConfig
    from .strategies import cnn_method

    torch.manual_seed(seed)
    C = size["C"]
    k = 4 if C % 4 == 0 else (2 if C % 2 == 0 else 1)  # PC-DARTS's K: 4 where it divides C (the smoke size's C=2)
    cfg = CNNSearchConfig.for_method(method, init_channels=C, layers=size["layers"], batch_size=size["batch"],
                                     partial_channels=k)
    search = SimpleNamespace(cfg=cfg, criterion=nn.CrossEntropyLoss(), device=device, log=lambda line: None)
    m = cnn_method(method)(search)
    search.model = m.build_model(10, search.criterion).to(device)
    search.optimizer = m.build_optimizer(search.model)
    search.architect = m.build_architect(search.model)
    epoch = cfg.warmup_epochs
    m.start_epoch(epoch)
    x, y, xv, yv = _cnn_batches(size, device, seed)

    def step():
        m.iteration(x, y, xv, yv, cfg.learning_rate, epoch)

    def forward():
        return search.model._loss(x, y)

    return Case(step, forward)


def foreign_search_case(size: dict, device: torch.device, accelerated: bool, seed: int = 0) -> Case:
    """One first-order DARTS iteration (arch step, weight step) of :class:`pynas.foreign.example.PortNetwork`, its
    own forward (``accelerated`` False) or under :func:`pynas.accelerate` (checked on the first batch), with the
    architect :class:`pynas.Architect` over its parameters."""
    from .foreign import accelerate
    from .foreign.example import PortNetwork
    from .strategies.darts import Architect as GenericArchitect

    torch.manual_seed(seed)
    model = PortNetwork(size["C"], 10, size["layers"], nn.CrossEntropyLoss()).to(device)
    batches = _cnn_batches(size, device, seed)
    if accelerated:
        report = accelerate(model, example_inputs=batches[0])
        if len(report.accelerated) != len(report.entries):
            raise RuntimeError(f"accelerate left mixed ops alone: {report}")
    arch = GenericArchitect.for_model(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4,
                                      arch_weight_decay=1e-3)
    return _darts_case(model, arch, batches, unrolled=False)


def rnn_search_case(size: dict, device: torch.device, unrolled: bool, compiled: bool, seed: int = 0) -> Case:
    """One iteration of the RNN search loop (pynas/search/rnn.py) with DARTS's settings."""
    from .rnn import RNNModelSearch
    from .rnn.model_search import regularised_loss
    from .strategies.darts import RNNArchitect

    torch.manual_seed(seed)
    e, ntok, b, t = size["emsize"], size["ntoken"], size["batch"], size["bptt"]
    model = RNNModelSearch(ntok, e, e, e, 0.75, 0.25, 0.75, 0.2, 0.0).to(device)
    fn = torch.compile(model) if compiled else model
    if compiled:
        model._loss = lambda hidden, input, target: _rnn_nll(fn, hidden, input, target)  # the compiled forward
    opt = torch.optim.SGD(model.parameters(), lr=20.0, weight_decay=5e-7)
    arch = RNNArchitect(model, weight_decay=5e-7, clip=0.25, arch_learning_rate=3e-3, arch_weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    x, xv = (torch.randint(0, ntok, (t, b), generator=g).to(device) for _ in range(2))
    y, yv = (torch.randint(0, ntok, (t * b,), generator=g).to(device) for _ in range(2))
    hidden, hidden_v = model.init_hidden(b), model.init_hidden(b)

    def step():
        arch.step(hidden, x, y, hidden_v, xv, yv, opt, unrolled)
        opt.zero_grad()
        if compiled:
            log_prob, _, rnn_hs, _ = fn(x, hidden, return_h=True)
            loss = nn.functional.nll_loss(log_prob.view(-1, ntok), y)
            loss = loss + 1e-3 * (rnn_hs[-1][1:] - rnn_hs[-1][:-1]).pow(2).mean()
        else:  # the search loop's weight step (pynas/search/rnn.py): DARTS's alpha 0, beta 1e-3
            loss = regularised_loss(model, x, y, hidden, 0.0, 1e-3)[0]
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    def forward():
        return model._loss(hidden, x, y)[0]

    return Case(step, forward)


def _random_task(name: str, ntoken: int, tokens: int, seed: int):
    """A task of random tokens (the shape of :class:`pynas.rnn.tasks.LMTask`)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, ntoken, (n,), generator=g) for n in (tokens, tokens // 4, tokens // 4)]
    return SimpleNamespace(name=name, train=ids[0], valid=ids[1], test=ids[2], ntokens=ntoken)


def rnn_method_case(method: str, size: dict, device: torch.device, seed: int = 0) -> Case:
    """One iteration of an RNN-space method (:data:`RNN_METHODS`) as its search runs it, with its defaults at the
    benchmark's model size, on random tokens."""
    from .search.rnn import RNNSearch, RNNSearchConfig

    e, ntok, b, t = size["emsize"], size["ntoken"], size["batch"], size["bptt"]
    cfg = RNNSearchConfig.for_method("ess" if method == "ess" else "enas", emsize=e, nhid=e, nhidlast=e,
                                     batch_size=b, bptt=t, eval_batch_size=b, device=str(device), seed=seed)
    tokens = 8 * b * t
    tasks = [_random_task(f"task{i}", ntok, tokens, seed + i) for i in range(2)]
    torch.manual_seed(seed)
    if method == "mas":
        from .strategies.mas import MASSearch

        search = MASSearch(cfg, tasks, progress=False)
    else:
        search = RNNSearch(cfg, progress=False, corpus=tasks[0])
    model = search.model
    if method == "cas":  # a later task: the continual penalty against the previous task's weights
        from .strategies.cas import CASConfig, _penalty

        search.weight_penalty = _penalty(model, 1, CASConfig(), model.genotype())
    data = search.task_train if method == "mas" else [search.train_data]
    batches = [get for d in data for get in [_rnn_batch(d, t)]]
    xv, yv = _rnn_batch(search.search_data, t)
    hidden = [model.init_hidden(b) for _ in batches]
    state = {"step": 0}
    if method == "ess":
        hidden_v = model.init_hidden(b)

        def step():
            x, y = batches[0]
            search.architect.step(hidden[0], x, y, hidden_v, xv, yv, search.optimizer, False)
            search._weight_update(x, y, hidden[0])
    else:
        draw = search.architect.sampler(0)
        g = torch.Generator().manual_seed(seed + 7)
        rng = random.Random(seed)
        model.controller.train()

        def step():
            k = state["step"] % len(batches)
            state["step"] += 1
            x, y = batches[k]
            model.set_arch(draw())
            with search._scaled_lr(t):
                search._weight_update(x, y, hidden[k])
            genotype, log_prob, entropy = model.controller.sample(g)
            search.architect.reinforce.step(log_prob, entropy, search.architect.sample_reward(search, genotype, rng))

    def forward():
        return model._loss(hidden[0], *batches[0])[0]

    return Case(step, forward)


def data_parallel_step(space: str, size: dict, device: str, seed: int = 0) -> Callable[[], object]:
    """One first-order DARTS iteration of the ``space`` search (pynas.search.cnn or .rnn) at ``size`` on this
    process's share of the global batch (alone: all of it), as its search loop runs it."""
    if space == "cnn":
        from .cnn.data import batches
        from .search.cnn import CNNSearch, CNNSearchConfig

        b = size["batch"]
        cfg = CNNSearchConfig(init_channels=size["C"], layers=size["layers"], batch_size=b, num_train=8 * b,
                              device=device, seed=seed)
        search = CNNSearch(cfg, progress=False, log=lambda line: None)
        (x, y), (xv, yv) = (next(batches(search.data, idx, b, seed=seed)) for idx in (search.train_idx,
                                                                                   search.valid_idx))
        if search.dist is not None:
            x, y, xv, yv = search.dist.shard(x, y, xv, yv)
        x, y, xv, yv = (t.to(device) for t in (x, y, xv, yv))
        return lambda: search.method.iteration(x, y, xv, yv, cfg.learning_rate, 0)
    from .rnn.data import get_batch
    from .search.rnn import RNNSearch, RNNSearchConfig

    e, b, t = size["emsize"], size["batch"], size["bptt"]
    cfg = RNNSearchConfig(emsize=e, nhid=e, nhidlast=e, batch_size=b, bptt=t, eval_batch_size=2, device=device,
                          seed=seed)
    search = RNNSearch(cfg, progress=False, log=lambda line: None)
    x, y = get_batch(search.train_data, 0, t)
    xv, yv = get_batch(search.search_data, 0, t)
    local = search.train_data.size(1)
    hidden, hidden_v = search.model.init_hidden(local), search.model.init_hidden(local)

    def step():
        search.architect.step(hidden, x, y, hidden_v, xv, yv, search.optimizer, False)
        search._weight_update(x, y, hidden)

    return step


def _data_parallel_worker(argv: Sequence[str]) -> None:
    """Under torchrun (``python -m pynas.bench --data-parallel-worker SPACE REPEATS WARMUP SIZE``): time
    :func:`data_parallel_step` on every process; rank 0 prints the times as JSON."""
    import json

    from .search import distributed

    space, repeats, warmup, size = argv[0], int(argv[1]), int(argv[2]), json.loads(argv[3])
    device = argv[4] if len(argv) > 4 else "cpu"
    torch.set_num_threads(1)
    with distributed.joined(device) as group:
        device = distributed.place(device)
        step = data_parallel_step(space, size, device)
        times = time_calls(step, torch.device(device), repeats, warmup, 0.0)
        if group is None or group.main:
            print("PYNAS_TIMES " + json.dumps(times), flush=True)


def data_parallel_case(bench: str, size: dict, cfg: "BenchConfig", device: torch.device) -> dict:
    """A data-parallel row: :func:`_data_parallel_worker` under torchrun on 1 or 2 processes; the measured fields."""
    import json

    nproc = 2 if bench.endswith("2proc") else 1
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        return {"status": "skipped", "note": f"{nproc} processes need {nproc} GPUs; "
                                             f"{torch.cuda.device_count()} here"}
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "pynas.bench", "--data-parallel-worker", bench.split("_")[0], str(cfg.repeats or 5), str(cfg.warmup),
           json.dumps(size), str(device)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PYNAS_TIMES ")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the {nproc}-process run failed (exit {res.returncode}): {tail}")
    times = json.loads(lines[-1][len("PYNAS_TIMES "):])
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times),
            "note": f"{nproc} process{'es' if nproc > 1 else ''}, 1 thread each; "
                    f"{1 / statistics.median(times):.2f} iterations/s"}


def _rnn_batch(data, bptt: int):
    from .rnn.data import get_batch

    return get_batch(data, 0, bptt)


def _rnn_nll(fn, hidden, input, target):
    log_prob, hidden_next = fn(input, hidden)
    return nn.functional.nll_loss(log_prob.view(-1, log_prob.size(2)), target), hidden_next


def mixed_sum_case(size: dict, device: torch.device, which: str, provider: str, seed: int = 0) -> Case:
    K, shape = size["K"], tuple(size["shape"])
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(shape, generator=g).to(device).requires_grad_(True) for _ in range(K)]
    w = torch.softmax(torch.randn(K, generator=g), 0).to(device).requires_grad_(True)
    gout = torch.randn(shape, generator=g).to(device)
    if provider == "reference":
        fn = mixed_sum_ref
    elif provider == "compiled":
        fn = torch.compile(mixed_sum_ref)
    else:
        backend = _provider_backend(provider)
        fn = lambda xs, w: mixed_sum(xs, w, backend=None if backend == "auto" else backend)  # noqa: E731
    n = xs[0].numel() * xs[0].element_size()
    fwd_bytes = (K + 1) * n
    bwd_bytes = (2 * K + 1) * n

    if which == "fwd":
        def step():
            with torch.no_grad():
                return fn(xs, w)
        return Case(step, bytes_moved=fwd_bytes)
    if which == "bwd":
        holder = {}

        def fresh():
            holder["out"] = fn(xs, w)

        fresh()

        def step():
            torch.autograd.grad(holder["out"], xs + [w], gout, retain_graph=True)
        return Case(step, bytes_moved=bwd_bytes)

    def step():
        torch.autograd.grad(fn(xs, w), xs + [w], gout)
    return Case(step, bytes_moved=fwd_bytes + bwd_bytes)


def edge_case(size: dict, device: torch.device, compiled: bool, seed: int = 0) -> Case:
    """One training-mode MixedOp (all DARTS candidates): forward and backward to x, alpha and weights."""
    from .cnn.model_search import MixedOp

    torch.manual_seed(seed)
    op = MixedOp(size["C"], size["stride"]).to(device)
    n, c, s = size["batch"], size["C"], size["image"]
    x = torch.randn(n, c, s, s, device=device, requires_grad=True)
    w = torch.softmax(torch.randn(8, device=device), 0).requires_grad_(True)
    fn = torch.compile(op) if compiled else op
    inputs = [x, w] + list(op.parameters())

    def step():
        y = fn(x, w)
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    def forward():
        return fn(x, w)

    return Case(step, forward)


# -- the roofline: the machine's roofs and the kernels' flops ---------------------------------------------
def _roofline_ext():
    from . import _ext

    mod = _ext.load()
    if mod is None:
        raise RuntimeError(f"the roofline needs pynas._C: {_ext.error()}")
    if not hasattr(mod, "roofline_fma_gflops"):
        raise RuntimeError("the roofline needs a pynas._C with roofline_fma_gflops (rebuild it: pip install -e .)")
    return mod


# Measured once per process and setting, shared by the roofline rows and the kernels' fractions of the peak.
_PEAKS: Dict[tuple, float] = {}


def fma_peak(threads: int, seconds: float, repeats: int = 3) -> float:
    """The float32 FMA peak in GFLOP/s on ``threads`` threads: the best of ``repeats`` runs of
    ``pynas._C.roofline_fma_gflops`` of ``seconds`` each (measured once per process per setting)."""
    key = ("fma", threads, seconds, repeats)
    if key not in _PEAKS:
        mod = _roofline_ext()
        _PEAKS[key] = max(mod.roofline_fma_gflops(threads, seconds) for _ in range(repeats))
    return _PEAKS[key]


def copy_peak(nbytes: int, threads: int, seconds: float, repeats: int = 3) -> float:
    """GB/s (read plus write) of copying a buffer of ``nbytes`` on ``threads`` threads: the best of ``repeats`` runs
    of ``pynas._C.roofline_copy_gbs`` of ``seconds`` each (each itself the best of its passes)."""
    key = ("copy", nbytes, threads, seconds, repeats)
    if key not in _PEAKS:
        mod = _roofline_ext()
        _PEAKS[key] = max(mod.roofline_copy_gbs(nbytes, threads, seconds) for _ in range(repeats))
    return _PEAKS[key]


def roofline_case(bench: str, size: dict, repeats: int) -> dict:
    """The measured fields of a roof row at torch.get_num_threads() threads: ``gflops`` (roofline_fma) or
    ``bandwidth_gbs`` (roofline_copy), its fraction 1 (it is the roof)."""
    threads = torch.get_num_threads()
    isa = _roofline_ext().cpu_isa()
    if bench == "roofline_fma":
        gflops = fma_peak(threads, size["seconds"], repeats)
        return {"gflops": gflops, "gflops_fraction": 1.0,
                "note": f"float32 FMA peak ({isa}, {threads} threads, best of {repeats})"}
    gbs = copy_peak(size["bytes"], threads, size["seconds"], repeats)
    return {"bytes_moved": 2 * size["bytes"], "bandwidth_gbs": gbs, "bandwidth_fraction": 1.0,
            "note": f"copy of {size['bytes'] / 2 ** 20:g} MiB, read + write ({threads} threads, best of {repeats})"}


class _OpBytes(TorchDispatchMode):
    """Bytes the aten ops under it move if each reads its tensor arguments once and writes its outputs once (views
    move nothing): the unfused code's traffic, without re-reads or cache effects."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            seen = set()
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    self.total += t.numel() * t.element_size()
        return out


class _TotalOnly:
    """Stands for FlopCounterMode's module tracker: only the total is needed here, and the tracker's module hooks
    fail under ``torch.autograd.grad`` of leaf inputs (the edge benchmark's step)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def reference_case(bench: str, size: dict, device: torch.device) -> Case:
    """The reference provider's Case of a benchmark of :data:`FLOP_COUNTED` (built under the reference backend)."""
    with _backend.use_backend("reference"):
        if bench == "cnn_search_first_order":
            return search_case(size, device, unrolled=False, compiled=False)
        if bench == "rnn_search_first_order":
            return rnn_search_case(size, device, unrolled=False, compiled=False)
        if bench == "cnn_edge_fwd_bwd":
            return edge_case(size, device, compiled=False)
        if bench.startswith("mixed_sum_"):
            return mixed_sum_case(size, device, bench[len("mixed_sum_"):], "reference")
    raise ValueError(f"bench: no flop count for {bench!r}; counted: {', '.join(FLOP_COUNTED)}")


_FLOPS: Dict[tuple, tuple] = {}


def count_flops(bench: str, size: dict, device: torch.device) -> tuple:
    """(flops, traffic bytes, whether the bytes are estimated) of one measured call of ``bench`` at ``size``.

    The flops are those of the reference provider's implementation of the same call, counted once with
    :class:`torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products (forward and backward)
    only; elementwise flops (activations, BatchNorm, pooling, the weighted sums, the optimisers) are NOT counted,
    so the elementwise kernels (mixed_sum) count 0. The bytes are the case's ``bytes_moved`` where it is known
    (mixed_sum), else estimated from the reference's aten ops: each reads its tensor arguments once and writes its
    outputs once (views move nothing). That is the unfused code's traffic without re-reads or cache effects; a fused
    kernel that keeps intermediates in cache moves less, so its point sits further right than drawn.
    """
    key = (bench, json.dumps(size, sort_keys=True), str(device))
    if key not in _FLOPS:
        case = reference_case(bench, size, device)
        with _backend.use_backend("reference"):
            flops, op_bytes = measure_flops(case.step)
        if case.bytes_moved is not None:
            _FLOPS[key] = (flops, case.bytes_moved, False)
        else:
            _FLOPS[key] = (flops, op_bytes, True)
    return _FLOPS[key]


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None) -> int:
    """Flops of aten.convolution_backward: the input's and the weight's gradients cost a forward each,
    2 * numel(grad_out) * (Cin / groups) * kh * kw. (FlopCounterMode's own formula multiplies the weight
    gradient of a grouped convolution by the number of groups, 8x too much for DARTS's depthwise convs at C=8.)"""
    if transposed:
        from torch.utils.flop_counter import conv_backward_flop

        return conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                  output_padding, groups, output_mask, out_shape)
    one = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return one * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def measure_flops(fn: Callable[[], object]) -> tuple:
    """(flops, bytes) of one call of ``fn``: the convolutions' and matrix products' flops (forward and backward) by
    :class:`torch.utils.flop_counter.FlopCounterMode`, the convolutions' backward by :func:`_conv_backward_flops`
    (elementwise flops are not counted), and the bytes its aten ops move reading each tensor argument and writing
    each output once (views move nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    moved = _OpBytes()
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _TotalOnly()
    with counter, moved:
        fn()
    return int(counter.get_total_flops()), moved.total


def _flop_fields(bench: str, size: dict, device: torch.device, median_s: float, peak_s: dict) -> dict:
    """A FLOP_COUNTED row's flops, gflops, gflops_fraction (of the FMA peak, on a CPU), traffic_bytes and
    arithmetic_intensity (flop per byte)."""
    flops, traffic, estimated = count_flops(bench, size, device)
    out = {"flops": flops, "gflops": flops / median_s / 1e9, "traffic_bytes": traffic,
           "traffic_estimated": estimated, "arithmetic_intensity": flops / traffic if traffic else None}
    if device.type == "cpu":
        out["gflops_fraction"] = out["gflops"] / fma_peak(torch.get_num_threads(), peak_s["seconds"], peak_s["repeats"])
    return out


def _size_label(bench: str, size: dict) -> str:
    if bench.startswith("rnn_search"):
        return f"E=H={size['emsize']} B={size['batch']} T={size['bptt']} V={size['ntoken']}"
    if bench in MACRO or bench in METHODS or bench in FOREIGN or bench in DATA_PARALLEL:
        return f"C={size['C']} L={size['layers']} B={size['batch']} {size['image']}x{size['image']}"
    if bench.startswith("cnn_edge"):
        return f"C={size['C']} B={size['batch']} {size['image']}x{size['image']} s={size['stride']}"
    if bench == "roofline_fma":
        return f"f32 FMA chains {size['seconds']:g} s"
    if bench == "roofline_copy":
        return f"copy {size['bytes'] / 2 ** 20:g} MiB {size['seconds']:g} s"
    shape = "x".join(str(d) for d in size["shape"])
    return f"K={size['K']} {shape} f32"


@dataclass
class BenchConfig:
    size: str = "cpu"
    device: str = "cpu"
    benchmarks: Sequence[str] = BENCHMARKS
    providers: Sequence[str] = BASE_PROVIDERS
    repeats: Optional[int] = None  # default: 5 for search iterations (RNN DARTS: 11, GDAS, RSWS: 15), 20 for micro benchmarks
    warmup: int = 2
    compile_timeout: float = 600.0


def check_config(cfg: BenchConfig) -> None:
    if cfg.size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {cfg.size!r}")
    for b in cfg.benchmarks:
        if b not in BENCHMARKS:
            raise ValueError(f"benchmarks: unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)}")
    valid = BASE_PROVIDERS + tuple(f"pynas-{n}" for n in _backend.NAMES)
    for p in cfg.providers:
        if p not in valid:
            raise ValueError(f"providers: unknown provider {p!r}; choose from {', '.join(valid)}")
    if cfg.repeats is not None and cfg.repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {cfg.repeats}")


@dataclass
class _Prepared:
    """A (benchmark, provider) whose case is built and waits to be timed with the benchmark's other providers."""

    row: dict
    case: Case
    backend: str
    size: dict
    repeats: int
    min_repeat: float
    rng: tuple  # the global random state after the build (time_interleaved restores it before each call)


def _prepare_one(bench: str, provider: str, cfg: BenchConfig, device: torch.device):
    """Build one (benchmark, provider): a :class:`_Prepared` to time, or the row's fields when there is nothing to
    time here (skipped, or measured otherwise: the roofs, the data-parallel processes)."""
    sizes = SIZES[cfg.size]
    backend = _provider_backend(provider)
    compiled = provider == "compiled"
    row: dict = {"status": "ok", "note": None}
    if backend != "auto" and backend != "reference":
        why = _backend.BACKENDS[backend].unavailable_reason()
        if why:
            return {"status": "skipped", "note": f"backend {backend} unusable: {why}"}
    if bench in MACRO and bench.startswith("rnn_search"):
        size = sizes["rnn"]
        # pynas's RNN iteration is short (tens of ms on a CPU): a few seconds of a slower machine can cover all
        # of 5 repeats, so these rows take 11 (RNN_REPEATS)
        repeats, min_repeat = cfg.repeats or RNN_REPEATS, 0.0

        def make():
            return rnn_search_case(size, device, unrolled=bench.endswith("second_order"), compiled=compiled)
    elif bench in METHODS:
        size = sizes["search"]
        # a sampled method's iteration costs what its sample costs: more repeats for a stable median
        repeats, min_repeat = cfg.repeats or (15 if bench in SAMPLED_METHODS else 5), 0.0
        if compiled:
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "torch.compile is not measured for the methods (sampled paths sync with the host)"}

        def make():
            return method_search_case(bench[len("cnn_search_"):], size, device)
    elif bench in RNN_METHODS:
        size = sizes["rnn"]
        repeats, min_repeat = cfg.repeats or 5, 0.0
        if compiled:
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "torch.compile is not measured for the methods (sampled cells change per step)"}

        def make():
            return rnn_method_case(bench[len("rnn_search_"):], size, device)
    elif bench in ROOFLINE:
        size = sizes["roofline"]
        if provider != "pynas":
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "the roofline rows measure the machine (pynas._C's micro-benchmarks): provider pynas only"}
        if device.type != "cpu":
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "the roofline rows measure the CPU; a GPU's roofs are not measured"}
        return {"status": "ok", "params": dict(size, backend=backend),
                **roofline_case(bench, size, cfg.repeats or 3)}
    elif bench in DATA_PARALLEL:
        size = sizes["rnn" if bench.startswith("rnn") else "search"]
        if provider != "pynas":
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "the data-parallel rows measure pynas only (1 against 2 processes)"}
        with _backend.use_backend(backend):
            return {"status": "ok", "params": dict(size, backend=backend),
                    **data_parallel_case(bench, size, cfg, device)}
    elif bench in FOREIGN:
        size = sizes["search"]
        repeats, min_repeat = cfg.repeats or 5, 0.0
        if compiled:
            return {"status": "skipped", "params": dict(size, backend=backend),
                    "note": "eager against pynas.accelerate only (torch.compile of the DARTS network: "
                            "cnn_search_first_order)"}

        def make():
            return foreign_search_case(size, device, accelerated=provider != "reference")
    elif bench in MACRO:
        size = sizes["search"]
        repeats, min_repeat = cfg.repeats or 5, 0.0

        def make():
            return search_case(size, device, unrolled=bench.endswith("second_order"), compiled=compiled)
    elif bench.startswith("cnn_edge"):
        size = sizes["edge"]
        repeats, min_repeat = cfg.repeats or 20, 0.05

        def make():
            return edge_case(size, device, compiled)
    else:
        size = sizes["mixed_sum"]
        repeats, min_repeat = cfg.repeats or 20, 0.05

        def make():
            return mixed_sum_case(size, device, bench[len("mixed_sum_"):], provider)
    row["params"] = dict(size, backend=backend)
    with _backend.use_backend(backend):
        if not compiled:
            case = make()
        else:
            # A fresh dynamo cache, so each compiled provider pays its own compile: compile_s is the
            # set-up plus first call (inductor's on-disk cache, where present, shortens it).
            torch._dynamo.reset()
            t0 = time.perf_counter()
            state = {"fired": False}
            try:
                with deadline(cfg.compile_timeout) as state:
                    case = make()
                    case.step()
                    _sync(device)
            except Exception:
                if not state["fired"]:
                    raise
                return {"status": "skipped", "params": row["params"],
                        "note": f"torch.compile did not finish within {cfg.compile_timeout:g} s"}
            row["compile_s"] = time.perf_counter() - t0
    return _Prepared(row, case, backend, size, repeats, min_repeat, _rng_state(device))


def _finish_one(bench: str, p: _Prepared, times: List[float], cfg: BenchConfig, device: torch.device) -> dict:
    """The row's fields of a timed (benchmark, provider): the times, then what is measured after them."""
    row, case, size = p.row, p.case, p.size
    sizes = SIZES[cfg.size]
    with _backend.use_backend(p.backend):
        row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times))
        if case.forward is not None:
            row["memory_bytes"] = graph_bytes(case.forward, device)
        if device.type == "cuda":
            row["launches"], row["peak_bytes"] = gpu_launches_and_peak(case.step, device)
        if case.bytes_moved is not None:
            row["bytes_moved"] = case.bytes_moved
            row["bandwidth_gbs"] = case.bytes_moved / row["median_s"] / 1e9
            row["bandwidth_fraction"] = row["bandwidth_gbs"] * 1e9 / copy_bandwidth(device, case.bytes_moved)
    if bench in FLOP_COUNTED:
        peak = {"seconds": sizes["roofline"]["seconds"], "repeats": cfg.repeats or 3}  # as the roofline_fma row's
        try:
            row.update(_flop_fields(bench, size, device, row["median_s"], peak))
        except Exception as exc:  # the timing stands without its flops (e.g. a pynas._C without the roofline)
            row["note"] = f"flops not counted: {type(exc).__name__}: {exc}"
    return row


ROW_FIELDS = ("benchmark", "provider", "size", "params", "status", "note", "median_s", "min_s", "max_s", "repeats",
              "ratio", "speedup", "memory_bytes", "peak_bytes", "launches", "bytes_moved", "bandwidth_gbs",
              "bandwidth_fraction", "flops", "gflops", "gflops_fraction", "traffic_bytes", "traffic_estimated",
              "arithmetic_intensity", "compile_s", "device", "device_type", "threads", "torch", "triton", "pynas",
              "git_sha", "date")


def run(cfg: BenchConfig, progress: bool = True, on_row: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Run the suite; returns the rows (and hands each to ``on_row`` as it is measured)."""
    check_config(cfg)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: CUDA was asked for but no CUDA device is available")
    env = environment(device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    providers = list(cfg.providers)
    if "reference" not in providers:
        providers.insert(0, "reference")  # ratios need the reference, measured in the same run
    tasks = [(b, p) for b in cfg.benchmarks for p in providers]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="pynas bench", dynamic_ncols=True)
    rows: List[dict] = []
    ref_median: Dict[str, float] = {}

    def emit(bench: str, provider: str, measured: dict) -> None:
        sizes = SIZES[cfg.size][size_group(bench)]
        row = {k: None for k in ROW_FIELDS}
        row.update(benchmark=bench, provider=provider, size=_size_label(bench, sizes), params=dict(sizes))
        row.update(measured)
        row.update(env)
        row["date"] = date
        if row["status"] == "ok":
            if provider == "reference":
                ref_median[bench] = row["median_s"]
            if bench in DATA_PARALLEL:  # against the 1-process row of the same provider
                key = bench.replace("2proc", "1proc") + "/" + provider
                if bench.endswith("1proc"):
                    ref_median[key] = row["median_s"]
                if key in ref_median:
                    row["ratio"], row["speedup"] = row["median_s"] / ref_median[key], ref_median[key] / row["median_s"]
            elif bench in ref_median:
                row["ratio"] = row["median_s"] / ref_median[bench]
                row["speedup"] = ref_median[bench] / row["median_s"]
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.update(1)

    def error(exc: BaseException) -> dict:  # a failing provider is a row, not a crashed suite
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}"}

    def measure(bench: str, group: Sequence[str]) -> List[dict]:
        """The measured fields of each provider of ``group`` (in its order); its cases are freed on return."""
        built: Dict[str, object] = {}
        for provider in group:
            if bar is not None:
                bar.set_postfix_str(f"{bench} / {provider} (building)")
            try:
                built[provider] = _prepare_one(bench, provider, cfg, device)
            except Exception as exc:
                built[provider] = error(exc)
        calls = {p: Timed(b.case.step, functools.partial(_backend.use_backend, b.backend), b.rng)
                 for p, b in built.items() if isinstance(b, _Prepared)}
        if calls:
            first = next(b for b in built.values() if isinstance(b, _Prepared))  # the providers share its repeats
            if bar is not None:
                bar.set_postfix_str(f"{bench} / {', '.join(calls)}")
            time_interleaved(list(calls.values()), device, first.repeats, cfg.warmup, first.min_repeat)
        out = []
        for provider in group:
            b = built[provider]
            if isinstance(b, _Prepared):
                try:
                    if calls[provider].error is not None:
                        raise calls[provider].error
                    b = _finish_one(bench, b, calls[provider].times, cfg, device)
                except Exception as exc:
                    b = error(exc)
            out.append(b)
        return out

    # On a CPU a benchmark's providers are timed side by side (time_interleaved). On a GPU one after the other,
    # each freed before the next is built, so that its peak memory is its own.
    groups = [[p] for p in providers] if device.type == "cuda" else [providers]
    for bench in cfg.benchmarks:
        for group in groups:
            for provider, measured in zip(group, measure(bench, group)):
                emit(bench, provider, measured)
    if bar is not None:
        bar.close()
    return rows


def check_output(path: str) -> None:
    """Make sure rows can be appended to ``path`` (its folder made); an OSError names the path."""
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a folder, expected a JSONL file", path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a"):
        pass


def append_rows(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str) + "\n")
    except OSError as exc:
        if exc.filename is None:  # e.g. a full disk while writing
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'benchmark':<26} {'size':<24} {'provider':<14} {'median ms':>10} {'speedup':>8} {'graph MiB':>10} " \
           f"{'launches':>8}  note"
    lines = [f"device: {rows[0]['device']}" if rows else "no rows", head, "-" * len(head)]
    for r in rows:
        med = f"{r['median_s'] * 1e3:.3f}" if r.get("median_s") is not None else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None and r["provider"] != "reference" else "-"
        mem = f"{r['memory_bytes'] / 2 ** 20:.1f}" if r.get("memory_bytes") is not None else "-"
        la = str(r["launches"]) if r.get("launches") is not None else "-"
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"first call incl. compile {r['compile_s']:.1f} s")
        if r["benchmark"] in ROOFLINE:
            if r.get("gflops") is not None:
                notes.append(f"{r['gflops']:.1f} GFLOP/s")
            if r.get("bandwidth_gbs") is not None:
                notes.append(f"{r['bandwidth_gbs']:.1f} GB/s")
        else:
            if r.get("bandwidth_fraction") is not None:
                notes.append(f"{r['bandwidth_gbs']:.1f} GB/s = {100 * r['bandwidth_fraction']:.0f}% of a copy of "
                             f"equal bytes")
            if r.get("flops"):  # 0: no convolution or matrix product (elementwise flops are not counted)
                frac = (f" = {100 * r['gflops_fraction']:.1f}% of the FMA peak" if r.get("gflops_fraction") is not None
                        else "")
                ai = (f", {r['arithmetic_intensity']:.2f} flop/B{' (est.)' if r.get('traffic_estimated') else ''}"
                      if r.get("arithmetic_intensity") is not None else "")
                notes.append(f"{r['gflops']:.2f} GFLOP/s{frac}{ai}")
        if r.get("note"):
            notes.append(str(r["note"]))
        lines.append(f"{r['benchmark']:<26} {r['size']:<24} {r['provider']:<14} {med:>10} {sp:>8} {mem:>10} "
                     f"{la:>8}  {'; '.join(notes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--data-parallel-worker":
        _data_parallel_worker(sys.argv[2:])
    else:
        raise SystemExit("run the benchmarks with: pynas bench")
