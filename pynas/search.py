"""The DARTS search loop (CNN): architecture step, weight step, checkpoints, resume.

Each iteration: the architect steps alpha on a (train, valid) batch pair, first
or second order, then SGD steps the weights on the same train batch. The
training data is split in two halves: the first trains w, the second alpha.
A checkpoint is written atomically at the end of every epoch; ``resume``
continues a run exactly as if it had not stopped (data order and augmentation
are seeded per epoch).

Checkpoints are read with torch's weights-only unpickler: a checkpoint can hold tensors and plain data (dicts,
lists, numbers, strings) and nothing else, so reading one never runs code. Version 2 checkpoints carry a
SHA-256 checksum over their whole content (every tensor's dtype, shape and bytes, and every other value), checked
on resume; version 1 checkpoints (no checksum) are still read. Every part of a checkpoint is checked before it
is used (keys, counts, shapes, the settings, which are validated again as if given anew).

With ``track_hessian`` the dominant eigenvalue of the Hessian of the validation loss w.r.t. alpha is computed
after every epoch (pynas.hessian; Zela et al., ICLR 2020), without changing the run's trajectory, and with
``hessian_stop`` the search stops by the DARTS-ES rule and keeps the genotype of ``hessian_k`` epochs before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

from . import _backend
from .architect import Architect
from .cnn import Network, to_json
from .data import ImageData, batches, load_cifar10, make_shapes10
from .hessian import EigenvalueEarlyStop, dominant_eigenvalue

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: with a checksum; 1 (no checksum) is still read
READABLE_VERSIONS = (1, 2)
# what every checkpoint holds besides format, version and space ("cuda_rng" and "genotype" are optional)
REQUIRED_KEYS = ("config", "epoch", "model", "alphas", "optimizer", "arch_optimizer", "history", "torch_rng")
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".pt"  # atomic_save's temporaries
SEED_LIMIT = 2 ** 32  # seeds are integers in [0, 2**32): the per-epoch data seeds derived from them fit torch's
LOG_NAME = "log.txt"


# -- checks of the settings (the CNN and RNN searches) -----------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_int(name: str, v, minimum: int = 1) -> None:
    if not _is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")


def check_number(name: str, v, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    """A finite real number within the given bounds (NaN and infinities are refused); returns it as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    x = float(v)
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = ""
        raise ValueError(f"{name}: expected a finite number{' ' + span if span else ''}{what}, got {v!r}")
    return x


def check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r}")


def check_seed(v) -> None:
    if not _is_int(v) or not 0 <= v < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {v!r}")


def check_optional_int(name: str, v, minimum: int = 1) -> None:
    if v is not None:
        check_positive_int(name, v, minimum)


def check_hessian_settings(cfg) -> None:
    """The --track-hessian / --hessian-* settings (both search spaces)."""
    check_flag("track_hessian", cfg.track_hessian)
    check_flag("hessian_stop", cfg.hessian_stop)
    for name in ("hessian_iters", "hessian_window", "hessian_k"):
        check_positive_int(name, getattr(cfg, name))
    check_number("hessian_threshold", cfg.hessian_threshold, low=0.0, low_open=True)
    if cfg.hessian_stop and not cfg.track_hessian:
        raise ValueError("hessian_stop: the early stop needs the eigenvalues: add --track-hessian")


def check_place(cfg) -> None:
    for name in ("device", "backend"):
        if not isinstance(getattr(cfg, name), str):
            raise ValueError(f"{name}: expected a string, got {getattr(cfg, name)!r}")


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
class HessianSettings:
    """The --track-hessian / DARTS-ES settings, shared by the search configs (check: check_hessian_settings)."""

    track_hessian: bool = False  # the dominant eigenvalue of the arch Hessian after every epoch
    hessian_iters: int = 20  # power iterations (Hessian-vector products) per eigenvalue
    hessian_stop: bool = False  # DARTS-ES: stop by the eigenvalue rule, keep the genotype of hessian_k epochs before
    hessian_window: int = 5  # DARTS-ES: epochs averaged
    hessian_k: int = 5  # DARTS-ES: epochs looked back
    hessian_threshold: float = 0.75  # DARTS-ES: stop when mean(i - k) / mean(i) falls below


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


# -- writing and reading checkpoints -------------------------------------------------------------------------------
def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure (a full disk, Ctrl-C) the temporary is removed and ``path`` keeps its previous content; an
    OSError names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                torch.save(obj, fh)
            except RuntimeError as exc:  # torch's writer reports a failed write (e.g. a full disk) this way
                if "write" not in str(exc).lower():
                    raise
                raise OSError(f"could not write the checkpoint ({str(exc).strip().splitlines()[0]})") from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove the temporaries a killed :func:`atomic_save` left in ``folder``; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX) and os.path.isfile(path) \
                and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _feed(h, obj) -> None:
    """Feed ``obj`` to the hash ``h`` in a canonical, type-tagged form (dict items in an order of their own)."""
    if obj is None:
        h.update(b"N;")
    elif isinstance(obj, bool):
        h.update(b"B1;" if obj else b"B0;")
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b";")
    elif isinstance(obj, complex):
        h.update(b"C" + obj.real.hex().encode() + b"," + obj.imag.hex().encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise TypeError(f"a {obj.layout} tensor")
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(b"X" + str(obj.dtype).encode() + b"[" + ",".join(str(d) for d in obj.shape).encode() + b"]:")
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"d" + str(obj).encode() + b";")
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            kh = hashlib.sha256()
            _feed(kh, k)
            items.append((kh.digest(), v))
        items.sort(key=lambda kv: kv[0])
        h.update(b"D%d:" % len(items))
        for kd, v in items:
            h.update(kd)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L%d:" if isinstance(obj, list) else b"T%d:") % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (set, frozenset)):
        digests = []
        for v in obj:
            vh = hashlib.sha256()
            _feed(vh, v)
            digests.append(vh.digest())
        h.update(b"E%d:" % len(digests) + b"".join(sorted(digests)))
    else:
        raise TypeError(f"an object of type {type(obj).__name__}")


def checkpoint_checksum(ckpt: dict) -> str:
    """SHA-256 (hex) over everything in a checkpoint but its ``"checksum"``: each tensor's dtype, shape and bytes,
    and every other value, in a canonical order (so it does not depend on dict order or on the device)."""
    h = hashlib.sha256(b"pynas-search-checkpoint\0")
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return h.hexdigest()


def _unpickler_reason(exc: BaseException) -> str:
    """The part of torch's weights-only refusal that says what was refused, on one line."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", text, re.S)
    reason = m.group(1) if m else (text.strip().splitlines() or [type(exc).__name__])[0]
    reason = re.sub(r"\s+", " ", reason).strip()
    return reason[:300]


def load_checkpoint(path: str) -> dict:
    """Read a search checkpoint (a file, or a run folder holding ``checkpoint.pt``), safely: torch's weights-only
    unpickler (tensors and plain data only, no code runs), and the checksum of version 2 checkpoints verified."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of a foreign file
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "WeightsUnpickler error" in str(exc):
            raise ValueError(f"resume: {path} refused: it holds something other than tensors and plain data, and "
                             f"pynas reads checkpoints without running code ({_unpickler_reason(exc)})") from None
        raise ValueError(f"resume: {path} is not a readable pynas checkpoint ({_unpickler_reason(exc)})") from None
    except Exception as exc:
        raise ValueError(f"resume: {path} is not a readable pynas checkpoint "
                         f"({type(exc).__name__}: {_unpickler_reason(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pynas-search" or "config" not in ckpt:
        raise ValueError(f"resume: {path} is not a pynas search checkpoint")
    version = ckpt.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ValueError(f"resume: {path} has checkpoint version {version!r}; this pynas reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        stored = ckpt.get("checksum")
        if not isinstance(stored, str):
            raise ValueError(f"resume: {path} (checkpoint version {version}) has no checksum: it was altered or "
                             f"not written by pynas")
        try:
            actual = checkpoint_checksum(ckpt)
        except TypeError as exc:
            raise ValueError(f"resume: {path} holds {exc}, which no pynas checkpoint holds") from None
        if actual != stored:
            raise ValueError(f"resume: {path}: checksum mismatch: the checkpoint was changed or damaged after it "
                             f"was written")
    return ckpt


def check_checkpoint_keys(ckpt: dict, where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"resume: {where}: the checkpoint lacks {', '.join(repr(k) for k in missing)}")


def config_from_checkpoint(config_cls, ckpt: dict, where: str):
    """The run's settings from its checkpoint: known keys only (a missing key takes its default, e.g. a setting
    newer than the checkpoint); their values are checked by the search as if given anew."""
    raw = ckpt["config"]
    if not isinstance(raw, dict):
        raise ValueError(f"resume: {where}: the checkpoint's 'config' is not a mapping")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted((k for k in raw if k not in known), key=str)
    if unknown:
        raise ValueError(f"resume: {where}: the checkpoint's config has unknown key(s) "
                         f"{', '.join(repr(k) for k in unknown)} (written by another version of pynas?)")
    return config_cls(**raw)


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
            "arch_optimizer": self.architect.optimizer.state_dict(),
            "history": list(self.history),
            "torch_rng": torch.get_rng_state(),
            # dropout masks drawn on a GPU come from its generator
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "genotype": self.genotype_json(),
        }

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
            self.architect.optimizer.load_state_dict(ckpt["arch_optimizer"])
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
        return path

    # -- the Hessian's dominant eigenvalue (--track-hessian) --------------------------
    def hessian_loss(self) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def hessian_eigenvalue(self) -> float:
        """The dominant eigenvalue of the Hessian of the validation loss w.r.t. all arch tensors together
        (pynas.hessian.dominant_eigenvalue, ``hessian_iters`` power iterations), on the fixed batch of
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
        try:
            with torch.random.fork_rng(devices=[index] if cuda else [], enabled=True):
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
                record = {"epoch": epoch + 1, **figures, "seconds": seconds, "genotype": genotype}
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
        self.model = Network(cfg.init_channels, self.data.num_classes, cfg.layers, self.criterion).to(self.device)
        self.optimizer = _weight_optimizer(self.model.parameters(), cfg)
        self.architect = Architect(self.model, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   arch_learning_rate=cfg.arch_learning_rate,
                                   arch_weight_decay=cfg.arch_weight_decay, fd_r=cfg.fd_r)
        self.epoch = 0  # epochs completed
        self.history: list = []
        self._replay_early_stop()

    def genotype_json(self) -> str:
        return to_json(self.model.genotype())

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
