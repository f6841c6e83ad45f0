"""Time of a second-order search iteration spent outside its five forward/backward passes.

Times (perf_counter, CPU) every pass over the weights that is not a forward or backward: the snapshot
copies, the virtual step, the norm, the two perturbations, the restore (pynas.ops.multi_tensor and the
architect), the arch Adam step, and the weight step (clip_grad_norm_ + SGD). Reports their sum per
iteration and its share of the iteration.

Usage: python benchmarks/second_order_overhead.py [--threads 2] [--repeats 5] [--backend auto]
"""
import argparse
import statistics
import time

import torch
from torch import nn

import pynas
from pynas.strategies import darts as arch_mod
from pynas import bench
from pynas.ops import multi_tensor as mt

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--backend", default="auto")
args = parser.parse_args()
torch.set_num_threads(args.threads)

spent = {"t": 0.0}


def timed(fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent["t"] += time.perf_counter() - t0
    return wrapper


for name in ("virtual_step_", "sum_squares", "perturb_", "copy_"):
    setattr(mt, name, timed(getattr(mt, name)))
arch_mod.CNNArchitect._snapshot = timed(arch_mod.CNNArchitect._snapshot)
nn.utils.clip_grad_norm_ = timed(nn.utils.clip_grad_norm_)
torch.optim.SGD.step = timed(torch.optim.SGD.step)
torch.optim.Adam.step = timed(torch.optim.Adam.step)

with pynas.use_backend(args.backend):
    case = bench.search_case(bench.SIZES["cpu"]["search"], torch.device("cpu"), unrolled=True, compiled=False)
    for _ in range(2):
        case.step()
    totals, extra = [], []
    for _ in range(args.repeats):
        spent["t"] = 0.0
        t0 = time.perf_counter()
        case.step()
        totals.append(time.perf_counter() - t0)
        extra.append(spent["t"])
it, ex = statistics.median(totals), statistics.median(extra)
print(f"second-order iteration (C=8, 5 layers, batch 16, 32x32, {args.threads} threads, backend {args.backend}): "
      f"median {it * 1e3:.0f} ms; outside the 5 passes {ex * 1e3:.1f} ms = {100 * ex / it:.2f} % "
      f"(multi-tensor steps, snapshots, arch Adam, clip + SGD)")
