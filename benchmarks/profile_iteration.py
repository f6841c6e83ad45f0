"""Where an eager DARTS CNN forward+backward spends its time, grouped by kind of op.

    python benchmarks/profile_iteration.py --backend reference --threads 2

Runs the profiler over a few training forward+backward passes of the search network (CPU size by
default) and prints the share of self CPU time of each group (convolutions and their backward,
pooling, BatchNorm, the mixing arithmetic, the rest), then the top ops.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import pynas
from pynas.bench import add_search_size_arguments
from pynas.cnn import Network

GROUPS = (
    ("convolutions, depthwise and 1x1 (+ backward)", ("convolution", "conv2d", "mkldnn_conv", "conv_depthwise",
                                                "_slow_conv", "thnn_conv")),
    ("pooling (+ backward)", ("pool",)),
    ("batch norm (+ backward)", ("batch_norm",)),
    ("mixing (mixed_sum, mul, add, softmax)", ("mixed_sum", "mixedsum", "aten::mul", "aten::add", "softmax")),
    ("relu", ("relu", "threshold", "clamp_min")),
    ("copies, cat, zeros", ("copy_", "cat", "zero", "fill_", "empty", "clone", "contiguous")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for label, keys in GROUPS:
        if any(k in low for k in keys):
            return label
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_size_arguments(p)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Network(args.C, 10, args.layers)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    with pynas.use_backend(args.backend):
        model._loss(x, y).backward()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.passes):
                model.zero_grad(set_to_none=True)
                model._loss(x, y).backward()
    totals = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("autograd::") or evt.key.startswith("ProfilerStep"):
            continue
        totals[group_of(evt.key)] += evt.self_cpu_time_total
    whole = sum(totals.values())
    print(f"backend {args.backend}, C={args.C} layers={args.layers} batch={args.batch} {args.size}x{args.size}, "
          f"{args.threads} threads: {whole / 1e3 / args.passes:.1f} ms of self CPU time per forward+backward")
    for label, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * t / whole:5.1f} %  {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
