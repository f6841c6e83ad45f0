"""Search by trials: a trial is (candidate, step budget) -> fitness; the results file of a search; the executors.

A **trial** trains candidate ``candidate`` (its genotype, a string) from step ``start`` to step ``end`` and scores
it: ``fn(genotype, start, end, checkpoint, seed, cfg) -> {"fitness": ..., ...}`` with ``fn`` a space's
module-level trial function (:func:`pynas.cnn.trial.train_genotype`, :func:`pynas.sublayers.trial.train_order`).
A candidate promoted to a further budget continues from the checkpoint its previous trial wrote (one file per
candidate and step, :func:`checkpoint_path`), so a kill during a trial loses only that trial.

**Results** go to one JSON-lines file per search (:class:`TrialStore`), one line per finished trial, appended
with flush and fsync as each result arrives; a last line cut by a kill is ignored on reading. A search that
replays its decisions from its seed takes each result from the file when it is there (:meth:`TrialStore.get`),
so a killed search resumes without training a finished trial again.

**Executors** run a batch of trials, hand each result to a callback as it finishes (the search stores it then) and
back all of them in the batch's order: :class:`InProcessExecutor`
(the default, one after another in this process) and :class:`RayExecutor` (Ray, ``pip install pynas[ray]``:
the trials as Ray tasks on a local or existing cluster, ``address``), each trial a task of ``threads`` CPUs. The
same trials give the same results under both (each trial seeds itself and sets its own thread count).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import _is_int

EXECUTORS = ("inprocess", "ray")


@dataclass(frozen=True)
class Trial:
    """Train ``candidate`` (``genotype``) from step ``start`` to ``end``; ``stage`` is its budget's index."""

    candidate: int
    genotype: str
    start: int
    end: int
    stage: int
    seed: int

    @property
    def key(self) -> Tuple[int, int]:
        return (self.candidate, self.stage)


def check_span(start, end, total_steps: int) -> None:
    """A trial function's span: integer steps with 0 <= start < end <= total_steps (ValueError naming the argument)."""
    if not _is_int(start) or start < 0:
        raise ValueError(f"start: expected a non-negative integer step, got {start!r}")
    if not _is_int(end) or end <= start:
        raise ValueError(f"end: expected an integer step after start ({start}), got {end!r}")
    if end > total_steps:
        raise ValueError(f"end: expected at most total_steps ({total_steps}), got {end}")


def settings_file(path: str, settings: dict) -> None:
    """Write a search's settings (JSON) at its start; on a resume, refuse settings other than the saved ones."""
    mine = json.loads(json.dumps(settings))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            if json.load(fh) != mine:
                raise ValueError(f"resume: {path} holds other settings; resume with the same ones (or another "
                                 f"folder)")
        return
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(mine, fh, indent=1, sort_keys=True)


def checkpoint_path(folder: str, candidate: int, step: int) -> str:
    """Where candidate ``candidate``'s state at ``step`` is kept in the search folder."""
    return os.path.join(folder, "candidates", f"{candidate:05d}-step{step}.pt")


class TrialStore:
    """The results file of a search (JSON lines): ``append`` one record per finished trial, ``get`` one back."""

    def __init__(self, path: str):
        self.path = path
        self._by_key: Dict[Tuple[int, int], dict] = {}
        records, good = self._parse(path)
        for rec in records:
            self._by_key[(rec["candidate"], rec["stage"])] = rec
        if os.path.exists(path) and os.path.getsize(path) > good:  # a line cut by a kill: drop it
            with open(path, "rb+") as fh:
                fh.truncate(good)

    @staticmethod
    def _parse(path: str) -> Tuple[List[dict], int]:
        out: List[dict] = []
        good = 0
        if not os.path.exists(path):
            return out, good
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8")) if raw.endswith(b"\n") else None
                except ValueError:
                    rec = None
                if not isinstance(rec, dict) or not {"candidate", "stage", "fitness"} <= set(rec):
                    break
                out.append(rec)
                good += len(raw)
        return out, good

    @classmethod
    def read(cls, path: str) -> List[dict]:
        """The records of the file in order; a line that does not parse (a write cut by a kill) ends the file."""
        return cls._parse(path)[0]

    def get(self, trial: Trial) -> Optional[dict]:
        """The stored result of ``trial`` (same candidate, stage, genotype and span), or None."""
        rec = self._by_key.get(trial.key)
        if rec is None:
            return None
        if (rec.get("genotype"), rec.get("start"), rec.get("end")) != (trial.genotype, trial.start, trial.end):
            raise ValueError(f"resume: {self.path} holds candidate {trial.candidate}'s stage {trial.stage} for "
                             f"another genotype or budget: it belongs to another search (other settings or seed)")
        return rec

    def append(self, trial: Trial, result: dict, extra: Optional[dict] = None) -> dict:
        """Store ``result`` of ``trial`` (with the trial's fields and ``extra``); returns the record."""
        rec = dict(asdict(trial))
        rec.update(extra or {})
        rec.update(result)
        fit = rec.get("fitness")
        if not isinstance(fit, (int, float)) or not math.isfinite(fit):
            rec["fitness"] = None  # JSON has no NaN: a diverged trial ranks last
        line = json.dumps(rec, sort_keys=True) + "\n"
        self._by_key[trial.key] = rec
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return rec


def run_trials(store: "TrialStore", executor, fn: Callable, trials: Sequence[Trial], folder: str, cfg: Any,
               extras: Sequence[dict], on_record: Optional[Callable[[int, dict], None]] = None) -> List[dict]:
    """The records of ``trials``: the stored ones from ``store``, the others run through ``executor`` and appended
    to ``store`` with their ``extras`` as each finishes (``on_record(i, record)`` then), so a kill loses only the
    unfinished ones. In the trials' order."""
    recs: List[Optional[dict]] = [store.get(t) for t in trials]
    todo = [i for i, r in enumerate(recs) if r is None]
    if todo:
        def keep(k: int, res: dict) -> None:
            i = todo[k]
            recs[i] = store.append(trials[i], res, extras[i])
            if on_record is not None:
                on_record(i, recs[i])

        executor.run(fn, [trials[i] for i in todo], folder, cfg, keep)
    return recs


class InProcessExecutor:
    """Runs the trials one after another in this process."""

    name = "inprocess"

    def run(self, fn: Callable, trials: Sequence[Trial], folder: str, cfg: Any,
            on_result: Optional[Callable[[int, dict], None]] = None) -> List[dict]:
        """The results in the trials' order; ``on_result(i, result)`` as each one finishes."""
        out = []
        for i, t in enumerate(trials):
            out.append(run_trial(fn, t, folder, cfg))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs the trials as Ray tasks (one CPU set of ``threads`` each) on the cluster at ``address`` (None: a local
    one started here, ``num_cpus`` CPUs), results in the trials' order."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None, threads: int = 1):
        try:
            import ray
        except ImportError:
            raise RuntimeError("executor: 'ray' needs Ray (pip install 'pynas[ray]')") from None
        if address is None and num_cpus is not None and threads > num_cpus:
            raise ValueError(f"threads: each trial takes {threads} CPUs, more than the local cluster's num_cpus "
                             f"({num_cpus}): no trial could ever run")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            self._started = True
        self._task = ray.remote(num_cpus=threads)(run_trial)

    def run(self, fn: Callable, trials: Sequence[Trial], folder: str, cfg: Any,
            on_result: Optional[Callable[[int, dict], None]] = None) -> List[dict]:
        """The results in the trials' order; ``on_result(i, result)`` as each one finishes (in finishing order)."""
        refs = [self._task.remote(fn, t, folder, cfg) for t in trials]
        index = {ref: i for i, ref in enumerate(refs)}
        out: List[Optional[dict]] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                out[i] = self._ray.get(ref)
                if on_result is not None:
                    on_result(i, out[i])
        return out

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def run_trial(fn: Callable, trial: Trial, folder: str, cfg: Any) -> dict:
    """One trial: reads the candidate's checkpoint at ``start`` (when > 0), writes the one at ``end``."""
    ckpt_in = checkpoint_path(folder, trial.candidate, trial.start)
    ckpt_out = checkpoint_path(folder, trial.candidate, trial.end)
    os.makedirs(os.path.dirname(ckpt_out), exist_ok=True)
    if trial.start:
        if not os.path.exists(ckpt_in):
            raise FileNotFoundError(f"resume: candidate {trial.candidate}'s checkpoint at step {trial.start} is "
                                    f"missing ({ckpt_in})")
        shutil.copyfile(ckpt_in, ckpt_out + ".in")
        try:
            result = fn(trial.genotype, trial.start, trial.end, ckpt_out + ".in", trial.seed, cfg)
            os.replace(ckpt_out + ".in", ckpt_out)
        finally:
            if os.path.exists(ckpt_out + ".in"):
                os.unlink(ckpt_out + ".in")
        return result
    return fn(trial.genotype, 0, trial.end, ckpt_out, trial.seed, cfg)


def make_executor(name: str, address: Optional[str] = None, num_cpus: Optional[int] = None, threads: int = 1):
    """The executor called ``name`` ('inprocess' or 'ray')."""
    if name == "inprocess":
        if address is not None:
            raise ValueError("ray_address: only the 'ray' executor takes a cluster address")
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus, threads)
    raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {name!r}")
