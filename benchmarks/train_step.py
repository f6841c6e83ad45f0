"""Time one training step of the derived DARTS CNN (pynas.train.cnn's step: forward with drop path and the
auxiliary head, backward, clip, SGD): eager PyTorch (backend reference), pynas's kernels (backend cpu: the
separable and dilated convs through pynas.ops.sep_conv), and the eager model under torch.compile.

    python benchmarks/train_step.py --threads 2 --C 16 --layers 8 --batch 64

Prints the median / min / max seconds per step of each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pynas

from pynas.cnn import PUBLISHED, EvalNetwork


def make_step(model, opt, x, y):
    criterion = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        logits, aux = model(x)
        loss = criterion(logits, y) + 0.4 * criterion(aux, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    return step


def time_step(step, repeats, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genotype", default="DARTS_V2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for mode in ("eager", "pynas") + (() if args.no_compile else ("compiled",)):
        torch.manual_seed(0)
        model = EvalNetwork(args.C, 10, args.layers, True, PUBLISHED[args.genotype])
        model.drop_path_prob = 0.1
        opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        t0 = time.perf_counter()
        if mode == "compiled":
            model.compile()
        with pynas.use_backend("cpu" if mode == "pynas" else "reference"):
            times = time_step(make_step(model, opt, x, y), args.repeats, args.warmup)
        setup = time.perf_counter() - t0 - sum(times)
        print(f"{mode:8s} {args.genotype} C={args.C} layers={args.layers} batch={args.batch}, {args.threads} threads: "
              f"median {statistics.median(times):.3f} s per step (min {min(times):.3f}, max {max(times):.3f}, "
              f"n={len(times)}; warm-up and compile {setup:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
