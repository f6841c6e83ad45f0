"""A trial on the CNN space: the network a genotype derives, trained for a step budget, scored on held-out images.

Search by trials (evolution with progressive dynamic hurdles, its random-search control: :mod:`pynas.trials`)
trains many candidates briefly instead of one supernet. :func:`train_genotype` trains the DARTS evaluation network
of a genotype (:class:`pynas.cnn.model_eval.EvalNetwork`, no auxiliary head, no drop path) from step ``start`` to
step ``end`` and returns its validation accuracy (the fitness, higher is better).

* Data: the embedded ``shapes10`` images (generated at run time): the first ``num_train`` images of its training
  split train, the next ``num_valid`` score (eval mode, no augmentation); the test split is never used.
* Step i's batch: ``batch_size`` training images drawn with replacement by a generator seeded from
  ``(seed, i)``, with DARTS's augmentation (random crop with padding 4, horizontal flip). So the batch of a step
  does not depend on how the run was split into budgets.
* SGD (lr 0.025, momentum 0.9, weight decay 3e-4, gradient norm clipped to 5), the learning rate cosine-annealed
  to 0 over ``total_steps`` (the schedule of the largest budget any candidate may reach): a candidate trained to
  s0 and later continued to s0 + s1 follows the run trained to s0 + s1 in one go, bit for bit.
* ``start > 0`` continues from ``checkpoint``, written by the call that ended at ``start`` (weights, BatchNorm
  statistics, optimizer state); each call ends by writing it (atomically) at ``end``. The network is built with
  ``torch.manual_seed(seed)``.

Everything is a module-level function of plain arguments, so that a trial runs in another process (Ray).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..search.checkpoint import atomic_save, checkpoint_checksum, load_checkpoint
from ..search.config import check_number, check_positive_int
from ..search.trials import check_span
from . import genotypes
from .data import ImageData, augment_batch, make_shapes10
from .model_eval import EvalNetwork, count_parameters

_FORMAT = "pynas-cnn-trial"


@dataclass
class CNNTrialConfig:
    """The settings of every CNN trial of a search (a small evaluation network on ``shapes10``)."""

    init_channels: int = 8
    layers: int = 5
    batch_size: int = 32
    learning_rate: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    total_steps: int = 600
    num_train: int = 2000
    num_valid: int = 500
    data_seed: int = 0  # the shapes10 images
    threads: int = 1

    def check(self) -> None:
        for name in ("init_channels", "layers", "batch_size", "total_steps", "num_train", "num_valid", "threads"):
            check_positive_int(name, getattr(self, name))
        if self.init_channels % 2:
            raise ValueError(f"init_channels: expected an even channel count, got {self.init_channels}")
        check_number("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_number("momentum", self.momentum, 0.0, 1.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("grad_clip", self.grad_clip, 0.0, low_open=True)
        if not isinstance(self.data_seed, int) or isinstance(self.data_seed, bool) or self.data_seed < 0:
            raise ValueError(f"data_seed: expected a non-negative int, got {self.data_seed!r}")


_DATA: Dict[Tuple[int, int], ImageData] = {}


def _data(cfg: CNNTrialConfig) -> ImageData:
    """shapes10's training split (the first ``num_train + num_valid`` images), built once per process."""
    key = (cfg.num_train + cfg.num_valid, cfg.data_seed)
    if key not in _DATA:
        _DATA[key] = make_shapes10(key[0], seed=cfg.data_seed)
    return _DATA[key]


def _lr(cfg: CNNTrialConfig, step: int) -> float:
    return 0.5 * cfg.learning_rate * (1.0 + math.cos(math.pi * step / cfg.total_steps))


def _batch(data: ImageData, cfg: CNNTrialConfig, seed: int, step: int):
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    idx = torch.randint(0, cfg.num_train, (cfg.batch_size,), generator=g)
    return augment_batch(data.images[idx], g), data.labels[idx]


@torch.no_grad()
def _accuracy(model: nn.Module, data: ImageData, cfg: CNNTrialConfig) -> float:
    model.eval()
    correct = 0
    for lo in range(cfg.num_train, cfg.num_train + cfg.num_valid, 256):
        hi = min(lo + 256, cfg.num_train + cfg.num_valid)
        logits, _ = model(data.images[lo:hi])
        correct += int((logits.argmax(1) == data.labels[lo:hi]).sum())
    model.train()
    return correct / cfg.num_valid


def train_genotype(genotype_json: str, start: int, end: int, checkpoint: str, seed: int,
                   cfg: CNNTrialConfig) -> dict:
    """Train the genotype's network from step ``start`` to ``end`` (module docstring) and score it.

    Returns ``{"fitness": validation accuracy, "accuracy", "steps": end, "params", "seconds"}``; writes
    ``checkpoint`` at ``end``."""
    cfg.check()
    check_span(start, end, cfg.total_steps)
    genotype = genotypes.from_json(genotype_json)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(seed)
        model = EvalNetwork(cfg.init_channels, 10, cfg.layers, False, genotype)
        opt = torch.optim.SGD(model.parameters(), cfg.learning_rate, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        if start > 0:
            ckpt = load_checkpoint(checkpoint, fmt=_FORMAT, what="checkpoint")
            if ckpt.get("step") != start or ckpt.get("genotype") != genotype_json:
                raise ValueError(f"checkpoint: {checkpoint} holds step {ckpt.get('step')!r} of another run, not "
                                 f"step {start} of this genotype")
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        data = _data(cfg)
        model.train()
        for step in range(start, end):
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            x, y = _batch(data, cfg, seed, step)
            opt.zero_grad(set_to_none=True)
            logits, _ = model(x)
            F.cross_entropy(logits, y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        accuracy = _accuracy(model, data, cfg)
        ckpt = {"format": _FORMAT, "version": 2, "config": dataclasses.asdict(cfg), "step": end,
                "genotype": genotype_json, "model": model.state_dict(), "optimizer": opt.state_dict()}
        ckpt["checksum"] = checkpoint_checksum(ckpt)
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
        atomic_save(ckpt, checkpoint)
    finally:
        torch.set_num_threads(threads)
    return {"fitness": accuracy, "accuracy": accuracy, "steps": end, "params": count_parameters(model),
            "seconds": time.perf_counter() - t0}
