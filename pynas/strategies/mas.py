"""Multi-task architecture search (MAS; Pasunuru and Bansal, ACL 2019) on the DARTS RNN space, on ENAS.

One controller and one set of shared weights for n tasks at once (:mod:`pynas.search.lm_tasks`; the tasks share one
dictionary, so one embedding and one decoder serve all of them). As the code's ``trainer.py`` with ``--multitask``:

* **Shared weights** (:class:`MASSearch`): the weight steps take the tasks in turn (step s trains on task
  ``s % n``, each task with its own position in its training half and its own carried hidden state), each on a
  cell sampled from the controller; an epoch gives every task the same number of steps (the shortest task's
  pass), capped by ``steps_per_epoch``.
* **Controller** (:class:`MASArchitect`): ENAS's REINFORCE steps, the reward of a sampled cell the mean over the
  tasks of ENAS's reward ``80 / ppl``, each on one batch of ``bptt`` steps drawn from that task's architecture
  half. The derived cell: ``enas_derive_samples`` samples scored by the mean reward on each task's first batch.
* **Comparison** (:func:`run_mas`): an ENAS search on each task alone gives the single-task cells; then every cell
  (the multi-task one and each single-task one) is trained from the same fresh initialisation on every task
  (``train_epochs``) and scored there: the table of validation and test perplexities, a row per cell, a column
  per task.

Files in the run folder: ``results.json`` (settings and finished parts; a resumed run skips them), ``mas/`` (the
multi-task search's checkpoint, log, genotype), ``single-<task>/``, ``train-<cell>-<task>.pt`` (each training's
checkpoint), ``genotypes/<cell>.json`` (for ``pynas train rnn``) and ``.svg``, ``table.md``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from ..search.lm_tasks import (Results, TaskSettings, check_search_settings, check_task_settings, load_tasks,
                               ppl, run_enas_search, score, table, train_cell,
                               write_genotype)
from ..search.rnn import RNNSearch, _check_task_size
from .enas import ENASArchitect


class MASArchitect(ENASArchitect):
    """ENAS's controller training with MAS's reward: the mean over the tasks of each task's reward."""

    def sample_reward(self, search, genotype, rng: random.Random) -> float:
        rewards = []
        for data in search.task_search:
            start = rng.randrange(0, max(data.size(0) - 1 - self.cfg.bptt, 0) + 1)
            rewards.append(self.reward(genotype, data, start))
        return sum(rewards) / len(rewards)

    def select_reward(self, search, genotype) -> float:
        return sum(self.reward(genotype, data, 0) for data in search.task_search) / len(search.task_search)


class MASSearch(RNNSearch):
    """An ENAS search over several tasks at once (module docstring); ``tasks`` share one dictionary."""

    def __init__(self, cfg, tasks, save_dir=None, log=print, progress: bool = True):
        if cfg.method != "enas":
            raise ValueError(f"method: MAS searches with ENAS, got {cfg.method!r}")
        if len(tasks) < 2:
            raise ValueError(f"tasks: MAS needs at least 2 tasks, got {len(tasks)}")
        if len({t.ntokens for t in tasks}) != 1:
            raise ValueError("tasks: MAS's tasks must share one dictionary (pynas.rnn.tasks.tasks_dictionary)")
        super().__init__(cfg, save_dir=save_dir, log=log, progress=progress, corpus=tasks[0])
        self.tasks = tasks
        self.task_train, self.task_search, self.task_val = [], [], []
        from ..rnn.data import batchify

        for task in tasks:
            _check_task_size(cfg, task)
            half = task.train.numel() // 2
            self.task_train.append(batchify(task.train[:half], cfg.batch_size).to(self.device))
            self.task_search.append(batchify(task.train[half:], cfg.batch_size).to(self.device))
            self.task_val.append(batchify(task.valid, cfg.eval_batch_size).to(self.device))
        self.search_data = self.task_search[0]
        self.architect = MASArchitect(self.model, cfg)

    def train_epoch(self, epoch: int):
        from ..rnn.data import get_batch

        cfg, model = self.cfg, self.model
        model.train()
        rng = random.Random(cfg.seed * 1000003 + epoch)
        n = len(self.tasks)
        hidden = [model.init_hidden(cfg.batch_size) for _ in range(n)]
        pos = [0] * n
        total = n * min((d.size(0) - 2) // cfg.bptt + 1 for d in self.task_train)
        if cfg.steps_per_epoch:
            total = min(total, cfg.steps_per_epoch)
        sample = self.architect.sampler(epoch)
        loss_sum, tokens = 0.0, 0
        for step in range(total):
            t = step % n
            data_t = self.task_train[t]
            if pos[t] >= data_t.size(0) - 2:  # this task's pass is over (bptt / 2 batches): start it again
                pos[t], hidden[t] = 0, model.init_hidden(cfg.batch_size)
            seq_len = max(int(cfg.bptt if rng.random() < 0.95 else cfg.bptt / 2.0), 1)
            with self._scaled_lr(seq_len):
                data, targets = get_batch(data_t, pos[t], seq_len)
                model.set_arch(sample())
                raw_loss, h = self._weight_update(data, targets, [x.detach() for x in hidden[t]])
                hidden[t] = h
            loss_sum = raw_loss.detach() * targets.numel() + loss_sum
            tokens += targets.numel()
            pos[t] += seq_len
        return float(loss_sum) / max(tokens, 1), total

    def run_epoch(self, epoch: int):
        from ..rnn.model_search import mean_nll

        train_loss, steps = self.train_epoch(epoch)
        extra = self.architect.controller_phase(self, epoch)
        losses = [mean_nll(self.model, v, self.cfg.bptt) for v in self.task_val]
        val_loss = sum(losses) / len(losses)
        per_task = {f"val_ppl_{t.name}": math.exp(min(v, 50)) for t, v in zip(self.tasks, losses)}
        record = {"lr": self.optimizer.param_groups[0]["lr"], "steps": steps, "train_loss": train_loss,
                  "train_ppl": math.exp(min(train_loss, 50)), "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50)), **per_task, **extra}
        text = "".join(f" {k} {v:.4f}" for k, v in {**per_task, **extra}.items())
        return record, (f"steps {steps} train_loss {train_loss:.4f} mean val_ppl {record['val_ppl']:.2f}{text}")


@dataclass
class MASConfig(TaskSettings):
    """MAS's settings: the tasks (:class:`~pynas.search.lm_tasks.TaskSettings`) and ``search``, the settings of the
    multi-task and of each single-task ENAS search (:class:`pynas.search.rnn.RNNSearchConfig` fields)."""

    single_task: bool = True  # also search each task alone and compare the cells
    search: Dict[str, object] = field(default_factory=dict)

    def search_config(self):
        from ..search.rnn import RNNSearchConfig

        return RNNSearchConfig.for_method("enas", **self.search)


def check_config(cfg: MASConfig) -> None:
    check_task_settings(cfg)
    if cfg.single_task is not True and cfg.single_task is not False:
        raise ValueError(f"single_task: expected True or False, got {cfg.single_task!r}")
    check_search_settings(cfg.search, "MAS", cfg.search_config)


def run_mas(cfg: MASConfig, save_dir: str, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or resume, from what ``save_dir`` holds) a multi-task search and its comparison; returns the cells and
    the table."""
    from ..rnn.genotypes import from_json, to_json
    from .rsws import rnn_model

    check_config(cfg)
    tasks = load_tasks(cfg)
    scfg = cfg.search_config()
    results = Results(save_dir, dataclasses.asdict(cfg))
    cells: Dict[str, object] = {}
    done = results.get("search-multi")
    if done is None:
        log(f"mas: one ENAS search over {len(tasks)} tasks: {', '.join(t.name for t in tasks)}")
        cell = run_enas_search(MASSearch(scfg, tasks, progress=progress), os.path.join(save_dir, "mas"), log)
        results.put("search-multi", {"genotype": to_json(cell)})
        done = results.get("search-multi")
    cells["multi-task"] = from_json(done["genotype"])
    if cfg.single_task:
        for task in tasks:
            key = f"search-{task.name}"
            if results.get(key) is None:
                log(f"mas: ENAS search on {task.name} alone")
                search = RNNSearch(scfg, progress=progress, corpus=task)
                cell = run_enas_search(search, os.path.join(save_dir, f"single-{task.name}"), log)
                results.put(key, {"genotype": to_json(cell)})
            cells[task.name] = from_json(results.get(key)["genotype"])
    for name, cell in cells.items():
        write_genotype(save_dir, name, cell)
    scores: Dict[str, Dict[str, dict]] = {}
    for name, cell in cells.items():
        scores[name] = {}
        for task in tasks:
            key = f"train-{name}-{task.name}"
            rec = results.get(key)
            if rec is None:
                torch.manual_seed(scfg.seed)  # every cell from the same initialisation on a task
                model = rnn_model(task.ntokens, scfg, scfg.seed).to(scfg.device)
                train_cell(model, cell, task, scfg, cfg.train_epochs, os.path.join(save_dir, key + ".pt"),
                           seed=scfg.seed, steps_per_epoch=cfg.train_steps_per_epoch, log=log,
                           label=f"mas: {name} cell on {task.name}: ")
                with torch.no_grad():
                    rec = {"valid_ppl": ppl(score(model, cell, task, "valid", scfg)),
                           "test_ppl": ppl(score(model, cell, task, "test", scfg))}
                results.put(key, rec)
            scores[name][task.name] = rec
    text = mas_table([t.name for t in tasks], scores)
    with open(os.path.join(save_dir, "table.md"), "w") as fh:
        fh.write(text + "\n")
    log("mas: test perplexity of each cell trained on each task (lower is better)\n" + text)
    return {"cells": {n: to_json(c) for n, c in cells.items()}, "scores": scores, "table": text}


def mas_table(names: List[str], scores: Dict[str, Dict[str, dict]]) -> str:
    """A row per cell (the multi-task one first), a column per task; the best of each column starred."""
    best = {n: min(scores[c][n]["test_ppl"] for c in scores) for n in names}
    rows = []
    for cell in scores:
        rows.append([f"{cell} cell"] + [f"{scores[cell][n]['test_ppl']:.2f}" + ("*" if scores[cell][n]["test_ppl"]
                                                                                 == best[n] else "") for n in names])
    return table(["cell"] + [f"{n} test ppl" for n in names], rows)
