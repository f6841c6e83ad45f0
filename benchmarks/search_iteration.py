"""Time one DARTS CNN search iteration (architect step + weight step), as the search loop runs it
(the iteration of ``pynas bench``'s cnn_search benchmarks, for one backend and without the others).

    python benchmarks/search_iteration.py --backend reference --threads 2

Prints the median / min / max seconds per iteration for first and second order.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pynas
from pynas.bench import add_search_size_arguments, search_case


def main():
    p = argparse.ArgumentParser()
    add_search_size_arguments(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with pynas.use_backend(args.backend):
        for unrolled in (False, True):
            size = dict(C=args.C, layers=args.layers, batch=args.batch, image=args.size)
            step = search_case(size, torch.device("cpu"), unrolled=unrolled, compiled=False).step
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
