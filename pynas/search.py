"""The DARTS search loop (CNN): architecture step, weight step, checkpoints, resume.

Each iteration: the architect steps alpha on a (train, valid) batch pair, first
or second order, then SGD steps the weights on the same train batch. The
training data is split in two halves: the first trains w, the second alpha.
A checkpoint is written atomically at the end of every epoch; ``resume``
continues a run exactly as if it had not stopped (data order and augmentation
are seeded per epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import _backend
from .architect import Architect
from .cnn import Network, to_json
from .data import ImageData, batches, load_cifar10, make_shapes10

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def _weight_optimizer(params, cfg) -> torch.optim.SGD:
    """SGD with momentum and weight decay, torch's fused kernel where it has one (CPU and CUDA): one pass
    over all weights, measured 3.7 ms against 8.1 ms for the default foreach kernels (clip included,
    889 tensors, 1 thread, benchmarks/results/weight_step.txt). Same update rule, same state_dict."""
    params = list(params)
    kw = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.SGD(params, cfg.learning_rate, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.SGD(params, cfg.learning_rate, **kw)


@dataclass
class CNNSearchConfig:
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


def _check_config(cfg: CNNSearchConfig) -> None:
    positive_ints = ("epochs", "batch_size", "init_channels", "layers")
    for name in positive_ints:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if cfg.num_train is not None and cfg.num_train < 2:
        raise ValueError(f"num_train: need at least 2 images (one per half), got {cfg.num_train}")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected a positive integer, got {cfg.steps_per_epoch}")
    if not 0.0 < cfg.train_portion < 1.0:
        raise ValueError(f"train_portion: expected a fraction in (0, 1), got {cfg.train_portion}")
    if cfg.data not in ("shapes10", "cifar10"):
        raise ValueError(f"data: expected 'shapes10' or 'cifar10', got {cfg.data!r}")
    for name in ("learning_rate", "fd_r", "arch_learning_rate"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}: expected a positive number, got {getattr(cfg, name)!r}")


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


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Read a search checkpoint (a file, or a run folder holding ``checkpoint.pt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"resume: {path} is not a readable pynas checkpoint ({type(exc).__name__}: {exc})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pynas-search" or "config" not in ckpt:
        raise ValueError(f"resume: {path} is not a pynas search checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"resume: {path} has checkpoint version {ckpt.get('version')}, expected {CHECKPOINT_VERSION}")
    return ckpt


class SearchCheckpoints:
    """Checkpoints of a search run (the CNN and RNN searches): the model, alphas, both optimizers, the
    history and the RNG, written atomically; ``SPACE`` names the search space, ``genotype_json()`` the
    current genotype."""

    SPACE = ""

    # -- checkpoints -------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": "pynas-search",
            "version": CHECKPOINT_VERSION,
            "space": self.SPACE,
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "alphas": [a.detach().cpu().clone() for a in self.model.arch_parameters()],
            "optimizer": self.optimizer.state_dict(),
            "arch_optimizer": self.architect.optimizer.state_dict(),
            "history": list(self.history),
            "torch_rng": torch.get_rng_state(),
            # dropout masks drawn on a GPU come from its generator
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "genotype": self.genotype_json(),
        }

    def load_state(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
            with torch.no_grad():
                for a, saved in zip(self.model.arch_parameters(), ckpt["alphas"]):
                    if a.shape != saved.shape:
                        raise ValueError(f"alphas of shape {tuple(saved.shape)}, the model has {tuple(a.shape)}")
                    a.copy_(saved)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.architect.optimizer.load_state_dict(ckpt["arch_optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"resume: the checkpoint does not fit this search: {exc}") from exc
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt.get("history", []))
        torch.set_rng_state(ckpt["torch_rng"])
        if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)

    def save(self) -> Optional[str]:
        if not self.save_dir:
            return None
        path = os.path.join(self.save_dir, CHECKPOINT_NAME)
        atomic_save(self.state(), path)
        return path

    # -- the epochs --------------------------------------------------------------
    def run(self, until: Optional[int] = None) -> dict:
        """Train to the end of the run, or only until ``until`` epochs are complete; one log line and one
        checkpoint per epoch, ``genotype.json`` at the end."""
        cfg = self.cfg
        stop = cfg.epochs if until is None else min(until, cfg.epochs)
        with _backend.use_backend(cfg.backend):
            while self.epoch < stop:
                epoch = self.epoch
                t0 = time.perf_counter()
                figures, text = self.run_epoch(epoch)
                seconds = time.perf_counter() - t0
                genotype = self.genotype_json()
                self.history.append({"epoch": epoch + 1, **figures, "seconds": seconds, "genotype": genotype})
                self.epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs} {text} time {seconds:.1f}s genotype {genotype}")
                self.save()
        genotype = self.genotype_json()
        if self.save_dir:
            with open(os.path.join(self.save_dir, "genotype.json"), "w") as fh:
                fh.write(genotype + "\n")
        return {"genotype": json.loads(genotype), "history": self.history}


def start_or_resume(search_cls, config_cls, cfg, save_dir: Optional[str], resume: Optional[str], log, progress):
    """Run a new search, or resume one from its checkpoint: a resumed run keeps its own settings (the lr
    schedule depends on them); only where it runs (device, backend) may change."""
    if resume is not None:
        ckpt = load_checkpoint(resume)
        space = ckpt.get("space", "cnn")
        if space != search_cls.SPACE:
            raise ValueError(f"resume: {resume} holds a {space!r} search, this is a {search_cls.SPACE!r} search")
        saved = config_cls(**ckpt["config"])
        saved.device, saved.backend = cfg.device, cfg.backend
        search = search_cls(saved, save_dir=save_dir, log=log, progress=progress)
        search.load_state(ckpt)
    else:
        search = search_cls(cfg, save_dir=save_dir, log=log, progress=progress)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    return search.run()


class CNNSearch(SearchCheckpoints):
    """A DARTS CNN search run: build it, call :meth:`run`; see :func:`run_search`."""

    SPACE = "cnn"

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
        self.model = Network(cfg.init_channels, self.data.num_classes, cfg.layers, self.criterion).to(self.device)
        self.optimizer = _weight_optimizer(self.model.parameters(), cfg)
        self.architect = Architect(self.model, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   arch_learning_rate=cfg.arch_learning_rate,
                                   arch_weight_decay=cfg.arch_weight_decay, fd_r=cfg.fd_r)
        self.epoch = 0  # epochs completed
        self.history: list = []

    def genotype_json(self) -> str:
        return to_json(self.model.genotype())

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
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                       dynamic_ncols=True)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps):
            x, y = next(train_it)
            xv, yv = next(valid_it)
            x, y, xv, yv = x.to(dev), y.to(dev), xv.to(dev), yv.to(dev)
            self.architect.step(x, y, xv, yv, lr, self.optimizer, cfg.unrolled)
            self.optimizer.zero_grad()
            logits = model(x)
            loss = self.criterion(logits, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
        if bar is not None:
            bar.close()
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
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss_sum += float(self.criterion(logits, y)) * y.shape[0]
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        model.train()
        return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    def run_epoch(self, epoch: int):
        """Train and evaluate one epoch: (the history record's figures, their log text)."""
        lr, train_loss, train_acc = self.train_epoch(epoch)
        val_loss, val_acc = self.evaluate(epoch)
        record = {"lr": lr, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                  "val_acc": val_acc}
        return record, (f"lr {lr:.5f} train_loss {train_loss:.4f} train_acc {train_acc:.2f} "
                        f"val_loss {val_loss:.4f} val_acc {val_acc:.2f}")


def run_search(cfg: CNNSearchConfig, save_dir: Optional[str] = None, resume: Optional[str] = None,
               log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or resume) a CNN search; returns the final genotype and the per-epoch history."""
    return start_or_resume(CNNSearch, CNNSearchConfig, cfg, save_dir, resume, log, progress)
