"""pynas.accelerate on another codebase's own supernet, from a checkout of that code (nothing of it is copied here).

    python benchmarks/accelerate_original.py --code PATH [--threads 2]

PATH is a folder holding the codebase's ``model_search.py`` (with its ``operations.py`` and ``genotypes.py``) whose
``Network(C, num_classes, layers, criterion)`` is a DARTS supernet: the original DARTS code's ``cnn/`` folder, or
PC-DARTS's root. Its ``.cuda()`` calls become no-ops so that it runs on the CPU. This imports and runs that code:
point it only at code you trust.

1. Equality, float64, a small input (4 images of 16x16): the logits, the gradients of every weight and alpha, and
   the running statistics after one training pass, accelerated against the code's own forward.
2. Speed, float32 at the CPU size (C=8, 5 layers, batch 16, 32x32): one forward and backward (gradients of the
   weights and the alphas), median of 5 after one warm-up, before and after ``pynas.accelerate``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time

import torch
from torch import nn

import pynas


def _network(C, layers, dtype):
    ms = importlib.import_module("model_search")
    net = ms.Network(C, 10, layers, nn.CrossEntropyLoss()).to(dtype)
    for a in net.arch_parameters():
        a.data = a.data.to(dtype)
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", required=True, help="folder with the codebase's model_search.py")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.code, "model_search.py")):
        raise SystemExit(f"--code: no model_search.py in {args.code}")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.code))
    torch.Tensor.cuda = lambda self, *a, **k: self  # the code moves its alphas with .cuda(): keep them here
    crit = nn.CrossEntropyLoss()

    torch.manual_seed(0)
    net = _network(8, 5, torch.float64)
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    t0 = time.perf_counter()
    report = pynas.accelerate(net, example_inputs=x)
    print(f"{report.summary()} ({time.perf_counter() - t0:.1f} s to find and prove them)")
    print(" ", report.entries[0].line())
    out, out_ref = net(x), ref(x)
    crit(out, y).backward()
    crit(out_ref, y).backward()
    d_logits = float((out - out_ref).detach().abs().max())
    d_alpha = max(float((a.grad - b.grad).abs().max()) for a, b in zip(net.arch_parameters(), ref.arch_parameters()))
    d_w = max(float((p.grad - q.grad).abs().max()) for p, q in zip(net.parameters(), ref.parameters())
              if q.grad is not None)
    d_bn = max(float((p - q).abs().max()) for p, q in zip(net.buffers(), ref.buffers()) if p.is_floating_point())
    print(f"float64 max differences: logits {d_logits:.1e}, alpha gradients {d_alpha:.1e}, weight gradients "
          f"{d_w:.1e}, running statistics {d_bn:.1e}")

    torch.manual_seed(0)
    net = _network(8, 5, torch.float32)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))

    def step():
        loss = crit(net(x), y)
        torch.autograd.grad(loss, list(net.parameters()) + list(net.arch_parameters()))

    def median_s():
        step()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    eager = median_s()
    pynas.accelerate(net, example_inputs=x)
    fast = median_s()
    print(f"forward+backward at C=8, 5 layers, batch 16, 32x32, {args.threads} threads: own forward "
          f"{eager * 1000:.0f} ms, accelerated {fast * 1000:.0f} ms ({eager / fast:.2f}x)")


if __name__ == "__main__":
    main()
