"""The CNN search: CIFAR-10 (or the synthetic shapes10), the search network of a method, its settings.

The training data is split in two halves: the first trains the weights w, the second the architecture. Each
iteration takes a (train, valid) batch pair and hands it to the method (``method``, one file in
pynas.strategies): DARTS's architect steps alpha on the pair, first or second order, then SGD steps the weights
on the train batch; I-DARTS, PC-DARTS, GDAS and random search with weight sharing change the supernet's weights
and the steps (pynas.strategies.idarts, pcdarts, gdas, rsws). ``CNNSearchConfig.for_method(name, ...)`` starts
from the method's own defaults (its paper's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..cnn import to_json
from ..cnn.data import ImageData, batches, load_cifar10, make_shapes10
from ..strategies import CNN_METHODS, cnn_method
from .config import (HessianSettings, _is_int, check_flag, check_hessian_settings, check_number,
                     check_optional_int, check_place, check_positive_int, check_seed)
from .loop import SearchCheckpoints, check_tensorboard, data_parallel, epoch_bar, start_or_resume


@dataclass
class CNNSearchConfig(HessianSettings):
    """Settings of a CNN search; the defaults are DARTS's."""

    data: str = "shapes10"
    data_dir: Optional[str] = None
    num_train: Optional[int] = None  # images used from the training set (None: all; shapes10: 10000)
    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 0.025
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    init_channels: int = 16
    layers: int = 8
    train_portion: float = 0.5
    unrolled: bool = False
    fd_r: float = 0.01
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    seed: int = 2
    steps_per_epoch: Optional[int] = None  # cap on iterations per epoch (None: a full pass)
    device: str = "cpu"
    backend: str = "auto"
    tensorboard: bool = False  # per-epoch scalars as TensorBoard event files in <run folder>/tensorboard
    # the method and its settings (each read by its method only; CNNSearchConfig.for_method sets its defaults)
    method: str = "darts"  # darts, idarts, pcdarts, gdas, rsws
    warmup_epochs: int = 0  # epochs without architecture steps (PC-DARTS: 15)
    nesterov: bool = False  # Nesterov momentum of the weight SGD (GDAS: on)
    partial_channels: int = 4  # PC-DARTS's K: 1/K of each edge's channels go through its candidates
    tau_max: float = 10.0  # GDAS: the Gumbel-softmax temperature of the first epoch, falling linearly to
    tau_min: float = 0.1  # tau_min in the last
    gdas_unselected: str = "scalar"  # GDAS: 'scalar' (the unselected candidates enter as their hard weights) or 'drop'
    distinct_inputs: bool = False  # I-DARTS, GDAS genotype: the two kept (edge, op) pairs on distinct inputs
    rsws_path: str = "single"  # RSWS: 'single' (only the sampled path runs) or 'supernet' (all run, one-hot weights)
    allow_none: bool = True  # RSWS: 'none' among the sampled operations (Li and Talwalkar's CNN sampler)
    rsws_samples: int = 1000  # RSWS: architectures ranked with the shared weights after training
    rsws_eval_batches: int = 10  # RSWS: validation batches scoring each of them
    rsws_top: int = 10  # RSWS: the best of them re-scored on the whole validation half

    @classmethod
    def for_method(cls, method: str = "darts", **settings) -> "CNNSearchConfig":
        """The settings of a ``method`` search: its paper's defaults, then ``settings``."""
        if method not in CNN_METHODS:
            raise ValueError(f"method: expected one of {', '.join(CNN_METHODS)}, got {method!r}")
        return cls(**{**cnn_method(method).DEFAULTS, **settings, "method": method})


def _check_config(cfg: CNNSearchConfig) -> None:
    positive_ints = ("epochs", "batch_size", "init_channels", "layers")
    for name in positive_ints:
        check_positive_int(name, getattr(cfg, name))
    if cfg.num_train is not None and (not _is_int(cfg.num_train) or cfg.num_train < 2):
        raise ValueError(f"num_train: need at least 2 images (one per half), got {cfg.num_train!r}")
    check_optional_int("steps_per_epoch", cfg.steps_per_epoch)
    check_number("train_portion", cfg.train_portion, 0.0, 1.0, low_open=True, high_open=True)
    if cfg.data not in ("shapes10", "cifar10"):
        raise ValueError(f"data: expected 'shapes10' or 'cifar10', got {cfg.data!r}")
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        raise ValueError(f"data_dir: expected a folder name, got {cfg.data_dir!r}")
    for name in ("learning_rate", "fd_r", "arch_learning_rate", "grad_clip"):
        check_number(name, getattr(cfg, name), low=0.0, low_open=True)
    lr = float(cfg.learning_rate)
    check_number("learning_rate_min", cfg.learning_rate_min, 0.0, lr, what=" (at most learning_rate)")
    check_number("momentum", cfg.momentum, 0.0, 1.0, high_open=True)
    for name in ("weight_decay", "arch_weight_decay"):
        check_number(name, getattr(cfg, name), low=0.0)
    check_flag("unrolled", cfg.unrolled)
    check_seed(cfg.seed)
    check_place(cfg)
    check_hessian_settings(cfg)
    check_tensorboard(cfg.tensorboard)
    if cfg.method not in CNN_METHODS:
        raise ValueError(f"method: expected one of {', '.join(CNN_METHODS)}, got {cfg.method!r}")
    check_positive_int("warmup_epochs", cfg.warmup_epochs, minimum=0)
    check_flag("nesterov", cfg.nesterov)
    if cfg.nesterov and not cfg.momentum > 0:
        raise ValueError(f"nesterov: Nesterov momentum needs momentum > 0, got momentum {cfg.momentum!r}")
    check_positive_int("partial_channels", cfg.partial_channels)
    check_number("tau_max", cfg.tau_max, low=0.0, low_open=True)
    check_number("tau_min", cfg.tau_min, 0.0, float(cfg.tau_max), low_open=True, what=" (at most tau_max)")
    for name, choices in (("gdas_unselected", ("scalar", "drop")), ("rsws_path", ("single", "supernet"))):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    check_flag("distinct_inputs", cfg.distinct_inputs)
    check_flag("allow_none", cfg.allow_none)
    for name in ("rsws_samples", "rsws_eval_batches", "rsws_top"):
        check_positive_int(name, getattr(cfg, name))
    method = cnn_method(cfg.method)
    if cfg.unrolled and not method.SECOND_ORDER:
        raise ValueError(f"unrolled: {cfg.method} is a first-order method (no second-order step)")
    if cfg.unrolled and cfg.nesterov:
        raise ValueError("nesterov: the second-order step's virtual step is plain momentum SGD's; use --no-nesterov "
                         "with --unrolled")
    method.check_config(cfg)
    if method.HAS_ARCH_STEP and cfg.warmup_epochs >= cfg.epochs:
        raise ValueError(f"warmup_epochs: {cfg.warmup_epochs} warm-up epochs leave no architecture step in "
                         f"{cfg.epochs} epochs; set --warmup-epochs below --epochs")


def load_data(cfg: CNNSearchConfig) -> ImageData:
    if cfg.data == "cifar10":
        data = load_cifar10(cfg.data_dir, train=True)
    else:
        data = make_shapes10(cfg.num_train or 10000, seed=1234)
    if cfg.num_train is not None and cfg.num_train < len(data):
        data = ImageData(data.images[:cfg.num_train], data.labels[:cfg.num_train], data.num_classes, data.name,
                         data.augment)
    return data


def cosine_lr(cfg: CNNSearchConfig, epoch: int) -> float:
    """The weight learning rate of ``epoch`` (cosine annealing from lr to lr_min over the run)."""
    return cfg.learning_rate_min + 0.5 * (cfg.learning_rate - cfg.learning_rate_min) * (
        1 + math.cos(math.pi * epoch / cfg.epochs))


class CNNSearch(SearchCheckpoints):
    """A DARTS CNN search run: build it, call :meth:`run`; see :func:`run_search`."""

    SPACE = "cnn"
    check_config = staticmethod(_check_config)

    def __init__(self, cfg: CNNSearchConfig, save_dir: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True):
        _check_config(cfg)
        self.cfg = cfg
        self.save_dir = save_dir
        self.log = log
        self.progress = progress
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg)
        n = len(self.data)
        split = int(math.floor(cfg.train_portion * n))
        if split < 1 or split >= n:
            raise ValueError(f"num_train: {n} images cannot be split {cfg.train_portion} / {1 - cfg.train_portion}")
        self.train_idx = torch.arange(0, split)
        self.valid_idx = torch.arange(split, n)
        self.criterion = nn.CrossEntropyLoss()
        self.method = cnn_method(cfg.method)(self)
        self.model = self.method.build_model(self.data.num_classes, self.criterion).to(self.device)
        self.dist = data_parallel(self)
        self.optimizer = self.method.build_optimizer(self.model)
        self.architect = self.method.build_architect(self.model)
        self.epoch = 0  # epochs completed
        self.history: list = []
        self._replay_early_stop()

    def genotype_json(self) -> str:
        return to_json(self.method.genotype())

    def finish(self):
        return self.method.finish()

    def final_record(self):
        return self.method.final_record()

    def load_final(self, record) -> None:
        self.method.load_final(record)

    def hessian_loss(self) -> Callable[[], torch.Tensor]:
        """The arch (validation) loss on a fixed batch: the first ``batch_size`` images of the validation half,
        in order, without augmentation; the same batch after every epoch."""
        idx = self.valid_idx[:self.cfg.batch_size]
        x, y = self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)
        return lambda: self.model._loss(x, y)

    # -- the loop ----------------------------------------------------------------
    def _steps(self) -> int:
        bs = self.cfg.batch_size
        n = min(math.ceil(len(self.train_idx) / bs), math.ceil(len(self.valid_idx) / bs))
        return min(n, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else n

    def train_epoch(self, epoch: int):
        cfg, model, dev = self.cfg, self.model, self.device
        lr = cosine_lr(cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        steps = self._steps()
        train_it = batches(self.data, self.train_idx, cfg.batch_size, seed=cfg.seed * 100003 + 2 * epoch)
        valid_it = batches(self.data, self.valid_idx, cfg.batch_size, seed=cfg.seed * 100003 + 2 * epoch + 1)
        bar = epoch_bar(self.progress, steps, epoch, cfg.epochs)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps):
            x, y = next(train_it)
            xv, yv = next(valid_it)
            if self.dist is not None:  # this rank's share of the global batches
                x, y, xv, yv = self.dist.shard(x, y, xv, yv)
            x, y, xv, yv = x.to(dev), y.to(dev), xv.to(dev), yv.to(dev)
            loss, logits = self.method.iteration(x, y, xv, yv, lr, epoch)
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
        if bar is not None:
            bar.close()
        if self.dist is not None:  # the global batches' figures; rank 0's BatchNorm statistics for everyone
            loss_sum, correct, seen = self.dist.sum_floats([loss_sum, correct, seen])
            self.dist.broadcast_(self.model.buffers())
        return lr, loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    @torch.no_grad()
    def evaluate(self, epoch: int):
        """Loss and accuracy on the validation half (eval mode: BatchNorm running statistics)."""
        cfg, model, dev = self.cfg, self.model, self.device
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        limit = self._steps() if cfg.steps_per_epoch else None
        for i, (x, y) in enumerate(batches(self.data, self.valid_idx, cfg.batch_size, seed=epoch)):
            if limit is not None and i >= limit:
                break
            if self.dist is not None:
                x, y = self.dist.shard(x, y)
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss_sum += float(self.criterion(logits, y)) * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        model.train()
        if self.dist is not None:
            loss_sum, correct, seen = self.dist.sum_floats([loss_sum, correct, seen])
        return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    def run_epoch(self, epoch: int):
        """Train and evaluate one epoch: (the history record's figures, their log text)."""
        extra = self.method.start_epoch(epoch)
        lr, train_loss, train_acc = self.train_epoch(epoch)
        val_loss, val_acc = self.evaluate(epoch)
        record = {"lr": lr, **extra, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                  "val_acc": val_acc}
        more = "".join(f"{k} {v:.4g} " for k, v in extra.items())
        return record, (f"lr {lr:.5f} {more}train_loss {train_loss:.4f} train_acc {train_acc:.2f} "
                        f"val_loss {val_loss:.4f} val_acc {val_acc:.2f}")


def run_search(cfg: CNNSearchConfig, save_dir: Optional[str] = None, resume: Optional[str] = None,
               log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or resume) a CNN search; returns the final genotype and the per-epoch history."""
    return start_or_resume(CNNSearch, CNNSearchConfig, cfg, save_dir, resume, log, progress)
