"""What every training of a derived network shares (pynas.train.cnn, pynas.train.rnn): checkpoints written
atomically and read without running code, exact resume, the per-epoch CSV, the run folder."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, List, Optional

import torch

from ..search.checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, atomic_save, check_checkpoint_keys,
                                 checkpoint_checksum, config_from_checkpoint, load_checkpoint)
from ..search.config import _is_int
from ..search.loop import RunFolder, tensorboard_epoch, write_metrics

FORMAT = "pynas-train"
KEYS = ("config", "epoch", "model", "optimizer", "history", "torch_rng", "genotype")


def checkpoint_genotype(ckpt: dict, where: str, what: str, parse: Callable):
    try:
        return parse(ckpt["genotype"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {where}: the checkpoint's genotype: {exc}") from None


class TrainingRun:
    """A training run: the subclass builds ``cfg``, ``device``, ``genotype``, ``model``, ``optimizer`` and runs the
    epochs; this class writes and reads its checkpoints. ``extra_state`` / ``load_extra`` carry what a space
    adds (the RNN's averaged SGD and best model)."""

    SPACE = ""
    CONFIG: type = object
    check_config: Callable = staticmethod(lambda cfg, check_genotype=True: None)
    parse_genotype: Callable = staticmethod(lambda text: text)
    to_json: Callable = staticmethod(lambda genotype: genotype)

    load_genotype: Callable = staticmethod(lambda source: source)

    def start(self, cfg, save_dir: Optional[str], log: Callable[[str], None], progress: bool, genotype) -> None:
        """What every run sets first: the settings checked, where it runs and writes, the genotype (a resumed run's
        from its checkpoint; None reads ``cfg.genotype``), no epoch done."""
        self.check_config(cfg, check_genotype=genotype is None)
        self.cfg, self.save_dir, self.log, self.progress = cfg, save_dir, log, progress
        self.device = torch.device(cfg.device)
        self.genotype = genotype if genotype is not None else self.load_genotype(cfg.genotype)
        self.epoch = 0
        self.history: List[dict] = []

    def extra_state(self) -> dict:
        return {}

    def load_extra(self, ckpt: dict, where: str) -> None:
        pass

    def state(self) -> dict:
        return {"format": FORMAT, "version": CHECKPOINT_VERSION, "space": self.SPACE,
                "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": list(self.history),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "genotype": self.to_json(self.genotype), **self.extra_state()}

    def load_state(self, ckpt: dict, where: str) -> None:
        epoch, history = ckpt["epoch"], ckpt["history"]
        if not _is_int(epoch) or not 0 <= epoch <= self.cfg.epochs:
            raise ValueError(f"resume: {where}: the checkpoint's 'epoch' is {epoch!r}, expected an integer in "
                             f"[0, {self.cfg.epochs}]")
        if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"resume: {where}: the checkpoint's 'history' is not one record per epoch")
        rng = ckpt["torch_rng"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise ValueError(f"resume: {where}: the checkpoint's 'torch_rng' is not a generator state")
        try:
            self.load_extra(ckpt, where)
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            text = re.sub(r"\s+", " ", str(exc)).strip()
            raise ValueError(f"resume: {where}: the checkpoint does not fit this network: {type(exc).__name__}: "
                             f"{text}") from None
        self.epoch, self.history = epoch, list(history)
        torch.set_rng_state(rng)
        if self.device.type == "cuda" and isinstance(ckpt.get("cuda_rng"), torch.Tensor):
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)

    def save(self) -> None:
        if not self.save_dir:
            return
        state = self.state()
        state["checksum"] = checkpoint_checksum(state)
        atomic_save(state, os.path.join(self.save_dir, CHECKPOINT_NAME))
        write_metrics(self.save_dir, self.history)
        if self.history:
            tensorboard_epoch(self, self.history[-1])

    @classmethod
    def read_checkpoint(cls, path: str, what: str):
        """(checkpoint, its settings, its genotype) of a training of this space, every part checked."""
        ckpt = load_checkpoint(path, fmt=FORMAT, what=what)
        if ckpt.get("space") != cls.SPACE:
            raise ValueError(f"{what}: {path} holds a {ckpt.get('space')!r} training, this is a {cls.SPACE!r} one")
        check_checkpoint_keys(ckpt, path, KEYS)
        cfg = config_from_checkpoint(cls.CONFIG, ckpt, path)
        return ckpt, cfg, checkpoint_genotype(ckpt, path, what, cls.parse_genotype)

    @classmethod
    def prepare(cls, cfg, save_dir: Optional[str], resume: Optional[str], log, progress) -> "TrainingRun":
        """A new run, or one resumed from its checkpoint (its own settings; only device and backend may change)."""
        if resume is None:
            return cls(cfg, save_dir=save_dir, log=log, progress=progress)
        ckpt, saved, genotype = cls.read_checkpoint(resume, "resume")
        saved.device, saved.backend = cfg.device, cfg.backend
        try:
            cls.check_config(saved, check_genotype=False)
        except ValueError as exc:
            raise ValueError(f"resume: {resume}: the checkpoint's settings are refused: {exc}") from None
        run = cls(saved, save_dir=save_dir, log=log, progress=progress, genotype=genotype)
        run.load_state(ckpt, resume)
        return run

    @classmethod
    def start_or_resume(cls, cfg, save_dir: Optional[str] = None, resume: Optional[str] = None,
                        log: Callable[[str], None] = print, progress: bool = True) -> dict:
        run = cls.prepare(cfg, save_dir, resume, log, progress)
        if not save_dir:
            return run.run()
        return RunFolder(save_dir, new_run=resume is None).run(run)
