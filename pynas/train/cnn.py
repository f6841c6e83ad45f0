"""Train the network of a CNN genotype from scratch (DARTS's evaluation phase) and test it.

The training set is the whole training split (no validation half); the test split is evaluated after every
epoch (eval mode) and its accuracy at the end is the run's result, as the original evaluation code reports.
Each epoch: the learning rate of the cosine schedule, drop path probability ``drop_path_prob * epoch / epochs``,
then SGD over shuffled batches with random crop (padding 4), horizontal flip and cutout, the loss plus
``auxiliary_weight`` times the auxiliary head's, the gradient clipped to ``grad_clip``. A checkpoint is written
atomically after every epoch; ``resume`` continues exactly (the batches are seeded per epoch, the RNG of drop
path is saved).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..cnn.data import ImageData, augment_batch, load_cifar10, make_shapes10, padding_value
from ..cnn.genotypes import Genotype, from_json, load_genotype, to_json
from ..cnn.model_eval import EvalNetwork, count_parameters
from ..search.config import check_flag, check_number, check_optional_int, check_place, check_positive_int, check_seed
from ..search.loop import check_tensorboard, epoch_bar
from .base import TrainingRun

SHAPES10_TRAIN_SEED, SHAPES10_TEST_SEED = 1234, 4321  # the search's images, and images it never saw


@dataclass
class CNNTrainConfig:
    """Settings of the training of a derived CNN; the defaults are DARTS's (train.py with --auxiliary --cutout)."""

    genotype: str = "DARTS"  # a name of pynas.cnn.PUBLISHED or a genotype JSON file
    data: str = "shapes10"
    data_dir: Optional[str] = None
    num_train: Optional[int] = None  # images of the training split used (None: all; shapes10: 10000)
    num_test: Optional[int] = None  # images of the test split used (None: all; shapes10: 2000)
    epochs: int = 600
    batch_size: int = 96
    learning_rate: float = 0.025
    learning_rate_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    init_channels: int = 36
    layers: int = 20
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    cutout: bool = True
    cutout_length: int = 16
    seed: int = 0
    steps_per_epoch: Optional[int] = None  # cap on training iterations per epoch (None: a full pass)
    device: str = "cpu"
    backend: str = "auto"
    tensorboard: bool = False  # per-epoch scalars as TensorBoard event files in <run folder>/tensorboard


def _check_config(cfg: CNNTrainConfig, check_genotype: bool = True) -> None:
    for name in ("epochs", "batch_size", "init_channels", "layers", "cutout_length"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.init_channels % 2:
        raise ValueError(f"init_channels: expected an even number (a factorized reduce halves it), got "
                         f"{cfg.init_channels}")
    if cfg.layers < 3:
        raise ValueError(f"layers: expected at least 3 (two reduction cells and a normal one), got {cfg.layers}")
    for name in ("num_train", "num_test", "steps_per_epoch"):
        check_optional_int(name, getattr(cfg, name))
    if cfg.data not in ("shapes10", "cifar10"):
        raise ValueError(f"data: expected 'shapes10' or 'cifar10', got {cfg.data!r}")
    if cfg.data == "cifar10" and not isinstance(cfg.data_dir, str):
        raise ValueError("data_dir: --data cifar10 needs --data-dir, the folder of the CIFAR-10 python batches")
    for name in ("learning_rate", "grad_clip"):
        check_number(name, getattr(cfg, name), low=0.0, low_open=True)
    check_number("learning_rate_min", cfg.learning_rate_min, 0.0, float(cfg.learning_rate),
                 what=" (at most learning_rate)")
    check_number("momentum", cfg.momentum, 0.0, 1.0, high_open=True)
    check_number("weight_decay", cfg.weight_decay, low=0.0)
    check_number("auxiliary_weight", cfg.auxiliary_weight, low=0.0)
    check_number("drop_path_prob", cfg.drop_path_prob, 0.0, 1.0, high_open=True)
    for name in ("auxiliary", "cutout"):
        check_flag(name, getattr(cfg, name))
    check_seed(cfg.seed)
    check_place(cfg)
    check_tensorboard(cfg.tensorboard)
    if check_genotype:
        load_genotype(cfg.genotype)  # a clear error for a file that does not parse or names unknown ops


def load_split(cfg: CNNTrainConfig, train: bool) -> ImageData:
    """The training or the test split of the run's data (shapes10: generated, the test images from a seed of
    their own), cut to ``num_train`` / ``num_test`` images."""
    limit = cfg.num_train if train else cfg.num_test
    if cfg.data == "cifar10":
        data = load_cifar10(cfg.data_dir, train=train)
    else:
        n = limit or (10000 if train else 2000)
        data = make_shapes10(n, seed=SHAPES10_TRAIN_SEED if train else SHAPES10_TEST_SEED)
    if limit is not None and limit < len(data):
        data = ImageData(data.images[:limit], data.labels[:limit], data.num_classes, data.name, data.augment)
    return data


def cutout(x: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    """Zero one ``length`` x ``length`` square per image, centred at a uniform pixel and clipped at the border."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=g)
    cx = torch.randint(0, w, (n, 1), generator=g)
    rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    in_y = (rows >= cy - length // 2) & (rows < cy + length // 2)
    in_x = (cols >= cx - length // 2) & (cols < cx + length // 2)
    keep = ~(in_y.view(n, h, 1) & in_x.view(n, 1, w))
    return x * keep.view(n, 1, h, w).to(x.dtype)


def train_batches(data: ImageData, cfg: CNNTrainConfig, epoch: int):
    """The epoch's shuffled, augmented training batches, deterministic in (seed, epoch)."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    order = torch.randperm(len(data), generator=g)
    fill = padding_value(data)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        x = augment_batch(data.images[idx], g, fill=fill)
        if cfg.cutout:
            x = cutout(x, cfg.cutout_length, g)
        yield x, data.labels[idx]


def cosine_lr(cfg: CNNTrainConfig, epoch: int) -> float:
    return cfg.learning_rate_min + 0.5 * (cfg.learning_rate - cfg.learning_rate_min) * (
        1 + math.cos(math.pi * epoch / cfg.epochs))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int, device: torch.device):
    """(loss, accuracy %) of ``model`` on ``data`` in eval mode."""
    was = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device)
        logits, _ = model(x)
        loss_sum += float(criterion(logits, y))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was)
    return loss_sum / max(len(data), 1), 100.0 * correct / max(len(data), 1)


class CNNTraining(TrainingRun):
    """A training run of a derived CNN: build it, call :meth:`run`; see :func:`run_training`."""

    SPACE = "cnn"
    CONFIG = CNNTrainConfig
    check_config = staticmethod(_check_config)
    parse_genotype = staticmethod(from_json)
    load_genotype = staticmethod(load_genotype)
    to_json = staticmethod(to_json)
    #: the name of the split evaluated after every epoch (its keys in the history and result: ``<name>_acc``,
    #: ``<name>_loss``); a subclass whose :meth:`load_data` holds out part of the training data renames it
    HELD_OUT = "test"

    def __init__(self, cfg: CNNTrainConfig, save_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 progress: bool = True, genotype: Optional[Genotype] = None):
        """``genotype``: the cells to train (a resumed run's, from its checkpoint); None reads ``cfg.genotype``."""
        self.start(cfg, save_dir, log, progress, genotype)
        torch.manual_seed(cfg.seed)
        self.train_data, self.test_data = self.load_data()
        self.model = EvalNetwork(cfg.init_channels, self.train_data.num_classes, cfg.layers, cfg.auxiliary,
                                 self.genotype).to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), cfg.learning_rate, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)

    def load_data(self):
        """(the training data, the held-out data evaluated after every epoch): here the training and test splits."""
        return load_split(self.cfg, True), load_split(self.cfg, False)

    # -- the epochs --------------------------------------------------------------
    def train_epoch(self, epoch: int):
        cfg, model, dev = self.cfg, self.model, self.device
        lr = cosine_lr(cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        model.train()
        steps = math.ceil(len(self.train_data) / cfg.batch_size)
        if cfg.steps_per_epoch:
            steps = min(steps, cfg.steps_per_epoch)
        bar = epoch_bar(self.progress, steps, epoch, cfg.epochs)
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x, y) in enumerate(train_batches(self.train_data, cfg, epoch)):
            if step >= steps:
                break
            x, y = x.to(dev), y.to(dev)
            self.optimizer.zero_grad()
            logits, logits_aux = model(x)
            loss = self.criterion(logits, y)
            if logits_aux is not None:
                loss = loss + cfg.auxiliary_weight * self.criterion(logits_aux, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            loss_sum += float(loss.detach()) * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
        if bar is not None:
            bar.close()
        return lr, model.drop_path_prob, loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    def run(self, until: Optional[int] = None) -> dict:
        """Train to the end, or until ``until`` epochs are complete; one log line and one checkpoint per epoch."""
        from .. import _backend

        cfg, held = self.cfg, self.HELD_OUT
        stop = cfg.epochs if until is None else min(until, cfg.epochs)
        if self.epoch == 0:
            self.log(f"training {cfg.genotype}: {count_parameters(self.model) / 1e6:.3f} M weights (without the "
                     f"auxiliary head), {len(self.train_data)} training and {len(self.test_data)} {held} images "
                     f"({self.train_data.name})")
        with _backend.use_backend(cfg.backend):
            while self.epoch < stop:
                epoch, t0 = self.epoch, time.perf_counter()
                lr, drop, train_loss, train_acc = self.train_epoch(epoch)
                held_loss, held_acc = evaluate(self.model, self.test_data, cfg.batch_size, self.device)
                seconds = time.perf_counter() - t0
                self.history.append({"epoch": epoch + 1, "lr": lr, "drop_path_prob": drop, "train_loss": train_loss,
                                     "train_acc": train_acc, f"{held}_loss": held_loss, f"{held}_acc": held_acc,
                                     "seconds": seconds})
                self.epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.5f} drop_path {drop:.3f} train_loss "
                         f"{train_loss:.4f} train_acc {train_acc:.2f} {held}_loss {held_loss:.4f} {held}_acc "
                         f"{held_acc:.2f} time {seconds:.1f}s")
                self.save()
        final = self.history[-1] if self.history else {}
        result = {f"{held}_acc": final.get(f"{held}_acc"), f"{held}_loss": final.get(f"{held}_loss"),
                  "parameters": count_parameters(self.model), "history": self.history}
        self.log(f"{held} accuracy {final.get(f'{held}_acc', float('nan')):.2f} % ({len(self.test_data)} images)")
        return result


def run_training(cfg: CNNTrainConfig, save_dir: Optional[str] = None, resume: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume training) the network of ``cfg.genotype``; returns the test accuracy and the history."""
    return CNNTraining.start_or_resume(cfg, save_dir, resume, log, progress)


def evaluate_checkpoint(path: str, data_dir: Optional[str] = None, device: str = "cpu",
                        batch_size: Optional[int] = None) -> dict:
    """Test accuracy and loss of a trained network (a training checkpoint or its run folder) on its test split."""
    ckpt, cfg, genotype = CNNTraining.read_checkpoint(path, "checkpoint")
    cfg.device = device
    if data_dir is not None:
        cfg.data_dir = data_dir
    try:
        _check_config(cfg, check_genotype=False)
    except ValueError as exc:
        raise ValueError(f"checkpoint: {path}: its settings are refused: {exc}") from None
    test = load_split(cfg, False)
    model = EvalNetwork(cfg.init_channels, test.num_classes, cfg.layers, cfg.auxiliary, genotype)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: {path}: the weights do not fit the network of its settings "
                         f"({type(exc).__name__})") from None
    model.to(torch.device(device))
    loss, acc = evaluate(model, test, batch_size or cfg.batch_size, torch.device(device))
    return {"test_acc": acc, "test_loss": loss, "images": len(test), "epoch": ckpt["epoch"],
            "parameters": count_parameters(model)}
