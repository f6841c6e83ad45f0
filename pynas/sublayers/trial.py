"""A trial on the sublayer-order space: a :class:`~pynas.sublayers.model.SublayerLM` trained for a step budget.

:func:`train_order` trains the language model of an order string from step ``start`` to step ``end`` and returns
its validation loss (fitness = -loss, higher is better).

* Data: the embedded word-level ``stdlib`` corpus (:func:`pynas.rnn.data.load_corpus`, with ``cfg.max_tokens`` and
  ``cfg.vocab_size``), built once per process. The model's vocabulary is the corpus dictionary's size.
* Step i's batch (:func:`train_batch`): ``batch_size`` windows of ``block + 1`` consecutive train ids, their
  starts drawn uniformly (with replacement) by a ``torch.Generator`` seeded from ``(seed, i)``; inputs are a
  window's first ``block`` ids, targets the ``block`` ids after each. Step i's dropout draws from torch's global
  generator seeded from ``(seed, i)`` too. So step i does not depend on how the run was split into calls.
* Loss: the mean next-token cross-entropy. Adam (betas (0.9, 0.98), eps 1e-8), gradient norm clipped to
  ``clip``, learning rate ``lr * lr_factor(i)`` at step i (:func:`lr_factor`: linear warmup over ``warmup`` steps,
  then cosine decay towards 0 at ``total_steps``). ``total_steps`` is the length of the schedule (the largest
  budget any candidate may reach), not of a call: a candidate trained to s0 and then continued to s1 follows the
  run trained to s1 in one call, bit for bit.
* Validation (:func:`valid_windows`, :func:`evaluate`): the first ``eval_batches * batch_size`` non-overlapping
  windows of ``block + 1`` valid ids (window j starts at ``j * (block + 1)``), scored in eval mode (no dropout):
  the mean cross-entropy over all their ``block`` targets each.
* ``start == 0`` builds the model after ``torch.manual_seed(seed)``; ``start > 0`` loads ``checkpoint``, written
  by the call that ended at ``start`` (weights, Adam state, schedule step), and refuses one of another step,
  order, seed or training settings (every config field but ``eval_batches`` and ``threads``). Each call ends
  by writing ``checkpoint`` at ``end`` (atomically: a temporary file in the same folder, fsync, ``os.replace``).

Everything is a module-level function of plain, picklable arguments, so that a trial runs in another process.
:func:`train_order` leaves torch's CPU random state and its thread count as it found them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..rnn.data import STDLIB_MIN_TOKENS, TextCorpus, load_corpus
from ..search.checkpoint import atomic_save, checkpoint_checksum, load_checkpoint
from ..search.config import SEED_LIMIT, _is_int, check_number, check_positive_int
from ..search.trials import check_span
from .model import SublayerLM, check_order, count_parameters, sublayer_weights

_FORMAT = "pynas-sublayer-trial"
_VERSION = 2  # load_checkpoint verifies the checksum of version 2
ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-8
# Settings that do not change the training trajectory (a resumed call may differ in them).
_NON_TRAINING_FIELDS = ("eval_batches", "threads")


@dataclass
class SublayerTrialConfig:
    """The settings of every sublayer-order trial of a search (module docstring)."""

    d_model: int = 64
    heads: int = 4
    dropout: float = 0.1
    block: int = 32  # tokens per training / validation sequence
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50  # linear warmup steps
    total_steps: int = 600  # the schedule's length: the largest budget any candidate may reach
    clip: float = 0.5  # gradient norm
    vocab_size: int = 2000
    max_tokens: int = 200000
    eval_batches: int = 16  # 256 windows of 33 tokens: about 8.4k of the default corpus's 9.4k valid tokens
    threads: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first field with a bad value."""
        for name in ("d_model", "heads", "block", "batch_size", "total_steps", "eval_batches", "threads"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.heads:
            raise ValueError(f"heads: expected a divisor of d_model ({self.d_model}), got {self.heads}")
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_positive_int("warmup", self.warmup, 0)
        check_number("clip", self.clip, 0.0, low_open=True)
        check_positive_int("vocab_size", self.vocab_size, 3)
        check_positive_int("max_tokens", self.max_tokens, STDLIB_MIN_TOKENS)


# ---------------------------------------------------------------------------------------------------- data

_CORPORA: Dict[Tuple[int, int], TextCorpus] = {}


def corpus(max_tokens: int, vocab_size: int) -> TextCorpus:
    """The ``stdlib`` corpus with these settings, built on first use and kept for the rest of the process."""
    key = (max_tokens, vocab_size)
    if key not in _CORPORA:
        _CORPORA[key] = load_corpus("stdlib", max_tokens=max_tokens, vocab_size=vocab_size)
    return _CORPORA[key]


def step_seed(seed: int, purpose: str, step: int) -> int:
    """A seed in [0, 2**63) for ``purpose`` (``"batch"`` or ``"dropout"``) at ``step`` of the trial seeded ``seed``:
    the first 8 bytes of BLAKE2b over ``"purpose:seed:step"``, big-endian, top bit cleared."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2 ** 63 - 1)


def train_batch(ids: torch.Tensor, seed: int, step: int, block: int, batch_size: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s (inputs, targets), each (batch_size, block): windows ``ids[a : a + block + 1]`` with the
    starts ``a`` drawn by ``torch.randint(0, len(ids) - block, (batch_size,))`` from a generator seeded
    ``step_seed(seed, "batch", step)``; inputs the first ``block`` ids, targets the last ``block``."""
    n = ids.numel()
    if n < block + 1:
        raise ValueError(f"block: expected at most {n - 1} (the train split holds {n} tokens), got {block}")
    g = torch.Generator().manual_seed(step_seed(seed, "batch", step))
    starts = torch.randint(0, n - block, (batch_size,), generator=g)
    windows = ids[starts.unsqueeze(1) + torch.arange(block + 1)]
    return windows[:, :-1], windows[:, 1:]


def valid_windows(ids: torch.Tensor, count: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` non-overlapping windows of ``block + 1`` ids (window j is
    ``ids[j * (block + 1) : (j + 1) * (block + 1)]``) as (inputs, targets), each (count, block)."""
    need = count * (block + 1)
    if ids.numel() < need:
        raise ValueError(f"eval_batches: expected at most {ids.numel() // (block + 1)} windows of block + 1 = "
                         f"{block + 1} tokens in the valid split ({ids.numel()} tokens), got {count} "
                         f"(eval_batches * batch_size)")
    windows = ids[:need].view(count, block + 1)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """The mean cross-entropy (nats per token) of ``model`` over all targets, in eval mode, ``batch_size`` rows at
    a time (sums accumulated in float64). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for lo in range(0, inputs.size(0), batch_size):
            logits = model(inputs[lo:lo + batch_size])
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                           targets[lo:lo + batch_size].reshape(-1), reduction="sum").double())
    finally:
        model.train(was_training)
    return total / targets.numel()


def lr_factor(step: int, warmup: int, total_steps: int) -> float:
    """The learning-rate multiplier at (0-based) ``step``: ``(step + 1) / warmup`` while ``step < warmup``, then
    ``0.5 * (1 + cos(pi * (step - warmup) / (total_steps - warmup)))``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))


# --------------------------------------------------------------------------------------------------- trial


def _check_call(order, start, end, checkpoint, seed, cfg) -> None:
    check_order(order)
    if not isinstance(cfg, SublayerTrialConfig):
        raise ValueError(f"cfg: expected a SublayerTrialConfig, got {type(cfg).__name__}")
    cfg.check()
    check_span(start, end, cfg.total_steps)
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise ValueError(f"checkpoint: expected a file path, got {checkpoint!r}")
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")


def _training_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NON_TRAINING_FIELDS}


def _make_optimizer(model: nn.Module, cfg: SublayerTrialConfig) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def train_order(order: str, start: int, end: int, checkpoint: str, seed: int, cfg: SublayerTrialConfig) -> dict:
    """Train the :class:`SublayerLM` of ``order`` from step ``start`` to ``end`` (steps start..end-1, module
    docstring), score it on the validation windows and write ``checkpoint`` at ``end``.

    Returns ``{"fitness": -valid_loss, "valid_loss", "perplexity": exp(valid_loss), "steps": end, "params":
    count_parameters(model), "weights": sublayer_weights(order, d_model), "seconds": the call's wall time}``.
    Raises ValueError naming the argument for bad arguments (``end`` must satisfy start < end <= total_steps) or a
    checkpoint of another step or run, FileNotFoundError when ``start > 0`` and there is no checkpoint."""
    t0 = time.perf_counter()
    _check_call(order, start, end, checkpoint, seed, cfg)
    checkpoint = os.fspath(checkpoint)
    config = dataclasses.asdict(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            data = corpus(cfg.max_tokens, cfg.vocab_size)
            valid_x, valid_y = valid_windows(data.valid, cfg.eval_batches * cfg.batch_size, cfg.block)
            torch.manual_seed(seed)
            model = SublayerLM(data.ntokens, order, cfg.d_model, cfg.heads, cfg.dropout, max_len=cfg.block)
            opt = _make_optimizer(model, cfg)
            if start > 0:
                ckpt = load_checkpoint(checkpoint, fmt=_FORMAT, what="checkpoint")
                if ckpt.get("step") != start:
                    raise ValueError(f"checkpoint: expected a checkpoint at step {start}, got one at step "
                                     f"{ckpt.get('step')!r} ({checkpoint})")
                if ckpt.get("order") != order or ckpt.get("seed") != seed:
                    raise ValueError(f"checkpoint: expected order {order!r} with seed {seed}, got order "
                                     f"{ckpt.get('order')!r} with seed {ckpt.get('seed')!r} ({checkpoint})")
                stored = ckpt.get("config")
                if not isinstance(stored, dict) or _training_settings(stored) != _training_settings(config):
                    raise ValueError(f"checkpoint: expected the training settings {_training_settings(config)}, "
                                     f"got {stored!r} ({checkpoint})")
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
            model.train()
            for step in range(start, end):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, cfg.warmup, cfg.total_steps)
                x, y = train_batch(data.train, seed, step, cfg.block, cfg.batch_size)
                torch.manual_seed(step_seed(seed, "dropout", step))
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
            loss = evaluate(model, valid_x, valid_y, cfg.batch_size)
            ckpt = {"format": _FORMAT, "version": _VERSION, "config": config, "order": order, "seed": seed,
                    "step": end, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "schedule": {"step": end, "lr": cfg.lr, "warmup": cfg.warmup, "total_steps": cfg.total_steps}}
            ckpt["checksum"] = checkpoint_checksum(ckpt)
            atomic_save(ckpt, checkpoint)
    finally:
        torch.set_num_threads(threads)
    return {"fitness": -loss, "valid_loss": loss, "perplexity": math.exp(loss), "steps": end,
            "params": count_parameters(model), "weights": sublayer_weights(order, cfg.d_model),
            "seconds": time.perf_counter() - t0}
