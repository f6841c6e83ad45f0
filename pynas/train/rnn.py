"""Train the language model of an RNN genotype from scratch (DARTS's evaluation phase) and test it.

SGD on the training text with the sequence length drawn per batch (bptt, or bptt / 2 with probability 0.05,
then normal with standard deviation 5, at least 5; the learning rate scaled by seq_len / bptt), the loss plus
temporal activation regularisation (``beta``) and activation regularisation (``alpha``), the gradient clipped.
After every epoch the validation text is evaluated; once the validation loss is worse than the best of all
epochs but the last ``nonmono``, SGD switches to averaged SGD (NT-ASGD) and is evaluated with the averaged
weights from then on. The weights of the best validation loss are kept; at the end they are tested on the test
text with batch size 1, as the original code does. Checkpoints and exact resume as for the CNN.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..rnn.data import batchify, get_batch, load_corpus
from ..rnn.genotypes import Genotype, from_json, load_genotype, to_json
from ..rnn.model_eval import RNNModel
from ..rnn.model_search import mean_nll, regularised_loss
from ..search.config import check_number, check_optional_int, check_place, check_positive_int, check_seed
from ..search.loop import check_tensorboard, epoch_bar
from .base import TrainingRun


@dataclass
class RNNTrainConfig:
    """Settings of the training of a derived RNN; the defaults are DARTS's (rnn/train.py)."""

    genotype: str = "DARTS"  # a name of pynas.rnn.genotypes.PUBLISHED or a genotype JSON file
    data: str = "stdlib"
    data_dir: Optional[str] = None
    max_tokens: Optional[int] = None  # stdlib corpus: cap on its size
    emsize: int = 850
    nhid: int = 850
    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 8000
    batch_size: int = 64
    eval_batch_size: int = 10
    test_batch_size: int = 1
    bptt: int = 35
    dropout: float = 0.75
    dropouth: float = 0.25
    dropoutx: float = 0.75
    dropouti: float = 0.2
    dropoute: float = 0.1
    alpha: float = 0.0  # activation regularisation
    beta: float = 1e-3  # temporal activation regularisation
    wdecay: float = 8e-7
    nonmono: int = 5
    seed: int = 1267
    steps_per_epoch: Optional[int] = None
    device: str = "cpu"
    backend: str = "auto"
    tensorboard: bool = False  # per-epoch scalars as TensorBoard event files in <run folder>/tensorboard


def _check_config(cfg: RNNTrainConfig, check_genotype: bool = True) -> None:
    for name in ("emsize", "nhid", "epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "nonmono"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.emsize != cfg.nhid:
        raise ValueError(f"emsize, nhid: expected equal sizes (the decoder is tied to the embedding), got "
                         f"{cfg.emsize}, {cfg.nhid}")
    for name in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute"):
        check_number(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
    for name in ("lr", "clip"):
        check_number(name, getattr(cfg, name), low=0.0, low_open=True)
    for name in ("alpha", "beta", "wdecay"):
        check_number(name, getattr(cfg, name), low=0.0)
    for name in ("max_tokens", "steps_per_epoch"):
        check_optional_int(name, getattr(cfg, name))
    if cfg.data not in ("stdlib", "ptb"):
        raise ValueError(f"data: expected 'stdlib' or 'ptb', got {cfg.data!r}")
    if cfg.data == "ptb" and not cfg.data_dir:
        raise ValueError("data_dir: --data ptb needs --data-dir (the folder with ptb.train.txt, ptb.valid.txt, "
                         "ptb.test.txt)")
    if cfg.max_tokens is not None and cfg.data != "stdlib":
        raise ValueError(f"max_tokens: only the stdlib corpus has a size to choose (data is {cfg.data!r})")
    check_seed(cfg.seed)
    check_place(cfg)
    check_tensorboard(cfg.tensorboard)
    if check_genotype:
        load_genotype(cfg.genotype)


def sequence_length(rng: random.Random, bptt: int) -> int:
    """The batch's length: around bptt (or bptt / 2 with probability 0.05), standard deviation 5, at least 5."""
    base = bptt if rng.random() < 0.95 else bptt / 2.0
    return max(5, int(rng.gauss(base, 5)))


class RNNTraining(TrainingRun):
    """A training run of a derived RNN language model: build it, call :meth:`run`; see :func:`run_training`."""

    SPACE = "rnn"
    CONFIG = RNNTrainConfig
    check_config = staticmethod(_check_config)
    parse_genotype = staticmethod(from_json)
    load_genotype = staticmethod(load_genotype)
    to_json = staticmethod(to_json)

    def __init__(self, cfg: RNNTrainConfig, save_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 progress: bool = True, genotype: Optional[Genotype] = None):
        self.start(cfg, save_dir, log, progress, genotype)
        kw = {"max_tokens": cfg.max_tokens} if cfg.max_tokens is not None else {}
        self.corpus = load_corpus(cfg.data, cfg.data_dir, **kw)
        self._check_corpus()
        self.train_data = batchify(self.corpus.train, cfg.batch_size).to(self.device)
        self.val_data = batchify(self.corpus.valid, cfg.eval_batch_size).to(self.device)
        self.test_data = batchify(self.corpus.test, cfg.test_batch_size).to(self.device)
        torch.manual_seed(cfg.seed)
        model_cls = RNNModel
        if getattr(self.genotype, "inter", None) is not None:  # an ESS genotype: its inter-cell DAGs too
            from ..strategies.ess import ESSModel as model_cls
        self.model = model_cls(self.corpus.ntokens, cfg.emsize, cfg.nhid, cfg.nhid, cfg.dropout, cfg.dropouth,
                               cfg.dropoutx, cfg.dropouti, cfg.dropoute, self.genotype).to(self.device)
        self.optimizer = self._sgd()
        self.asgd = False
        self.best_val_loss: Optional[float] = None
        self.best_model: Optional[dict] = None

    def _check_corpus(self) -> None:
        """Each split holds at least two rows of its batch size; the error names what to change."""
        cfg, c = self.cfg, self.corpus
        need = (4 * cfg.batch_size, 2 * cfg.eval_batch_size, 2 * cfg.test_batch_size)
        have = (c.train.numel(), c.valid.numel(), c.test.numel())
        if all(h >= n for h, n in zip(have, need)):
            return
        text = (f"{have[0]} training, {have[1]} validation and {have[2]} test tokens; batch_size {cfg.batch_size}, "
                f"eval_batch_size {cfg.eval_batch_size} and test_batch_size {cfg.test_batch_size} need at least "
                f"{need[0]}, {need[1]} and {need[2]}")
        if cfg.data == "stdlib" and cfg.max_tokens is not None:
            from ..rnn.data import stdlib_min_tokens

            enough = stdlib_min_tokens(*need)
            use = f"use --max-tokens {enough} or more" if enough else "use smaller batches"
            raise ValueError(f"max_tokens: the stdlib corpus cut at {cfg.max_tokens} tokens has {text}; {use}")
        name = ("batch_size", "eval_batch_size", "test_batch_size")[[h >= n for h, n in zip(have, need)].index(False)]
        raise ValueError(f"{name}: the corpus has {text}")

    def _sgd(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.wdecay)

    def _asgd(self):
        return torch.optim.ASGD(self.model.parameters(), lr=self.cfg.lr, t0=0, lambd=0.0, weight_decay=self.cfg.wdecay)

    # -- checkpoints: the optimizer's kind, the best weights ------------------------
    def extra_state(self) -> dict:
        return {"asgd": self.asgd, "best_val_loss": self.best_val_loss, "best_model": self.best_model}

    def load_extra(self, ckpt: dict, where: str) -> None:
        asgd, best, best_model = ckpt.get("asgd"), ckpt.get("best_val_loss"), ckpt.get("best_model")
        if not isinstance(asgd, bool) or not (best is None or isinstance(best, float)) or \
                not (best_model is None or isinstance(best_model, dict)):
            raise ValueError("the checkpoint's 'asgd', 'best_val_loss' or 'best_model' is not what a training saves")
        if asgd:
            self.optimizer = self._asgd()  # its state_dict is loaded next
        self.asgd, self.best_val_loss = asgd, best
        self.best_model = {k: v.to(self.device) for k, v in best_model.items()} if best_model else None

    # -- the epochs --------------------------------------------------------------
    def train_epoch(self, epoch: int):
        cfg, model = self.cfg, self.model
        model.train()
        rng = random.Random(cfg.seed * 1000003 + epoch)  # the lengths: per epoch, so a resumed run repeats them
        hidden = model.init_hidden(cfg.batch_size)
        n_rows = self.train_data.size(0)
        bar = epoch_bar(self.progress, min((n_rows - 2) // cfg.bptt + 1, cfg.steps_per_epoch or n_rows), epoch, cfg.epochs)
        loss_sum, tokens, steps, i = 0.0, 0, 0, 0
        group = self.optimizer.param_groups[0]
        while i < n_rows - 2:
            if cfg.steps_per_epoch and steps >= cfg.steps_per_epoch:
                break
            seq_len = sequence_length(rng, cfg.bptt)
            lr = group["lr"]
            group["lr"] = lr * seq_len / cfg.bptt
            try:
                data, targets = get_batch(self.train_data, i, seq_len)
                hidden = [h.detach() for h in hidden]
                self.optimizer.zero_grad()
                loss, raw_loss, hidden = regularised_loss(model, data, targets, hidden, cfg.alpha, cfg.beta)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                self.optimizer.step()
            finally:
                group["lr"] = lr
            loss_sum += float(raw_loss.detach()) * targets.numel()
            tokens += targets.numel()
            steps += 1
            i += seq_len
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ppl=f"{math.exp(min(loss_sum / tokens, 50)):.1f}")
        if bar is not None:
            bar.close()
        return loss_sum / max(tokens, 1), steps

    def evaluate(self, data_source: torch.Tensor) -> float:
        """Mean NLL per token on ``data_source`` (eval mode)."""
        return mean_nll(self.model, data_source, self.cfg.bptt)

    def _evaluate_averaged(self) -> float:
        """The validation loss with ASGD's averaged weights in place of the current ones (restored after)."""
        params = list(self.model.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.copy_(self.optimizer.state[p]["ax"])
        try:
            return self.evaluate(self.val_data)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def _averaged_state(self) -> dict:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            state[names[id(p)]] = self.optimizer.state[p]["ax"].detach().clone()
        if "decoder.weight" in state:  # tied: the same tensor under both names
            state["decoder.weight"] = state["encoder.weight"]
        return state

    def run(self, until: Optional[int] = None) -> dict:
        from .. import _backend

        cfg = self.cfg
        stop = cfg.epochs if until is None else min(until, cfg.epochs)
        if self.epoch == 0:
            n = sum(p.numel() for p in self.model.parameters())
            self.log(f"training {cfg.genotype}: {n / 1e6:.3f} M weights, {self.corpus.train.numel()} training, "
                     f"{self.corpus.valid.numel()} validation and {self.corpus.test.numel()} test tokens "
                     f"({self.corpus.name}, {self.corpus.ntokens} words)")
        with _backend.use_backend(cfg.backend):
            while self.epoch < stop:
                epoch, t0 = self.epoch, time.perf_counter()
                train_loss, steps = self.train_epoch(epoch)
                if self.asgd:
                    val_loss = self._evaluate_averaged()
                    weights = self._averaged_state
                else:
                    val_loss = self.evaluate(self.val_data)
                    weights = lambda: {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # noqa: E731
                if self.best_val_loss is None or val_loss < self.best_val_loss:
                    self.best_val_loss, self.best_model = val_loss, weights()
                switched = False
                losses = [r["val_loss"] for r in self.history]
                if not self.asgd and len(losses) > cfg.nonmono and val_loss > min(losses[:-cfg.nonmono]):
                    self.optimizer, self.asgd, switched = self._asgd(), True, True
                seconds = time.perf_counter() - t0
                self.history.append({"epoch": epoch + 1, "steps": steps, "optimizer": "asgd" if self.asgd else "sgd",
                                     "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 50)),
                                     "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                                     "seconds": seconds})
                self.epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs} steps {steps} train_ppl {math.exp(min(train_loss, 50)):.2f} "
                         f"val_ppl {math.exp(min(val_loss, 50)):.2f} time {seconds:.1f}s"
                         + ("; switching to averaged SGD" if switched else ""))
                self.save()
        return self.finish()

    def finish(self) -> dict:
        """Test the best weights on the test text; the model is left holding them."""
        if self.best_model is not None:
            self.model.load_state_dict(self.best_model)
        test_loss = self.evaluate(self.test_data)
        ppl = math.exp(min(test_loss, 50))
        self.log(f"test perplexity {ppl:.2f} (best validation perplexity "
                 f"{math.exp(min(self.best_val_loss or float('inf'), 50)):.2f})")
        return {"test_loss": test_loss, "test_ppl": ppl, "best_val_loss": self.best_val_loss,
                "history": self.history}


def run_training(cfg: RNNTrainConfig, save_dir: Optional[str] = None, resume: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume training) the language model of ``cfg.genotype``; returns the test perplexity."""
    return RNNTraining.start_or_resume(cfg, save_dir, resume, log, progress)


def evaluate_checkpoint(path: str, data_dir: Optional[str] = None, device: str = "cpu") -> dict:
    """Test perplexity of the best weights of a training checkpoint (or its run folder)."""
    ckpt, cfg, genotype = RNNTraining.read_checkpoint(path, "checkpoint")
    cfg.device = device
    if data_dir is not None:
        cfg.data_dir = data_dir
    try:
        _check_config(cfg, check_genotype=False)
    except ValueError as exc:
        raise ValueError(f"checkpoint: {path}: its settings are refused: {exc}") from None
    run = RNNTraining(cfg, log=lambda s: None, progress=False, genotype=genotype)
    run.load_state(ckpt, path)
    r = run.finish()
    return {"test_ppl": r["test_ppl"], "test_loss": r["test_loss"], "epoch": ckpt["epoch"],
            "tokens": run.corpus.test.numel()}
