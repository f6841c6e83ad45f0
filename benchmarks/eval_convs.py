"""Whether the search's CPU convolution kernels pay in the derived CNN: the depthwise conv of ReLU(x) and the
1x1 conv, forward and backward, pynas._C (cnn_edge_dw_*, cnn_edge_pw_*) against torch's F.conv2d at the
shapes of the evaluation network (batch 64; C=16, 8 layers: 16, 32, 64 channels at 32, 16, 8 pixels).

    python benchmarks/eval_convs.py --threads 2

Prints, per shape, the median milliseconds of forward + backward of each and their ratio; the results are
checked equal first.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from pynas import _ext
from train_step import time_step  # benchmarks/ is the script's folder


def timed(fn, repeats=20, warmup=3):
    return 1e3 * statistics.median(time_step(fn, repeats, warmup))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    k = _ext.get()
    e = torch.empty(0)
    for C, H in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(args.batch, C, H, H)
        w = torch.randn(C, 1, 3, 3)
        g = torch.randn(args.batch, C, H, H)
        (u,) = k.cnn_edge_dw_forward(x, [w], [1], [1], [1], 1, e, e)
        torch.testing.assert_close(u, F.conv2d(F.relu(x), w, padding=1, groups=C), rtol=1e-4, atol=1e-4)

        def torch_dw():
            xr = x.detach().requires_grad_(True)
            wr = w.detach().requires_grad_(True)
            F.conv2d(F.relu(xr), wr, padding=1, groups=C).backward(g)

        def pynas_dw():
            k.cnn_edge_dw_forward(x, [w], [1], [1], [1], 1, e, e)
            k.cnn_edge_dw_backward(x, [w], [g], [1], [1], [1], 1, e, e, True)

        wp = torch.randn(C, C, 1, 1)
        p_ = k.cnn_edge_pw_forward(x, wp, False, 1e-5, 0.1, None, None)[0]
        torch.testing.assert_close(p_, F.conv2d(x, wp), rtol=1e-4, atol=1e-4)

        def torch_pw():
            xr = x.detach().requires_grad_(True)
            wr = wp.detach().requires_grad_(True)
            F.conv2d(xr, wr).backward(g)

        def pynas_pw():
            k.cnn_edge_pw_forward(x, wp, False, 1e-5, 0.1, None, None)
            k.cnn_edge_pw_backward(g, x, wp, True)

        for name, a, b in (("depthwise 3x3 of relu(x)", torch_dw, pynas_dw), ("1x1 conv", torch_pw, pynas_pw)):
            ta, tb = timed(a), timed(b)
            print(f"{name:26s} {args.batch}x{C}x{H}x{H}: torch {ta:7.3f} ms, pynas {tb:7.3f} ms forward+backward "
                  f"({ta / tb:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
