"""Sublayer-order search (Press, Smith and Levy, ACL 2020, the sandwich transformer): which order of self-attention
(s) and feed-forward (f) sublayers trains best, at the same parameter count and budget.

The families of the paper, each order a Transformer language model of :mod:`pynas.sublayers` trained for the same
``steps`` on the embedded corpus and scored by its validation perplexity (lower is better):

* ``interleaved``: the baseline ``(sf)^n``, trained with ``baseline_seeds`` seeds (its seed variance);
* ``sandwich``: ``s^k (sf)^(n-k) f^k`` for each k of ``ks`` (default 1..n-1: k = 0 is the baseline, and k = n
  gives the string of k = n - 1), the paper's family, tuned on validation;
* ``balanced``: ``random_orders`` random arrangements of n s and n f (the paper's first random experiment);
* ``same_params``: ``random_orders`` random strings with the baseline's weight count, n_s + 2 n_f = 3n (one f
  weighs two s), of varying depth (the second).

Each distinct (order, seed) is one trial (:mod:`pynas.search.trials`; a string two families draw is trained
once): all of them run through the executor (in-process or Ray), their results appended to ``trials.jsonl`` as
they arrive, so a killed search resumes without retraining the finished ones. ``results.json`` holds every row and the summary: the baseline's mean and spread, the best k, the
best random order of each family. Evolution over the orders (with progressive dynamic hurdles) is
``pynas search evolution --space sublayers`` (:mod:`pynas.strategies.evolution`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..search.config import check_positive_int, check_seed
from ..search.trials import EXECUTORS, Trial, TrialStore, make_executor, run_trials, settings_file

FAMILIES = ("interleaved", "sandwich", "balanced", "same_params")


@dataclass
class SandwichConfig:
    """Settings of a sublayer-order search (module docstring); ``trial``: the language model's and its training's
    (:class:`pynas.sublayers.trial.SublayerTrialConfig` fields; ``total_steps`` is ``steps``)."""

    n: int = 4
    steps: int = 600
    families: Tuple[str, ...] = FAMILIES
    ks: Optional[Tuple[int, ...]] = None  # None: 1..n-1
    random_orders: int = 4
    baseline_seeds: int = 2
    seed: int = 0
    executor: str = "inprocess"
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None
    parallel: int = 1  # trials handed to the executor at once
    trial: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        for name in ("n", "steps", "random_orders", "baseline_seeds", "parallel"):
            check_positive_int(name, getattr(self, name))
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families: expected some of {', '.join(FAMILIES)}, got {list(self.families)}")
        if self.ks is not None and (not self.ks or any(not isinstance(k, int) or not 0 <= k <= self.n
                                                       for k in self.ks)):
            raise ValueError(f"ks: expected sandwich coefficients in 0..n ({self.n}), got {list(self.ks)}")
        check_seed(self.seed)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {self.executor!r}")


def candidates(cfg: SandwichConfig) -> List[Tuple[str, str, int]]:
    """Every (family, order, seed) the search trains, in a fixed order: the random orders drawn from
    ``random.Random(cfg.seed)``; the other families train with the first seed, ``cfg.seed``."""
    from ..sublayers.orders import interleaved, random_balanced, random_same_params, sandwich

    rng = random.Random(cfg.seed)
    out = []
    for fam in cfg.families:
        if fam == "interleaved":
            out += [(fam, interleaved(cfg.n), cfg.seed + s) for s in range(cfg.baseline_seeds)]
        elif fam == "sandwich":
            out += [(fam, sandwich(cfg.n, k), cfg.seed) for k in (cfg.ks or range(1, cfg.n))]
        elif fam == "balanced":
            out += [(fam, random_balanced(rng, cfg.n), cfg.seed) for _ in range(cfg.random_orders)]
        else:
            out += [(fam, random_same_params(rng, cfg.n), cfg.seed) for _ in range(cfg.random_orders)]
    return out


def _summary(rows: List[dict]) -> dict:
    def ppl(r):
        return r["perplexity"] if r["perplexity"] is not None and math.isfinite(r["perplexity"]) else math.inf

    out = {}
    base = [ppl(r) for r in rows if r["family"] == "interleaved"]
    if base:
        out["interleaved"] = {"mean": statistics.fmean(base), "min": min(base), "max": max(base),
                              "std": statistics.stdev(base) if len(base) > 1 else 0.0, "seeds": len(base)}
    for fam in ("sandwich", "balanced", "same_params"):
        mine = [r for r in rows if r["family"] == fam]
        if mine:
            best = min(mine, key=ppl)
            out[fam] = {"best_order": best["order"], "best_perplexity": ppl(best),
                        "beat_baseline": sum(ppl(r) < out["interleaved"]["mean"] for r in mine) if base else None,
                        "of": len(mine)}
    return out


class SandwichSearch:
    """The search of a folder (module docstring): ``run()``; a rerun on the same folder resumes it."""

    def __init__(self, cfg: SandwichConfig, folder: str, log: Callable[[str], None] = print):
        from ..sublayers.trial import SublayerTrialConfig

        cfg.check()
        self.cfg, self.folder, self.log = cfg, folder, log
        self.trial_cfg = SublayerTrialConfig(**dict(cfg.trial, total_steps=cfg.steps))
        self.trial_cfg.check()
        os.makedirs(folder, exist_ok=True)
        settings = dataclasses.asdict(cfg)
        for k in ("executor", "ray_address", "num_cpus", "parallel"):
            settings.pop(k)
        settings["trial"] = dataclasses.asdict(self.trial_cfg)
        settings_file(os.path.join(folder, "sandwich.json"), settings)
        self.store = TrialStore(os.path.join(folder, "trials.jsonl"))

    @classmethod
    def resume(cls, folder: str, log: Callable[[str], None] = print, executor: str = "inprocess",
               ray_address: Optional[str] = None, num_cpus: Optional[int] = None,
               parallel: int = 1) -> "SandwichSearch":
        path = os.path.join(folder, "sandwich.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no sandwich.json in {folder}")
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        trial = dict(saved.pop("trial"))
        trial.pop("total_steps", None)
        for k in ("families", "ks"):
            if saved.get(k) is not None:
                saved[k] = tuple(saved[k])
        cfg = SandwichConfig(**saved, trial=trial, executor=executor, ray_address=ray_address, num_cpus=num_cpus,
                             parallel=parallel)
        return cls(cfg, folder, log)

    def run(self) -> dict:
        from ..sublayers.trial import train_order

        cfg = self.cfg
        cands = candidates(cfg)
        first: dict = {}  # (order, seed) -> its trial, and the family that drew it first
        for fam, order, seed in cands:
            if (order, seed) not in first:
                first[(order, seed)] = (Trial(len(first), order, 0, cfg.steps, 0, seed), {"family": fam})
        trials, extras = [t for t, _ in first.values()], [e for _, e in first.values()]
        records: List[Optional[dict]] = [self.store.get(t) for t in trials]
        todo = [i for i, r in enumerate(records) if r is None]

        def log(i: int, r: dict) -> None:  # as each trial finishes
            self.log(f"trial {i + 1}/{len(trials)}: {r['family']} {r['genotype']} seed {r['seed']}: "
                     f"perplexity {r.get('perplexity', float('nan')):.2f} ({r.get('seconds', 0.0):.1f} s)")

        t0 = time.perf_counter()
        executor = make_executor(cfg.executor, cfg.ray_address, cfg.num_cpus, self.trial_cfg.threads)
        try:
            for lo in range(0, len(todo), cfg.parallel):
                part = todo[lo:lo + cfg.parallel]
                got = run_trials(self.store, executor, train_order, [trials[i] for i in part], self.folder,
                                 self.trial_cfg, [extras[i] for i in part], lambda k, r, part=part: log(part[k], r))
                for i, r in zip(part, got):
                    records[i] = r
        finally:
            executor.close()
        by_order = {(t.genotype, t.seed): r for t, r in zip(trials, records)}
        records = [by_order[(order, seed)] for _, order, seed in cands]
        rows = [{"family": fam, "order": order, "seed": seed, "perplexity": r.get("perplexity"),
                 "valid_loss": r.get("valid_loss"), "params": r.get("params"), "weights": r.get("weights")}
                for (fam, order, seed), r in zip(cands, records)]
        result = {"rows": rows, "summary": _summary(rows), "trained_here": len(todo),
                  "seconds": time.perf_counter() - t0}
        with open(os.path.join(self.folder, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
        return result


def table(result: dict) -> str:
    """The rows (family, order, seed, parameters, perplexity) and the summary as text."""
    lines = [f"{'family':<12} {'order':<20} {'seed':>4} {'params':>8} {'perplexity':>10}"]
    for r in result["rows"]:
        p = "nan" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        lines.append(f"{r['family']:<12} {r['order']:<20} {r['seed']:>4} {r['params'] or 0:>8} {p:>10}")
    s = result["summary"]
    if "interleaved" in s:
        b = s["interleaved"]
        lines.append(f"interleaved baseline: {b['mean']:.2f} mean over {b['seeds']} seeds "
                     f"(min {b['min']:.2f}, max {b['max']:.2f})")
    for fam in ("sandwich", "balanced", "same_params"):
        if fam in s:
            f = s[fam]
            beat = "" if f["beat_baseline"] is None else f"; {f['beat_baseline']} of {f['of']} beat the baseline's mean"
            lines.append(f"best {fam}: {f['best_order']} {f['best_perplexity']:.2f}{beat}")
    return "\n".join(lines)
