"""Continual architecture search (CAS; Pasunuru and Bansal, ACL 2019) on the DARTS RNN space, on ENAS.

Tasks d_1, d_2, ... come one after another (:mod:`pynas.search.lm_tasks`: the embedded stdlib tasks or the user's,
one shared dictionary). For task d_k, as the code's ``trainer.py`` does:

1. **Search**: ENAS (:mod:`pynas.strategies.enas`, every ENAS setting as ``pynas search enas``) on d_k: the shared
   weights start from theta_(k-1) (task 1: a fresh initialisation), the controller afresh; every weight step adds
   the penalty below. The derived cell is dag_k.
2. **Train** dag_k on d_k's whole training split (``train_epochs``), from theta_(k-1) (task 1: from a fresh
   initialisation, as the code's retrain), with the same penalty: the weights theta_k.
3. **Score** every task so far, d_j for j <= k, with theta_k and its own dag_j: one row of the table (validation
   and test perplexity).

Penalties (:mod:`pynas.strategies.cas_penalties`): task 1 ``lambda_bs_first * block_sparsity(theta)``; task k > 1
``lambda_bs * block_sparsity(theta - theta_(k-1)) + lambda_o * orthogonality(theta, theta_(k-1))`` over the
parameters :func:`~pynas.strategies.cas_penalties.cas_selection` names for dag_(k-1) (every parameter of pynas's
cell: each node's weight is used by every cell), the cell's (in, out) matrices transposed so that a group is an
output unit as in the code. ``penalties=False`` is the control without them (the same runs otherwise).

Files in the run folder: ``results.json`` (the settings and each finished part: a resumed run skips them),
``task<k>-<name>/search/`` (the ENAS search's checkpoint, log, genotype), ``task<k>-<name>/train.pt`` (the cell
training's checkpoint, per epoch), ``task<k>-<name>/theta.pt`` (theta_k), ``genotypes/<name>.json`` (dag_k, for
``pynas train rnn``) with its picture ``.svg``, ``table.md``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..search.lm_tasks import (Results, TaskSettings, check_search_settings, check_task_settings, load_shared,
                               load_tasks, number_check, ppl, run_enas_search, score, shared_state, table,
                               train_cell, write_genotype)
from .cas_penalties import (FIRST_TASK_LAMBDA_BS, LATER_TASK_LAMBDA_BS, LATER_TASK_LAMBDA_O, ContinualPenalty,
                            cas_selection, cell_weight_names, first_task_penalty)


@dataclass
class CASConfig(TaskSettings):
    """CAS's settings: the tasks (:class:`~pynas.search.lm_tasks.TaskSettings`), the penalties, and ``search``: the
    settings of each task's ENAS search (:class:`pynas.search.rnn.RNNSearchConfig` fields; ENAS's defaults)."""

    lambda_bs_first: float = FIRST_TASK_LAMBDA_BS
    lambda_bs: float = LATER_TASK_LAMBDA_BS
    lambda_o: float = LATER_TASK_LAMBDA_O
    penalties: bool = True
    search: Dict[str, object] = field(default_factory=dict)

    def search_config(self, k: int):
        """Task k's (0-based) ENAS search settings: ``search`` over ENAS's defaults, the seed ``seed + k``."""
        from ..search.rnn import RNNSearchConfig

        base = RNNSearchConfig.for_method("enas", **self.search)
        return dataclasses.replace(base, seed=base.seed + k)


def check_config(cfg: CASConfig) -> None:
    check_task_settings(cfg)
    for name in ("lambda_bs_first", "lambda_bs", "lambda_o"):
        number_check(name, getattr(cfg, name))
    if cfg.penalties is not True and cfg.penalties is not False:
        raise ValueError(f"penalties: expected True or False, got {cfg.penalties!r}")
    check_search_settings(cfg.search, "CAS", lambda: cfg.search_config(0))


def _penalty(model, k: int, cfg: CASConfig, previous_cell) -> Optional[Callable[[], torch.Tensor]]:
    """Task k's (0-based) weight penalty on ``model`` (its current weights are theta_(k-1) when k > 0)."""
    if not cfg.penalties:
        return None
    names = [n for n, _ in model.named_parameters() if not n.startswith("controller.")]
    transpose = cell_weight_names(model)
    if k == 0:
        chosen = set(names)
        return lambda: first_task_penalty(model, cfg.lambda_bs_first, select=chosen, transpose=transpose)
    used = range(len(previous_cell.recurrent))
    return ContinualPenalty(model, cfg.lambda_bs, cfg.lambda_o, select=cas_selection(names, used),
                            transpose=transpose)


def run_cas(cfg: CASConfig, save_dir: str, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or resume, from what ``save_dir`` holds) a continual search; returns the steps' records and the table."""
    from ..rnn.genotypes import from_json, to_json
    from ..search.checkpoint import atomic_save, checkpoint_checksum, load_checkpoint
    from ..search.rnn import RNNSearch
    from .rsws import rnn_model

    check_config(cfg)
    tasks = load_tasks(cfg)
    results = Results(save_dir, dataclasses.asdict(cfg))
    theta: Optional[Dict[str, torch.Tensor]] = None
    cells: List = []
    steps: List[dict] = []
    for k, task in enumerate(tasks):
        folder = os.path.join(save_dir, f"task{k + 1}-{task.name}")
        key = f"task{k + 1}"
        scfg = cfg.search_config(k)
        done = results.get(key)
        if done is not None:
            theta = load_checkpoint(os.path.join(folder, "theta.pt"), "pynas-cas-weights", what="resume")["model"]
            cells.append(from_json(done["genotype"]))
            steps.append(done)
            continue
        log(f"cas: task {k + 1}/{len(tasks)} {task.name}: ENAS search"
            + (" from the previous task's weights" if theta is not None else ""))
        search = RNNSearch(scfg, progress=progress, corpus=task)
        if theta is not None:
            load_shared(search.model, theta)
        search.weight_penalty = _penalty(search.model, k, cfg, cells[-1] if cells else None)
        cell = run_enas_search(search, os.path.join(folder, "search"), log)
        cells.append(cell)
        torch.manual_seed(scfg.seed)
        model = rnn_model(task.ntokens, scfg, scfg.seed).to(scfg.device)
        if theta is not None:
            load_shared(model, theta)
        log(f"cas: task {k + 1} {task.name}: training its cell {to_json(cell)}")
        history = train_cell(model, cell, task, scfg, cfg.train_epochs, os.path.join(folder, "train.pt"),
                             seed=scfg.seed, penalty=_penalty(model, k, cfg, cells[-2] if k else None),
                             steps_per_epoch=cfg.train_steps_per_epoch, log=log, label=f"cas: task {k + 1} ")
        theta = shared_state(model)
        state = {"format": "pynas-cas-weights", "version": 2, "config": {"task": task.name}, "model": theta}
        state["checksum"] = checkpoint_checksum(state)
        atomic_save(state, os.path.join(folder, "theta.pt"))
        scores = {}
        with torch.no_grad():
            for j in range(k + 1):
                v = score(model, cells[j], tasks[j], "valid", scfg)
                t = score(model, cells[j], tasks[j], "test", scfg)
                scores[tasks[j].name] = {"valid_ppl": ppl(v), "test_ppl": ppl(t)}
        record = {"task": task.name, "genotype": to_json(cell), "train": history, "scores": scores}
        write_genotype(save_dir, task.name, cell)
        results.put(key, record)
        steps.append(record)
        log(f"cas: after task {k + 1}: " + ", ".join(f"{n} test ppl {s['test_ppl']:.2f}" for n, s in scores.items()))
    text = cas_table([t.name for t in tasks], steps)
    with open(os.path.join(save_dir, "table.md"), "w") as fh:
        fh.write(text + "\n")
    log("cas: test perplexity of each task with the weights after each step and its own cell\n" + text)
    return {"steps": steps, "table": text}


def cas_table(names: List[str], steps: List[dict]) -> str:
    """The seed's table shape: a row per step (the weights after task k), a column per task (its own cell)."""
    rows = []
    for k, rec in enumerate(steps):
        rows.append([f"after task {k + 1} ({rec['task']})"] +
                    [f"{rec['scores'][n]['test_ppl']:.2f}" if n in rec["scores"] else "" for n in names])
    return table(["weights"] + [f"{n} test ppl" for n in names], rows)
