"""What the multi-task searches on the RNN space share (CAS, :mod:`pynas.strategies.cas`; MAS,
:mod:`pynas.strategies.mas`): their tasks, their settings, training one fixed cell on one task, scoring it, and the
run's record of finished parts.

Tasks (:func:`load_tasks`): ``tasks='stdlib'`` builds :func:`pynas.rnn.tasks.make_stdlib_tasks` (``n_tasks`` language
modelling tasks on disjoint parts of the embedded corpus, no download); otherwise ``tasks`` is a comma-separated list
of sources, each a folder holding ``train.txt``, ``valid.txt``, ``test.txt`` (:func:`pynas.rnn.tasks.read_text_task`)
or a TSV file ``FILE.tsv`` or ``FILE.tsv:COLUMN`` (a 0-based index or a header name;
:func:`pynas.rnn.tasks.read_tsv_task`). The tasks share one dictionary (:func:`pynas.rnn.tasks.tasks_dictionary`,
``vocab_size`` entries), so one model's embedding and decoder serve all of them.

Training a cell (:func:`train_cell`): the searches' weight step (SGD at ``lr``, 5 % of the batches at bptt / 2
with the lr scaled, AR and TAR, the gradient clipped to ``clip``, hidden states carried and reset each epoch) over
the task's whole training split with one genotype, from the model's current weights, plus a penalty when given;
a checkpoint after every epoch (atomic; read back without running code), so a killed run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..rnn.data import batchify, get_batch
from ..rnn.model_search import mean_nll, regularised_loss
from ..rnn.tasks import DEFAULT_TASK_TOKENS, DEFAULT_TASK_VOCAB, LMTask
from .rnn import clipped_step, scaled_lr
from .checkpoint import atomic_save, checkpoint_checksum, load_checkpoint
from .config import _is_int, check_number, check_positive_int

CELL_FORMAT = "pynas-cell-training"
RESULTS_NAME = "results.json"


@dataclass
class TaskSettings:
    """The tasks of a multi-task search and how each searched cell is trained for scoring."""

    tasks: str = "stdlib"  # 'stdlib' or a comma-separated list of task folders / TSV files (module docstring)
    n_tasks: int = 3  # stdlib: how many tasks
    task_tokens: int = DEFAULT_TASK_TOKENS  # stdlib: tokens per task
    vocab_size: int = DEFAULT_TASK_VOCAB  # the shared dictionary's size, <unk> included
    train_epochs: int = 10  # epochs of each cell's training on a task (the paper's "retrain")
    train_steps_per_epoch: Optional[int] = None  # cap on its iterations per epoch


def check_task_settings(s: TaskSettings) -> None:
    if not isinstance(s.tasks, str) or not s.tasks.strip():
        raise ValueError(f"tasks: expected 'stdlib' or a comma-separated list of task folders / TSV files, got "
                         f"{s.tasks!r}")
    for name in ("n_tasks", "task_tokens", "vocab_size", "train_epochs"):
        check_positive_int(name, getattr(s, name))
    if s.n_tasks < 2 and s.tasks == "stdlib":
        raise ValueError(f"n_tasks: a multi-task search needs at least 2 tasks, got {s.n_tasks}")
    if s.train_steps_per_epoch is not None:
        check_positive_int("train_steps_per_epoch", s.train_steps_per_epoch)


def check_search_settings(search: object, method: str, make_config: Callable[[], object]) -> None:
    """A multi-task method's ``search`` settings: a mapping of RNN search settings without ``method`` (the method
    searches with ENAS); ``make_config()`` builds the search's settings from it, checked as a search checks them."""
    from .rnn import check_config as check_search

    if not isinstance(search, dict):
        raise ValueError(f"search: expected a mapping of RNN search settings, got {type(search).__name__}")
    if "method" in search:
        raise ValueError(f"search: {method} searches with ENAS; 'method' is not a setting here")
    try:
        check_search(make_config())
    except TypeError as exc:
        raise ValueError(f"search: {exc}") from None


def load_tasks(s: TaskSettings) -> List[LMTask]:
    """The tasks the settings name, sharing one dictionary (module docstring)."""
    from ..rnn import tasks as T

    check_task_settings(s)
    if s.tasks == "stdlib":
        try:
            return T.make_stdlib_tasks(s.n_tasks, max_tokens=s.task_tokens, vocab_size=s.vocab_size)
        except ValueError as exc:  # its argument is this setting
            text = str(exc)
            raise ValueError("task_tokens:" + text[len("max_tokens:"):] if text.startswith("max_tokens:")
                             else text) from None
    sources = [x.strip() for x in s.tasks.split(",")]
    if any(not x for x in sources) or len(sources) < 2:
        raise ValueError(f"tasks: expected at least 2 comma-separated task sources, got {s.tasks!r}")
    read = []
    for k, src in enumerate(sources):
        path, _, column = src.partition(".tsv:")
        tsv = bool(column) or src.endswith(".tsv")
        path = path + ".tsv" if column else src
        name = f"{k}-{os.path.basename(path.rstrip(os.sep)) or path}"
        if tsv:
            col = int(column) if column.isdigit() else (column or 0)
            read.append(T.read_tsv_task(name, path, column=col))
        else:
            read.append(T.read_text_task(name, path))
    return T.tasks_dictionary(read, s.vocab_size)


def shared_state(model) -> Dict[str, torch.Tensor]:
    """The shared weights theta of an ENAS model (every entry of its state_dict but the controller's), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("controller.") and k != "enas_baseline"}


def load_shared(model, state: Dict[str, torch.Tensor]) -> None:
    """Put theta (from :func:`shared_state`) into a model of the same sizes; only controller entries may be left."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("controller.") and k != "enas_baseline"]
    if missing or unexpected:
        raise ValueError(f"weights: they do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def score(model, genotype, task: LMTask, split: str, cfg) -> float:
    """Mean NLL per token of ``model`` with ``genotype`` on a split of ``task`` (eval mode, ``eval_batch_size``)."""
    model.set_arch(genotype)
    data = batchify(task.split(split), cfg.eval_batch_size).to(next(model.parameters()).device)
    return mean_nll(model, data, cfg.bptt)


def ppl(nll: float) -> float:
    return math.exp(min(nll, 50.0))


def train_cell(model, genotype, task: LMTask, cfg, epochs: int, path: Optional[str], seed: int,
               penalty: Optional[Callable[[], torch.Tensor]] = None, steps_per_epoch: Optional[int] = None,
               log: Callable[[str], None] = print, label: str = "") -> List[dict]:
    """Train ``model`` with ``genotype`` fixed on ``task``'s training split for ``epochs`` epochs (module
    docstring), from its current weights; ``cfg``: an RNN search's settings (lr, clip, bptt, batch sizes,
    regularisers); ``path``: the checkpoint (resumed from when it exists; None: none written). Returns the
    per-epoch records (train and validation NLL)."""
    device = next(model.parameters()).device
    weights = [p for n, p in model.named_parameters() if not n.startswith("controller.")]
    optimizer = torch.optim.SGD(weights, lr=cfg.lr, weight_decay=cfg.wdecay)
    data = batchify(task.train, cfg.batch_size).to(device)
    valid = batchify(task.valid, cfg.eval_batch_size).to(device)
    history: List[dict] = []
    start = 0
    torch.manual_seed(seed)
    settings = {"task": task.name, "genotype": json.loads(_genotype_json(genotype)), "epochs": epochs,
                "seed": seed, "search": dataclasses.asdict(cfg)}
    if path is not None and os.path.exists(path):
        ckpt = load_checkpoint(path, CELL_FORMAT, what="resume")
        if json.loads(json.dumps(ckpt["config"])) != json.loads(json.dumps(settings)):
            raise ValueError(f"resume: {path} holds the training of another cell, task or settings")
        start = ckpt["epoch"]
        if not _is_int(start) or not 0 <= start <= epochs:
            raise ValueError(f"resume: {path}: 'epoch' is {start!r}, expected an integer in [0, {epochs}]")
        try:
            model.load_state_dict(ckpt["model"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"resume: {path} does not fit this model: {exc}") from None
        history = list(ckpt["history"])
        torch.set_rng_state(ckpt["torch_rng"])
    model.set_arch(genotype)
    for epoch in range(start, epochs):
        model.train()
        rng = random.Random(seed * 1000003 + epoch)
        hidden = model.init_hidden(cfg.batch_size)
        i, steps, loss_sum, tokens = 0, 0, 0.0, 0
        while i < data.size(0) - 2:
            if steps_per_epoch and steps >= steps_per_epoch:
                break
            seq_len = max(int(cfg.bptt if rng.random() < 0.95 else cfg.bptt / 2.0), 1)
            x, y = get_batch(data, i, seq_len)
            hidden = [h.detach() for h in hidden]
            with scaled_lr(optimizer, seq_len / cfg.bptt):
                optimizer.zero_grad()
                loss, raw, hidden = regularised_loss(model, x, y, hidden, cfg.alpha, cfg.beta)
                if penalty is not None:
                    loss = loss + penalty()
                clipped_step(optimizer, weights, loss, cfg.clip)
            loss_sum = raw.detach() * y.numel() + loss_sum
            tokens += y.numel()
            steps += 1
            i += seq_len
        val = mean_nll(model, valid, cfg.bptt)
        record = {"epoch": epoch + 1, "steps": steps, "train_loss": float(loss_sum) / max(tokens, 1),
                  "val_loss": val, "val_ppl": ppl(val)}
        history.append(record)
        log(f"{label}train epoch {epoch + 1}/{epochs} steps {steps} train_loss {record['train_loss']:.4f} "
            f"val_ppl {record['val_ppl']:.2f}")
        if path is not None:
            state = {"format": CELL_FORMAT, "version": 2, "config": settings, "epoch": epoch + 1,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                     "torch_rng": torch.get_rng_state()}
            state["checksum"] = checkpoint_checksum(state)
            atomic_save(state, path)
    return history


def write_genotype(folder: str, name: str, genotype) -> None:
    """``genotypes/<name>.json`` (for ``pynas train rnn``) and its picture ``genotypes/<name>.svg`` in ``folder``."""
    from ..plot import load_graphs, svg

    out = os.path.join(folder, "genotypes")
    os.makedirs(out, exist_ok=True)
    text = _genotype_json(genotype)
    for ext, data in ((".json", text + "\n"), (".svg", svg(load_graphs(text)))):
        _write_text(os.path.join(out, name + ext), data)


def _write_text(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file, fsynced and renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _genotype_json(genotype) -> str:
    from ..rnn.genotypes import to_json

    return to_json(genotype)


#: Search settings a resumed run may change: where it runs, not what it computes.
PLACE_SETTINGS = ("device", "backend")


def _comparable(settings):
    if not isinstance(settings, dict) or not isinstance(settings.get("search"), dict):
        return settings
    return {**settings, "search": {k: v for k, v in settings["search"].items() if k not in PLACE_SETTINGS}}


def saved_config(config_cls, folder: str, **place):
    """The settings a run folder's ``results.json`` holds, as ``config_cls``; ``place`` (device, backend) replaces
    where the searches run."""
    path = os.path.join(folder, RESULTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no {RESULTS_NAME} in {folder}: not a run folder of this search")
    try:
        with open(path, encoding="utf-8") as fh:
            settings = json.load(fh)["settings"]
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(settings) - known)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"resume: {path} is not a pynas results file ({exc})") from None
    if unknown:
        raise ValueError(f"resume: {path} has unknown settings {unknown}")
    cfg = config_cls(**settings)
    if isinstance(cfg.search, dict):
        cfg.search = {**cfg.search, **{k: v for k, v in place.items() if k in PLACE_SETTINGS and v is not None}}
    return cfg


class Results:
    """The run's finished parts (``results.json`` in the run folder, replaced atomically after each part): a new
    run writes its settings there; a resumed one must have the same settings, and skips what is recorded."""

    def __init__(self, folder: str, settings: dict):
        self.path = os.path.join(folder, RESULTS_NAME)
        settings = json.loads(json.dumps(settings))
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except ValueError as exc:
                raise ValueError(f"resume: {self.path} is not readable JSON ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("parts"), dict):
                raise ValueError(f"resume: {self.path} is not a pynas results file")
            if _comparable(data.get("settings")) != _comparable(settings):
                raise ValueError(f"resume: {self.path} holds other settings; resume with the same ones (or another "
                                 f"folder)")
            self.data = data
        else:
            self.data = {"settings": settings, "parts": {}}
            self._write()

    def get(self, key: str) -> Optional[dict]:
        return self.data["parts"].get(key)

    def put(self, key: str, value: dict) -> None:
        self.data["parts"][key] = value
        self._write()

    def _write(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def run_enas_search(search, folder: str, log: Callable[[str], None]):
    """Run an ENAS search object in ``folder`` (resumed from its checkpoint there when one exists): the derived
    genotype."""
    from ..rnn.genotypes import from_json
    from .checkpoint import CHECKPOINT_NAME

    search.save_dir = folder
    search.log = log
    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, CHECKPOINT_NAME)
    if os.path.exists(ckpt):
        search.load_state(load_checkpoint(ckpt))
    search.run()
    return from_json(search.final_genotype_json())


def number_check(name: str, v) -> float:
    return check_number(name, v, low=0.0)


def table(header: List[str], rows: List[List[str]]) -> str:
    """A plain-text table (markdown pipes)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
