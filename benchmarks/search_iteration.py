"""Time one DARTS CNN search iteration (architect step + weight step), as the search loop runs it.

    python benchmarks/search_iteration.py --backend reference --threads 2

Prints the median / min / max seconds per iteration for first and second order.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pynas
from pynas.architect import Architect
from pynas.cnn import Network


def make_iteration(C, layers, batch, size, unrolled, seed=0):
    torch.manual_seed(seed)
    model = Network(C, 10, layers, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(model, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    xv, yv = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        arch.step(x, y, xv, yv, 0.025, opt, unrolled)
        opt.zero_grad()
        loss = model._loss(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with pynas.use_backend(args.backend):
        for unrolled in (False, True):
            step = make_iteration(args.C, args.layers, args.batch, args.size, unrolled)
            for _ in range(args.warmup):
                step()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            print(f"{'second' if unrolled else 'first'}-order iteration, backend {args.backend}, "
                  f"C={args.C} layers={args.layers} batch={args.batch} {args.size}x{args.size}, "
                  f"{args.threads} threads: median {statistics.median(times):.3f} s "
                  f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})", flush=True)


if __name__ == "__main__":
    main()
