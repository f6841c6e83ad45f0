"""The DARTS RNN search loop: a word-level language model whose recurrent cell is searched.

As docs/darts.md ("RNN space", "The search loop") states: the training tokens are split in two halves, the first trains the weights w, the
second the architecture alpha. Each iteration takes a (train, search) batch pair of ``bptt`` steps (5 % of
the iterations use bptt / 2, with the learning rate scaled by seq_len / bptt): the architect steps alpha
(first or second order, the RNN rules: no momentum, clip 0.25), then SGD steps the weights on the train
batch with the temporal activation regularisation (``beta``) and, if set, the activation regularisation
(``alpha``), the gradient clipped to ``clip``. Hidden states are carried across batches (detached) and
reset at the start of each epoch. Perplexity on the validation text is logged after every epoch, and a
checkpoint is written atomically; ``resume`` continues a run exactly as if it had not stopped.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..rnn.data import DEFAULT_MAX_TOKENS, STDLIB_MIN_TOKENS, batchify, get_batch, load_corpus, stdlib_min_tokens
from ..rnn.genotypes import to_json
from ..rnn.model_search import RNNModelSearch, mean_nll, regularised_loss
from ..strategies.darts import RNNArchitect as Architect
from .config import (HessianSettings, check_flag, check_hessian_settings, check_number, check_optional_int,
                     check_place, check_positive_int, check_seed)
from .loop import SearchCheckpoints, check_tensorboard, data_parallel, epoch_bar, start_or_resume


@dataclass
class RNNSearchConfig(HessianSettings):
    """Settings of an RNN search; the defaults are DARTS's (rnn/train_search.py)."""

    data: str = "stdlib"
    data_dir: Optional[str] = None
    max_tokens: Optional[int] = None  # stdlib corpus: cap on its size (None: the corpus's default)
    emsize: int = 300
    nhid: int = 300
    nhidlast: int = 300
    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 50
    batch_size: int = 256
    bptt: int = 35
    dropout: float = 0.75
    dropouth: float = 0.25
    dropoutx: float = 0.75
    dropouti: float = 0.2
    dropoute: float = 0.0
    alpha: float = 0.0  # activation regularisation (on the dropped outputs)
    beta: float = 1e-3  # temporal activation regularisation (slowness)
    wdecay: float = 5e-7
    unrolled: bool = False
    fd_r: float = 0.01
    arch_lr: float = 3e-3
    arch_wdecay: float = 1e-3
    eval_batch_size: int = 10
    seed: int = 2
    steps_per_epoch: Optional[int] = None  # cap on iterations per epoch (None: a full pass)
    device: str = "cpu"
    backend: str = "auto"
    tensorboard: bool = False  # per-epoch scalars as TensorBoard event files in <run folder>/tensorboard
    method: str = "darts"  # darts, idarts (pynas.strategies.idarts), rsws (pynas.strategies.rsws), enas, ess
    forbid_s0: bool = True  # I-DARTS's genotype: nodes after the first never take s0 (as the author's code)
    rsws_samples: int = 1000  # RSWS: cells ranked with the shared weights after training
    rsws_eval_batches: int = 10  # RSWS: validation chunks of bptt steps scoring each of them
    rsws_top: int = 10  # RSWS: the best of them re-scored on the whole validation text
    enas_controller_steps: int = 2000  # ENAS (pynas.strategies.enas): REINFORCE steps per epoch
    enas_derive_samples: int = 100  # ENAS: controller samples scored for the derived cell
    enas_controller_lr: float = 3.5e-4
    enas_entropy_weight: float = 1e-4
    enas_baseline_decay: float = 0.95
    enas_temperature: float = 5.0
    enas_tanh_constant: float = 2.5
    enas_hidden: int = 100
    enas_reward_c: float = 80.0  # reward = c / validation perplexity
    ess_m: int = 3  # ESS (pynas.strategies.ess): the history window of the inter-cell DAGs
    ess_nodes: int = 3  # ESS: intermediate nodes of each inter-cell DAG

    @classmethod
    def for_method(cls, method: str = "darts", **settings) -> "RNNSearchConfig":
        """The settings of a ``method`` search: its defaults (RSWS: batch 64, 100 epochs), then ``settings``."""
        if method not in RNN_METHODS:
            raise ValueError(f"method: expected one of {', '.join(RNN_METHODS)} on the RNN space, got {method!r}")
        defaults = {}
        if method == "rsws":
            from ..strategies.rsws import RNN_DEFAULTS as defaults
        elif method == "enas":
            from ..strategies.enas import RNN_DEFAULTS as defaults
        return cls(**{**defaults, **settings, "method": method})


#: The methods on the RNN space.
RNN_METHODS = ("darts", "idarts", "rsws", "enas", "ess")


def check_config(cfg: RNNSearchConfig) -> None:
    for name in ("emsize", "nhid", "epochs", "batch_size", "bptt", "eval_batch_size"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size: the search cell's BatchNorm needs at least 2 sequences, got {cfg.batch_size}")
    if not (cfg.emsize == cfg.nhid == cfg.nhidlast):
        raise ValueError(f"emsize, nhid, nhidlast: the decoder is tied to the embedding, so they must be equal, "
                         f"got {cfg.emsize}, {cfg.nhid}, {cfg.nhidlast}")
    for name in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
    for name in ("lr", "clip", "fd_r", "arch_lr"):
        check_number(name, getattr(cfg, name), low=0.0, low_open=True)
    for name in ("alpha", "beta", "wdecay", "arch_wdecay"):
        check_number(name, getattr(cfg, name), low=0.0)
    check_optional_int("steps_per_epoch", cfg.steps_per_epoch)
    check_flag("unrolled", cfg.unrolled)
    check_seed(cfg.seed)
    if cfg.data not in ("stdlib", "ptb"):
        raise ValueError(f"data: expected 'stdlib' or 'ptb', got {cfg.data!r}")
    if cfg.max_tokens is not None:
        if not isinstance(cfg.max_tokens, int) or isinstance(cfg.max_tokens, bool) or cfg.max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {cfg.max_tokens!r}")
        if cfg.data != "stdlib":
            raise ValueError(f"max_tokens: only the stdlib corpus has a size to choose (data is {cfg.data!r})")
        if cfg.max_tokens < STDLIB_MIN_TOKENS:
            raise ValueError(f"max_tokens: expected at least {STDLIB_MIN_TOKENS} (the stdlib corpus's minimum), got "
                             f"{cfg.max_tokens}")
        if cfg.max_tokens < _need_train(cfg) + _need_valid(cfg):  # surely too small: say what is enough
            try:
                enough = stdlib_min_tokens(_need_train(cfg), _need_valid(cfg))
            except RuntimeError:
                enough = None
            use = f"use --max-tokens {enough} or more" if enough is not None else "use a larger --max-tokens"
            raise ValueError(f"max_tokens: {cfg.max_tokens} tokens are too few for batch_size {cfg.batch_size} "
                             f"and eval_batch_size {cfg.eval_batch_size} ({_need_train(cfg)} training tokens: two "
                             f"halves of 4 x batch_size, and {_need_valid(cfg)} validation tokens: 2 x "
                             f"eval_batch_size); {use}")
    if cfg.data == "ptb" and not cfg.data_dir:
        raise ValueError("data_dir: --data ptb needs --data-dir (the folder with ptb.train.txt, ptb.valid.txt, "
                         "ptb.test.txt)")
    check_place(cfg)
    check_hessian_settings(cfg)
    check_tensorboard(cfg.tensorboard)
    if cfg.method not in RNN_METHODS:
        raise ValueError(f"method: expected one of {', '.join(RNN_METHODS)} on the RNN space, got {cfg.method!r}")
    check_flag("forbid_s0", cfg.forbid_s0)
    for name in ("rsws_samples", "rsws_eval_batches", "rsws_top"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.method == "rsws":
        if cfg.rsws_top > cfg.rsws_samples:
            raise ValueError(f"rsws_top: expected at most rsws_samples ({cfg.rsws_samples}), got {cfg.rsws_top}")
        if cfg.track_hessian:
            raise ValueError("track_hessian: random search with weight sharing has no architecture parameters")
        if cfg.unrolled:
            raise ValueError("unrolled: rsws has no architecture step")
    for name in ("enas_controller_steps", "enas_derive_samples", "enas_hidden"):
        check_positive_int(name, getattr(cfg, name))
    for name in ("enas_controller_lr", "enas_temperature", "enas_tanh_constant", "enas_reward_c"):
        check_number(name, getattr(cfg, name), low=0.0, low_open=True)
    check_number("enas_entropy_weight", cfg.enas_entropy_weight, low=0.0)
    check_number("enas_baseline_decay", cfg.enas_baseline_decay, low=0.0, high=1.0, high_open=True)
    if cfg.method == "enas":
        if cfg.track_hessian:
            raise ValueError("track_hessian: ENAS has no architecture parameters (its controller samples cells)")
        if cfg.unrolled:
            raise ValueError("unrolled: ENAS's architecture step is REINFORCE, it has no second order")
    for name in ("ess_m", "ess_nodes"):
        check_positive_int(name, getattr(cfg, name))


def _need_train(cfg: RNNSearchConfig) -> int:
    """Training tokens a search needs: two halves (weights, architecture) of at least 4 x batch_size tokens."""
    return 8 * cfg.batch_size


def _need_valid(cfg: RNNSearchConfig) -> int:
    """Validation tokens: at least 2 rows of eval_batch_size columns."""
    return 2 * cfg.eval_batch_size


def _check_corpus(cfg: RNNSearchConfig, corpus) -> None:
    """Whether the corpus is large enough for the batch sizes; the error names what to change."""
    n_train, n_valid = corpus.train.numel(), corpus.valid.numel()
    need_train, need_valid = _need_train(cfg), _need_valid(cfg)
    if n_train >= need_train and n_valid >= need_valid:
        return
    have = (f"{n_train} training and {n_valid} validation tokens; batch_size {cfg.batch_size} needs at least "
            f"{need_train} training tokens (two halves of 4 x batch_size) and eval_batch_size {cfg.eval_batch_size} "
            f"at least {need_valid} validation tokens")
    if cfg.data == "stdlib":
        cap = cfg.max_tokens if cfg.max_tokens is not None else DEFAULT_MAX_TOKENS
        enough = stdlib_min_tokens(need_train, need_valid)
        if enough is not None and enough > cap:
            raise ValueError(f"max_tokens: the stdlib corpus cut at {cap} tokens has {have}; use --max-tokens "
                             f"{enough} or more")
        name = "batch_size" if n_train < need_train else "eval_batch_size"
        raise ValueError(f"{name}: the whole stdlib corpus has {have}; use smaller batches")
    name = "batch_size" if n_train < need_train else "eval_batch_size"
    raise ValueError(f"{name}: the corpus in {cfg.data_dir} has {have}")


@contextlib.contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float):
    """The optimizer's (first group's) lr times ``factor`` inside (DARTS's RNN step: seq_len / bptt)."""
    group = optimizer.param_groups[0]
    lr = group["lr"]
    group["lr"] = lr * factor
    try:
        yield
    finally:
        group["lr"] = lr


def clipped_step(optimizer: torch.optim.Optimizer, weights, loss: torch.Tensor, clip: float, dist=None) -> None:
    """Backward of ``loss``, the gradient averaged over ``dist``'s ranks (data-parallel) and clipped to norm
    ``clip``, then the optimizer's step (the caller zeroed the gradients)."""
    loss.backward()
    if dist is not None:  # the global batch's gradient, before the clipping
        dist.average_grads_(weights)
    torch.nn.utils.clip_grad_norm_(weights, clip)
    optimizer.step()


def _check_task_size(cfg: RNNSearchConfig, task) -> None:
    """Whether a given corpus (a task) is large enough for the batch sizes."""
    n_train, n_valid = task.train.numel(), task.valid.numel()
    if n_train < _need_train(cfg):
        raise ValueError(f"batch_size: task {task.name!r} has {n_train} training tokens; batch_size {cfg.batch_size} "
                         f"needs at least {_need_train(cfg)} (two halves of 4 x batch_size)")
    if n_valid < _need_valid(cfg):
        raise ValueError(f"eval_batch_size: task {task.name!r} has {n_valid} validation tokens; eval_batch_size "
                         f"{cfg.eval_batch_size} needs at least {_need_valid(cfg)}")


class RNNSearch(SearchCheckpoints):
    """A DARTS RNN search run: build it, call :meth:`run`; see :func:`run_rnn_search`."""

    SPACE = "rnn"
    check_config = staticmethod(check_config)

    def __init__(self, cfg: RNNSearchConfig, save_dir: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True, corpus=None):
        check_config(cfg)
        self.cfg, self.save_dir, self.log, self.progress = cfg, save_dir, log, progress
        self.device = torch.device(cfg.device)
        if corpus is None:
            kw = {"max_tokens": cfg.max_tokens} if cfg.max_tokens is not None else {}
            self.corpus = load_corpus(cfg.data, cfg.data_dir, **kw)
            _check_corpus(cfg, self.corpus)  # each half must give batches of at least 4 steps
        else:  # a task of pynas.rnn.tasks (CAS, MAS): cfg.data is not read
            self.corpus = corpus
            _check_task_size(cfg, corpus)
        #: a function () -> 0-d tensor added to the weight step's loss (CAS's penalties), or None
        self.weight_penalty: Optional[Callable[[], torch.Tensor]] = None
        train = self.corpus.train
        half = train.numel() // 2
        self.train_data = batchify(train[:half], cfg.batch_size).to(self.device)
        self.search_data = batchify(train[half:], cfg.batch_size).to(self.device)
        self.val_data = batchify(self.corpus.valid, cfg.eval_batch_size).to(self.device)
        torch.manual_seed(cfg.seed)
        args = (self.corpus.ntokens, cfg.emsize, cfg.nhid, cfg.nhidlast, cfg.dropout, cfg.dropouth, cfg.dropoutx,
                cfg.dropouti, cfg.dropoute)
        self.final = None  # RSWS: the selection after the last epoch
        if cfg.method == "idarts":
            from ..strategies.idarts import IDARTSRNNModel

            self.model = IDARTSRNNModel(*args, forbid_s0=cfg.forbid_s0).to(self.device)
        elif cfg.method == "rsws":
            from ..strategies import rsws

            self.model = rsws.rnn_model(self.corpus.ntokens, cfg, cfg.seed).to(self.device)
        elif cfg.method == "enas":
            from ..strategies import enas

            self.model = enas.enas_model(self.corpus.ntokens, cfg, cfg.seed).to(self.device)
        elif cfg.method == "ess":  # the DARTS architect steps alpha, beta_f and beta_g together
            from ..strategies.ess import ESSRNNModel

            self.model = ESSRNNModel(*args, m=cfg.ess_m, nodes=cfg.ess_nodes).to(self.device)
        else:
            self.model = RNNModelSearch(*args).to(self.device)
        self.dist = data_parallel(self)
        if self.dist is not None:  # each rank carries its share of the batch's columns (hidden states too)
            self.train_data = self.dist.shard(self.train_data, dim=1)
            self.search_data_full, self.search_data = self.search_data, self.dist.shard(self.search_data, dim=1)
        # the weights SGD steps (ENAS: not its controller, which REINFORCE trains)
        self.weights = enas.shared_parameters(self.model) if cfg.method == "enas" else list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.weights, lr=cfg.lr, weight_decay=cfg.wdecay)
        if cfg.method == "rsws":
            self.architect = None
        elif cfg.method == "enas":
            self.architect = enas.ENASArchitect(self.model, cfg)
        else:
            self.architect = Architect(self.model, weight_decay=cfg.wdecay, clip=cfg.clip,
                                       arch_learning_rate=cfg.arch_lr, arch_weight_decay=cfg.arch_wdecay, fd_r=cfg.fd_r)
        self.epoch = 0
        self.history: List[dict] = []
        self._replay_early_stop()

    def genotype_json(self) -> str:
        return to_json(self.model.genotype())

    def finish(self):
        if self.cfg.method == "rsws":
            from ..strategies.rsws import rnn_select

            self.final = rnn_select(self)
        elif self.cfg.method == "enas":
            from ..strategies.enas import enas_select

            self.final = enas_select(self)
        return self.final

    def final_record(self):
        return self.final

    def load_final(self, record) -> None:
        if self.cfg.method == "rsws":
            from ..strategies.rsws import rnn_load_final

            rnn_load_final(self, record)
            self.final = record
        elif self.cfg.method == "enas":
            from ..strategies.enas import enas_load_final

            enas_load_final(self, record)
            self.final = record

    def hessian_loss(self) -> Callable[[], torch.Tensor]:
        """The arch loss on a fixed batch: the first ``bptt`` steps of the architecture half (the data the arch
        step uses), from a zero hidden state; train mode, so dropout masks are drawn (from the fixed seed
        :meth:`hessian_eigenvalue` sets, so the same masks after every epoch)."""
        data, targets = get_batch(getattr(self, "search_data_full", self.search_data), 0, self.cfg.bptt)
        hidden = self.model.init_hidden(self.cfg.batch_size)  # the whole batch (data-parallel: on every rank)
        return lambda: self.model._loss(hidden, data, targets)[0]

    # -- the loop ----------------------------------------------------------------
    def _weight_loss(self, data, targets, hidden):
        """The weight step's loss: NLL + alpha * AR + beta * TAR, and the raw NLL and next hidden."""
        loss, raw_loss, hidden = regularised_loss(self.model, data, targets, hidden, self.cfg.alpha, self.cfg.beta)
        if self.weight_penalty is not None:
            loss = loss + self.weight_penalty()
        return loss, raw_loss, hidden

    def _scaled_lr(self, seq_len: int):
        """The weight lr scaled by ``seq_len / bptt`` inside (the architect's virtual step reads it too)."""
        return scaled_lr(self.optimizer, seq_len / self.cfg.bptt)

    def _weight_update(self, data, targets, hidden):
        """One SGD step of the weights on a batch (gradient clipped to ``clip``): the raw NLL and next hidden."""
        self.optimizer.zero_grad()
        loss, raw_loss, hidden = self._weight_loss(data, targets, hidden)
        clipped_step(self.optimizer, self.weights, loss, self.cfg.clip, self.dist)
        return raw_loss, hidden

    def train_epoch(self, epoch: int):
        cfg, model = self.cfg, self.model
        model.train()
        rng = random.Random(cfg.seed * 1000003 + epoch)  # bptt draws: per epoch, so a resumed run repeats them
        hidden = model.init_hidden(self.train_data.size(1))  # this rank's columns (all of them alone)
        hidden_valid = model.init_hidden(self.search_data.size(1))
        n_rows, n_search = self.train_data.size(0), self.search_data.size(0)
        total = (n_rows - 2) // cfg.bptt + 1
        if cfg.steps_per_epoch:
            total = min(total, cfg.steps_per_epoch)
        bar = epoch_bar(self.progress, total, epoch, cfg.epochs)
        sample = None
        if cfg.method == "rsws":
            from ..strategies.rsws import rnn_epoch_sampler

            sample = rnn_epoch_sampler(cfg, epoch)
        elif cfg.method == "enas":
            sample = self.architect.sampler(epoch)
        loss_sum, tokens, steps, i = 0.0, 0, 0, 0
        while i < n_rows - 1 - 1:
            if cfg.steps_per_epoch and steps >= cfg.steps_per_epoch:
                break
            bptt = cfg.bptt if rng.random() < 0.95 else cfg.bptt / 2.0
            seq_len = max(int(bptt), 1)
            with self._scaled_lr(seq_len):
                data_valid, targets_valid = get_batch(self.search_data, i % (n_search - 1), cfg.bptt)
                # the train batch has seq_len steps (docs/darts.md: 5 % of the batches use bptt / 2; the reference
                # code reads full bptt batches there and only scales the lr and the stride)
                data, targets = get_batch(self.train_data, i, seq_len)
                hidden = [h.detach() for h in hidden]
                hidden_valid = [h.detach() for h in hidden_valid]
                if sample is not None:  # RSWS, ENAS: a sampled cell per batch, no architecture step here
                    model.set_arch(sample())
                else:
                    hidden_valid, _ = self.architect.step(hidden, data, targets, hidden_valid, data_valid,
                                                          targets_valid, self.optimizer, cfg.unrolled)
                raw_loss, hidden = self._weight_update(data, targets, hidden)
            n_tok = targets.numel()
            # summed on the device: no host sync per iteration (the bar reads it every 10 steps)
            loss_sum = raw_loss.detach() * n_tok + loss_sum
            tokens += n_tok
            steps += 1
            i += seq_len
            if bar is not None:
                bar.update(1)
                if steps % 10 == 1:
                    avg = float(loss_sum) / tokens
                    bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}")
        if bar is not None:
            bar.close()
        if self.dist is not None:  # the global batches' figure; rank 0's BatchNorm statistics for everyone
            total, tokens = self.dist.sum_floats([float(loss_sum), tokens])
            self.dist.broadcast_(model.buffers())
            return total / max(tokens, 1), steps
        return float(loss_sum) / max(tokens, 1), steps

    def evaluate(self, data_source: torch.Tensor) -> float:
        """Mean NLL per token on ``data_source`` (eval mode: no dropout, BatchNorm running statistics)."""
        return mean_nll(self.model, data_source, self.cfg.bptt)

    def run_epoch(self, epoch: int):
        """Train and evaluate one epoch: (the history record's figures, their log text)."""
        train_loss, steps = self.train_epoch(epoch)
        extra = self.architect.controller_phase(self, epoch) if self.cfg.method == "enas" else {}
        val_loss = self.evaluate(self.val_data)
        record = {"lr": self.optimizer.param_groups[0]["lr"], "steps": steps, "train_loss": train_loss,
                  "train_ppl": math.exp(min(train_loss, 50)), "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50)), **extra}
        text = "".join(f" {k} {v:.4f}" for k, v in extra.items())
        return record, (f"steps {steps} train_loss {train_loss:.4f} train_ppl {record['train_ppl']:.2f} "
                        f"val_loss {val_loss:.4f} val_ppl {record['val_ppl']:.2f}{text}")


def run_rnn_search(cfg: RNNSearchConfig, save_dir: Optional[str] = None, resume: Optional[str] = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or resume) an RNN search; returns the final genotype and the per-epoch history."""
    return start_or_resume(RNNSearch, RNNSearchConfig, cfg, save_dir, resume, log, progress)
