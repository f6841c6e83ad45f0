"""The ``pynas`` command line: ``pynas search cnn``, ``pynas search rnn``, ``pynas bench``, ``pynas info``."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Callable, List, Optional

from .search import CNNSearchConfig


def _add_order_args(p: argparse.ArgumentParser, d) -> None:
    """First or second order, and the finite-difference radius (both search spaces)."""
    order = p.add_mutually_exclusive_group()
    order.add_argument("--unrolled", "--second-order", dest="unrolled", action="store_true",
                       help="second-order (unrolled) architecture gradient")
    order.add_argument("--first-order", dest="unrolled", action="store_false", help="first order (default)")
    p.set_defaults(unrolled=d.unrolled)
    p.add_argument("--fd-r", type=float, default=d.fd_r, help="finite-difference radius r of the second-order step")


def _add_run_args(p: argparse.ArgumentParser, d) -> None:
    """Seed, length, device, backend, threads, run folder and resume (both search spaces)."""
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on iterations per epoch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, help="auto, reference, cpu, triton, cuda (default: $PYNAS_BACKEND or auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save", default=None, help="run folder for checkpoint, log and genotype (default runs/<time>)")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_cnn_args(p: argparse.ArgumentParser) -> None:
    d = CNNSearchConfig()
    p.add_argument("--data", choices=("shapes10", "cifar10"), default=d.data,
                   help="shapes10: embedded synthetic set (no download); cifar10: python batches from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--num-train", type=int, default=None, help="images of the training set to use (both halves)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate)
    p.add_argument("--learning-rate-min", "--lr-min", type=float, default=d.learning_rate_min)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--init-channels", type=int, default=d.init_channels)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--train-portion", type=float, default=d.train_portion)
    _add_order_args(p, d)
    p.add_argument("--arch-learning-rate", "--arch-lr", type=float, default=d.arch_learning_rate)
    p.add_argument("--arch-weight-decay", type=float, default=d.arch_weight_decay)
    _add_run_args(p, d)


def _add_rnn_args(p: argparse.ArgumentParser) -> None:
    from .rnn.search import RNNSearchConfig

    d = RNNSearchConfig()
    p.add_argument("--data", choices=("stdlib", "ptb"), default=d.data,
                   help="stdlib: embedded word-level corpus built at run time from the Python standard library's "
                        "docstrings and comments (no download); ptb: ptb.{train,valid,test}.txt from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with ptb.train.txt, ptb.valid.txt, ptb.test.txt")
    p.add_argument("--max-tokens", type=int, default=None, help="stdlib corpus: cap on its size in tokens")
    p.add_argument("--emsize", type=int, default=d.emsize, help="embedding size (= --nhid)")
    p.add_argument("--nhid", type=int, default=d.nhid, help="hidden size")
    p.add_argument("--nhidlast", type=int, default=-1, help="hidden size of the last layer (default: --emsize)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient clip (weights and the virtual step)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--bptt", type=int, default=d.bptt, help="sequence length")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout of the cell's output")
    p.add_argument("--dropouth", type=float, default=d.dropouth, help="dropout of the hidden states in the cell")
    p.add_argument("--dropoutx", type=float, default=d.dropoutx, help="dropout of the cell's input")
    p.add_argument("--dropouti", type=float, default=d.dropouti, help="dropout of the embedding output")
    p.add_argument("--dropoute", type=float, default=d.dropoute, help="dropout of whole words in the embedding")
    p.add_argument("--alpha", type=float, default=d.alpha, help="activation regularisation")
    p.add_argument("--beta", type=float, default=d.beta, help="temporal activation regularisation")
    p.add_argument("--wdecay", type=float, default=d.wdecay, help="weight decay")
    _add_order_args(p, d)
    p.add_argument("--arch-lr", type=float, default=d.arch_lr)
    p.add_argument("--arch-wdecay", type=float, default=d.arch_wdecay)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    _add_run_args(p, d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pynas", description="Fast differentiable architecture search (DARTS).")
    sub = parser.add_subparsers(dest="command", required=True)
    search = sub.add_parser("search", help="run a DARTS search")
    spaces = search.add_subparsers(dest="space", required=True)
    _add_cnn_args(spaces.add_parser("cnn", help="DARTS CNN search space"))
    _add_rnn_args(spaces.add_parser("rnn", help="DARTS RNN search space (word-level language model)"))
    sub.add_parser("info", help="backends and build facts")
    bench = sub.add_parser("bench", help="benchmarks: reference vs torch.compile vs pynas, side by side")
    bench.add_argument("--size", choices=("cpu", "gpu", "tiny"), default=None,
                       help="cpu: C=8 L=5 B=16; gpu: the DARTS default C=16 L=8 B=64; tiny: a smoke test "
                            "(default: by --device)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--benchmarks", default=None,
                       help="comma-separated names or groups (search, cnn, rnn, mixed_sum, micro); default all")
    bench.add_argument("--providers", default="reference,compiled,pynas",
                       help="comma-separated: reference, compiled, pynas, pynas-<backend>")
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--compile-timeout", type=float, default=600.0,
                       help="skip torch.compile (with a note) when its first call takes longer (seconds)")
    bench.add_argument("--out", default=None,
                       help="JSONL file the rows are appended to (default benchmarks/results/<device>.jsonl)")
    bench.add_argument("--no-progress", action="store_true")
    return parser


def _run_folder(args, space: str):
    """The run folder (made) and a logger that prints and appends to its log.txt."""
    save = args.save
    if save is None:
        if args.resume is not None:
            save = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
        else:
            save = os.path.join("runs", f"search-{space}-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(save, exist_ok=True)
    log_path = os.path.join(save, "log.txt")

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_path, "a") as fh:
            fh.write(line + "\n")

    return save, log


def _set_threads(threads) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {threads}")
        torch.set_num_threads(threads)


def _run_search(args, space: str, cfg, check: Callable, run: Callable, about: str = "") -> int:
    """Check the settings (before a run folder is made), make the run folder, run, print the genotype."""
    import json

    import torch

    if args.resume is None:
        check(cfg)
    save, log = _run_folder(args, space)
    log(f"pynas search {space}: run folder {save}; {about}backend {cfg.backend}; "
        f"{'second' if cfg.unrolled else 'first'} order; torch threads {torch.get_num_threads()}")
    result = run(cfg, save_dir=save, resume=args.resume, log=log, progress=not args.no_progress)
    print("genotype: " + json.dumps(result["genotype"]), flush=True)
    return 0


def _search_rnn(args) -> int:
    from . import _backend
    from .rnn.search import RNNSearchConfig, check_config, run_rnn_search

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    nhidlast = args.emsize if args.nhidlast < 0 else args.nhidlast
    cfg = RNNSearchConfig(
        data=args.data, data_dir=args.data_dir, max_tokens=args.max_tokens, emsize=args.emsize, nhid=args.nhid,
        nhidlast=nhidlast, lr=args.lr, clip=args.clip, epochs=args.epochs, batch_size=args.batch_size,
        bptt=args.bptt, dropout=args.dropout, dropouth=args.dropouth, dropoutx=args.dropoutx,
        dropouti=args.dropouti, dropoute=args.dropoute, alpha=args.alpha, beta=args.beta, wdecay=args.wdecay,
        unrolled=args.unrolled, fd_r=args.fd_r, arch_lr=args.arch_lr, arch_wdecay=args.arch_wdecay,
        eval_batch_size=args.eval_batch_size, seed=args.seed, steps_per_epoch=args.steps_per_epoch,
        device=args.device, backend=backend)
    return _run_search(args, "rnn", cfg, check_config, run_rnn_search, f"data {cfg.data}; ")


def _search_cnn(args) -> int:
    from . import _backend
    from .search import _check_config, run_search

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    cfg = CNNSearchConfig(
        data=args.data, data_dir=args.data_dir, num_train=args.num_train, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, learning_rate_min=args.learning_rate_min,
        momentum=args.momentum, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        init_channels=args.init_channels, layers=args.layers, train_portion=args.train_portion,
        unrolled=args.unrolled, fd_r=args.fd_r, arch_learning_rate=args.arch_learning_rate,
        arch_weight_decay=args.arch_weight_decay, seed=args.seed, steps_per_epoch=args.steps_per_epoch,
        device=args.device, backend=backend)
    return _run_search(args, "cnn", cfg, _check_config, run_search)


def _bench(args) -> int:
    import re

    import torch

    from . import bench

    _set_threads(args.threads)
    names = []
    for item in (args.benchmarks.split(",") if args.benchmarks else list(bench.BENCHMARKS)):
        item = item.strip()
        if item == "search":
            names += list(bench.MACRO)
        elif item in ("cnn", "rnn"):
            names += [b for b in bench.MACRO if b.startswith(item + "_")]
        elif item == "mixed_sum":
            names += [b for b in bench.MICRO if b.startswith("mixed_sum")]
        elif item == "micro":
            names += list(bench.MICRO)
        elif item:
            names.append(item)
    device = torch.device(args.device)
    cfg = bench.BenchConfig(size=args.size or ("gpu" if device.type == "cuda" else "cpu"), device=args.device,
                            benchmarks=names, providers=[p.strip() for p in args.providers.split(",") if p.strip()],
                            repeats=args.repeats, warmup=args.warmup, compile_timeout=args.compile_timeout)
    out = args.out
    if out is None:
        label = re.sub(r"[^A-Za-z0-9]+", "-", bench.device_name(device)).strip("-").lower()
        out = os.path.join("benchmarks", "results", f"{label}.jsonl")
    rows = bench.run(cfg, progress=not args.no_progress, on_row=lambda row: bench.append_rows([row], out))
    print(bench.format_table(rows))
    print(f"rows appended to {out}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            from .info import main as info_main

            return info_main()
        if args.command == "bench":
            return _bench(args)
        if args.command == "search" and args.space == "cnn":
            return _search_cnn(args)
        if args.command == "search" and args.space == "rnn":
            return _search_rnn(args)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"pynas: error: {exc}", file=sys.stderr)
        return 2
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
