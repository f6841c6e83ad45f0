"""The search loop every space and method shares: epochs, logging, checkpoints, resume, curvature tracking.

A search class (one per space, pynas.search.cnn and pynas.search.rnn) extends :class:`SearchCheckpoints` with
its data, model and epoch; the method's architecture step comes from pynas.strategies. A checkpoint is written
atomically at the end of every epoch; ``resume`` continues a run exactly as if it had not stopped (data order
and augmentation are seeded per epoch). With ``track_hessian`` the dominant eigenvalue of the Hessian of the
validation loss w.r.t. alpha is computed after every epoch (pynas.search.hessian; Zela et al., ICLR 2020),
without changing the run's trajectory, and with ``hessian_stop`` the search stops by the DARTS-ES rule and
keeps the genotype of ``hessian_k`` epochs before.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time
from typing import Callable, List, Optional

import torch

from .. import _backend
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, atomic_save, check_checkpoint_keys, checkpoint_checksum,
                         config_from_checkpoint, load_checkpoint, remove_stale_temporaries)
from .config import _is_int
from .hessian import EigenvalueEarlyStop, dominant_eigenvalue

LOG_NAME = "log.txt"
PICTURE_NAME = "genotype.svg"
METRICS_NAME = "metrics.csv"


def write_metrics(folder: str, history: List[dict]) -> None:
    """The per-epoch figures as CSV (one row per epoch), replaced atomically."""
    columns = [k for k in history[0] if isinstance(history[0][k], (int, float, str)) and k != "genotype"] \
        if history else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    path = os.path.join(folder, METRICS_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def epoch_bar(enabled: bool, total: int, epoch: int, epochs: int):
    """The epoch's progress bar on stderr (tqdm), or None when ``enabled`` is false."""
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)


#: The methods a data-parallel search runs (those with a supernet whose weight and architecture gradients it
#: averages): per space.
DATA_PARALLEL_METHODS = {"cnn": ("darts", "idarts", "pcdarts", "gdas", "rsws"), "rnn": ("darts", "idarts", "rsws", "ess")}


def data_parallel(search):
    """The search's data-parallel group (pynas.search.distributed), checked against its settings, or None alone.
    Ranks other than 0 neither log nor show a bar nor write files; with ``sync_bn`` every BatchNorm becomes a
    SyncBatchNorm and the search runs on the reference backend."""
    from . import distributed

    group = distributed.active()
    if group is None:
        return None
    cfg = search.cfg
    if cfg.method not in DATA_PARALLEL_METHODS[search.SPACE]:
        raise ValueError(f"method: {cfg.method!r} does not run data-parallel; the {search.SPACE} methods that do: "
                         f"{', '.join(DATA_PARALLEL_METHODS[search.SPACE])}")
    if cfg.batch_size % group.world:
        raise ValueError(f"batch_size: expected a multiple of the {group.world} processes (each takes an equal share), "
                         f"got {cfg.batch_size}")
    if not group.main:
        search.save_dir, search.progress = None, False
        search.log = lambda line: None
    if group.sync_bn:
        distributed.convert_sync_batchnorm(search.model)
        cfg.backend = "reference"
    group.broadcast_([*search.model.parameters(), *search.model.buffers(), *search.model.arch_parameters()])
    return group


def check_tensorboard(enabled) -> None:
    """With ``tensorboard`` set, the package must be importable (checked before a run starts)."""
    if enabled is not True and enabled is not False:
        raise ValueError(f"tensorboard: expected True or False, got {enabled!r}")
    if enabled:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ValueError("tensorboard: --tensorboard needs the tensorboard package "
                             "(pip install tensorboard)") from None


def tensorboard_epoch(run, record: dict) -> None:
    """The epoch's numeric figures as TensorBoard scalars in the run folder (``run.cfg.tensorboard``)."""
    if not getattr(run.cfg, "tensorboard", False) or not run.save_dir:
        return
    writer = getattr(run, "_tensorboard_writer", None)
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter

        writer = run._tensorboard_writer = SummaryWriter(log_dir=os.path.join(run.save_dir, "tensorboard"))
    for name, value in record.items():
        if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(name, value, record["epoch"])
    writer.flush()


class SearchCheckpoints:
    """Checkpoints of a search run (the CNN and RNN searches): the model, alphas, both optimizers, the
    history and the RNG, written atomically; ``SPACE`` names the search space, ``genotype_json()`` the
    current genotype, ``check_config`` its settings' check, ``hessian_loss()`` the loss whose curvature
    ``--track-hessian`` follows."""

    SPACE = ""
    check_config: Callable = staticmethod(lambda cfg: None)

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
            "arch_optimizer": self.architect.optimizer.state_dict() if self.architect is not None else {},
            "history": list(self.history),
            "torch_rng": torch.get_rng_state(),
            # dropout masks drawn on a GPU come from its generator
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "genotype": self.genotype_json(),
            "final": self.final_record(),
        }

    def final_record(self) -> Optional[dict]:
        """What the method did after the last epoch (random search with weight sharing: its selection), or None."""
        return None

    def finish(self) -> Optional[dict]:
        """The method's last act after the last epoch (see :meth:`final_record`); None when it has none."""
        return None

    def load_final(self, record: Optional[dict]) -> None:
        """Take :meth:`final_record` back from a checkpoint."""

    def load_state(self, ckpt: dict) -> None:
        """Take a checkpoint's state, every part checked first (ValueError naming what does not fit)."""
        check_checkpoint_keys(ckpt, "the checkpoint")
        epoch, history = ckpt["epoch"], ckpt["history"]
        if not _is_int(epoch) or not 0 <= epoch <= self.cfg.epochs:
            raise ValueError(f"resume: the checkpoint's 'epoch' is {epoch!r}, expected an integer in "
                             f"[0, {self.cfg.epochs}] (epochs completed)")
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError("resume: the checkpoint's 'history' is not a list of per-epoch records")
        if len(history) != epoch:
            raise ValueError(f"resume: the checkpoint's 'history' has {len(history)} records for {epoch} epochs")
        alphas, mine = ckpt["alphas"], list(self.model.arch_parameters())
        if not isinstance(alphas, (list, tuple)) or not all(isinstance(a, torch.Tensor) for a in alphas):
            raise ValueError("resume: the checkpoint's 'alphas' is not a list of tensors")
        if len(alphas) != len(mine):
            raise ValueError(f"resume: the checkpoint holds {len(alphas)} alpha tensor(s), this search has "
                             f"{len(mine)}")
        for i, (a, saved) in enumerate(zip(mine, alphas)):
            if a.shape != saved.shape or not saved.is_floating_point():
                raise ValueError(f"resume: alpha tensor {i} of the checkpoint is {saved.dtype} {tuple(saved.shape)}, "
                                 f"the model's is {tuple(a.shape)}")
        rngs = [("torch_rng", ckpt["torch_rng"], torch.get_rng_state())]
        if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            rngs.append(("cuda_rng", ckpt["cuda_rng"], torch.cuda.get_rng_state(self.device)))
        for name, saved, like in rngs:
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.shape != like.shape:
                raise ValueError(f"resume: the checkpoint's {name!r} is not a generator state "
                                 f"(a uint8 tensor of {like.numel()} bytes)")
        for name in ("model", "optimizer", "arch_optimizer"):
            if not isinstance(ckpt[name], dict):
                raise ValueError(f"resume: the checkpoint's {name!r} is not a state dict")
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
            with torch.no_grad():
                for a, saved in zip(mine, alphas):
                    a.copy_(saved)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.architect is not None:
                self.architect.optimizer.load_state_dict(ckpt["arch_optimizer"])
            self.load_final(ckpt.get("final"))
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            text = re.sub(r"\s+", " ", str(exc)).strip()
            raise ValueError(f"resume: the checkpoint does not fit this search: {type(exc).__name__}: {text}") \
                from None
        self.epoch = epoch
        self.history = list(history)
        torch.set_rng_state(ckpt["torch_rng"])
        if len(rngs) > 1:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self._replay_early_stop()

    def save(self) -> Optional[str]:
        if not self.save_dir:
            return None
        path = os.path.join(self.save_dir, CHECKPOINT_NAME)
        state = self.state()
        state["checksum"] = checkpoint_checksum(state)
        atomic_save(state, path)
        self.save_picture()
        write_metrics(self.save_dir, self.history)
        if self.history:
            tensorboard_epoch(self, self.history[-1])
        return path

    def alpha_entropy(self) -> float:
        """Mean entropy (nats) of the softmax of the architecture rows, over every edge of every arch tensor:
        log(candidates) at the start, falling as the search commits to operations."""
        rows = [torch.softmax(a.detach().double(), dim=-1) for a in self.model.arch_parameters() if a.dim() == 2]
        if not rows:  # a method without architecture parameters
            return float("nan")
        ent = [-(p * p.clamp_min(1e-300).log()).sum(-1).reshape(-1) for p in rows]
        return float(torch.cat(ent).mean())

    def save_picture(self) -> None:
        """The current genotype's cells as ``genotype.svg`` beside the checkpoint (pynas.plot, no dependency)."""
        from ..plot import load_graphs, svg

        tmp = os.path.join(self.save_dir, PICTURE_NAME + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(svg(load_graphs(self.genotype_json())))
        os.replace(tmp, os.path.join(self.save_dir, PICTURE_NAME))

    # -- the Hessian's dominant eigenvalue (--track-hessian) --------------------------
    def hessian_loss(self) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def hessian_eigenvalue(self) -> float:
        """The dominant eigenvalue of the Hessian of the validation loss w.r.t. all arch tensors together
        (pynas.search.hessian.dominant_eigenvalue, ``hessian_iters`` power iterations), on the fixed batch of
        :meth:`hessian_loss`, in train mode as the search computes its arch loss. The run does not notice:
        the BatchNorm running statistics (every buffer) and the RNG states are restored afterwards, and the
        random draws inside (dropout masks) come from a fixed seed, so the value depends only on the weights
        and alphas."""
        model, cfg = self.model, self.cfg
        buffers = list(model.buffers())
        saved = [b.detach().clone() for b in buffers]
        was_training = model.training
        cuda = self.device.type == "cuda"
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        from .distributed import using

        try:
            with torch.random.fork_rng(devices=[index] if cuda else [], enabled=True), using(None):
                torch.default_generator.manual_seed(cfg.seed)
                if cuda:
                    with torch.cuda.device(index):
                        torch.cuda.manual_seed(cfg.seed)
                model.train()
                try:
                    eigenvalue, _ = dominant_eigenvalue(self.hessian_loss(), model.arch_parameters(),
                                                        iters=cfg.hessian_iters, seed=cfg.seed)
                except (RuntimeError, NotImplementedError) as exc:
                    text = re.sub(r"\s+", " ", str(exc)).strip()
                    raise RuntimeError(f"track_hessian: the Hessian-vector product failed on backend "
                                       f"{_backend.current_backend()!r} ({type(exc).__name__}: {text}); "
                                       f"--backend reference computes it op by op") from exc
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            model.train(was_training)
        return eigenvalue

    def _replay_early_stop(self) -> None:
        cfg = self.cfg
        self.early_stop = None
        if cfg.hessian_stop:
            values = [r.get("hessian_eigenvalue", float("nan")) for r in self.history]
            self.early_stop = EigenvalueEarlyStop.replay(values, window=cfg.hessian_window, k=cfg.hessian_k,
                                                         threshold=cfg.hessian_threshold)

    def stop_record(self) -> Optional[dict]:
        """The history's early-stop entry (DARTS-ES), if the run stopped early."""
        for record in self.history:
            if isinstance(record.get("early_stop"), dict):
                return record["early_stop"]
        return None

    def final_genotype_json(self) -> str:
        """The run's result: the current genotype, or after an early stop the genotype of the epoch kept."""
        stop = self.stop_record()
        return stop["genotype"] if stop is not None else self.genotype_json()

    # -- the epochs --------------------------------------------------------------
    def run(self, until: Optional[int] = None) -> dict:
        """Train to the end of the run, or only until ``until`` epochs are complete; one log line and one
        checkpoint per epoch, ``genotype.json`` at the end."""
        cfg = self.cfg
        stop = cfg.epochs if until is None else min(until, cfg.epochs)
        if not hasattr(self, "early_stop"):
            self._replay_early_stop()
        with _backend.use_backend(cfg.backend):
            while self.epoch < stop and self.stop_record() is None:
                epoch = self.epoch
                t0 = time.perf_counter()
                figures, text = self.run_epoch(epoch)
                if cfg.track_hessian:
                    t1 = time.perf_counter()
                    figures["hessian_eigenvalue"] = eigenvalue = self.hessian_eigenvalue()
                    figures["hessian_seconds"] = time.perf_counter() - t1
                    text += f" hessian_eigenvalue {eigenvalue:.6g}"
                seconds = time.perf_counter() - t0
                genotype = self.genotype_json()
                record = {"epoch": epoch + 1, **figures, "alpha_entropy": self.alpha_entropy(), "seconds": seconds,
                          "genotype": genotype}
                self.history.append(record)
                self.epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs} {text} time {seconds:.1f}s genotype {genotype}")
                rule = self.early_stop
                if rule is not None and rule.update(figures["hessian_eigenvalue"]):
                    kept = rule.rollback_epoch
                    record["early_stop"] = {"epoch": rule.stop_epoch, "genotype_epoch": kept,
                                            "genotype": self.history[kept - 1]["genotype"]}
                    now, before = rule.local_mean(rule.stop_epoch), rule.local_mean(kept)
                    self.log(f"early stop (DARTS-ES) after epoch {rule.stop_epoch}: the mean dominant eigenvalue "
                             f"over {rule.window} epochs rose from {before:.6g} (epoch {kept}) to {now:.6g}, "
                             f"ratio {before / now:.3f} < {rule.threshold:g}; the genotype of epoch {kept}: "
                             f"{record['early_stop']['genotype']}")
                self.save()
        if self.epoch >= cfg.epochs and self.stop_record() is None and self.final_record() is None:
            with _backend.use_backend(cfg.backend):
                if self.finish() is not None:
                    self.save()
        genotype = self.final_genotype_json()
        if self.save_dir:
            with open(os.path.join(self.save_dir, "genotype.json"), "w") as fh:
                fh.write(genotype + "\n")
        result = {"genotype": json.loads(genotype), "history": self.history}
        if self.stop_record() is not None:
            result["early_stop"] = self.stop_record()
        return result


class RunFolder:
    """A run folder and what this run may remove from it: a new run that fails before its first checkpoint
    removes the files it made (``own``) and the folder if it made it; a resumed run, or a folder that held files
    already, is never touched."""

    def __init__(self, path: str, new_run: bool):
        self.path = path
        self.new_run = new_run
        self.existed = os.path.isdir(path)
        try:
            self.was_empty = not self.existed or not os.listdir(path)
        except OSError:
            self.was_empty = False
        self.own: List[str] = []

    def make(self) -> None:
        """Create the folder (and its parents) and remove a killed write's stale temporaries."""
        os.makedirs(self.path, exist_ok=True)
        remove_stale_temporaries(self.path)

    def discard_if_unstarted(self) -> None:
        if not self.new_run or not self.was_empty or os.path.exists(os.path.join(self.path, CHECKPOINT_NAME)):
            return
        for name in self.own:
            try:
                os.unlink(os.path.join(self.path, name))
            except OSError:
                pass
        if not self.existed:
            try:
                os.rmdir(self.path)  # only if empty
            except OSError:
                pass

    def run(self, search: "SearchCheckpoints", make: bool = True) -> dict:
        if make:
            self.make()
        try:
            return search.run()
        except BaseException:
            self.discard_if_unstarted()
            raise


def prepare_search(search_cls, config_cls, cfg, save_dir: Optional[str], resume: Optional[str], log,
                   progress) -> "SearchCheckpoints":
    """Build a new search, or one resumed from its checkpoint, touching no file: the settings are checked, the
    data loaded and the checkpoint read and checked here, before any run folder exists. A resumed run keeps its
    own settings (the lr schedule depends on them); only where it runs (device, backend) may change."""
    if resume is None:
        return search_cls(cfg, save_dir=save_dir, log=log, progress=progress)
    ckpt = load_checkpoint(resume)
    space = ckpt.get("space", "cnn")
    if space != search_cls.SPACE:
        raise ValueError(f"resume: {resume} holds a {space!r} search, this is a {search_cls.SPACE!r} search")
    check_checkpoint_keys(ckpt, resume)
    saved = config_from_checkpoint(config_cls, ckpt, resume)
    saved.device, saved.backend = cfg.device, cfg.backend
    try:
        search_cls.check_config(saved)
    except ValueError as exc:
        raise ValueError(f"resume: {resume}: the checkpoint's settings are refused: {exc}") from None
    search = search_cls(saved, save_dir=save_dir, log=log, progress=progress)
    search.load_state(ckpt)
    return search


def start_or_resume(search_cls, config_cls, cfg, save_dir: Optional[str], resume: Optional[str], log, progress):
    """Run a new search, or resume one from its checkpoint (see :func:`prepare_search`)."""
    search = prepare_search(search_cls, config_cls, cfg, save_dir, resume, log, progress)
    if not save_dir:
        return search.run()
    return RunFolder(save_dir, new_run=resume is None).run(search)
